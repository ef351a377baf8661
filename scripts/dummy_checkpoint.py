"""Write a checkpoint directory without weights: a built-in shape's config.json beside the shipped
model's tokenizer, with the vocabulary resized to that tokenizer's. Served with
`deepseek-v2 serve --model DIR --load-format dummy` (random weights), it lets `deepseek-v2 bench-serve`
measure the server on a real shape whose weights are not at hand, with every generated token decodable.

Usage: python scripts/dummy_checkpoint.py OUT_DIR [--shape v2-lite]
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from deepseek_v2.config import DEFAULT_MODEL, PRESETS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def write_dummy_checkpoint(out: str | Path, shape: str = "v2-lite") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shipped = json.loads((Path(DEFAULT_MODEL) / "config.json").read_text())
    args = replace(PRESETS[shape], vocab_size=shipped["vocab_size"], bos_token_id=shipped["bos_token_id"],
                   eos_token_id=shipped["eos_token_id"])
    (out / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (Path(DEFAULT_MODEL) / name).is_file():
            shutil.copy(Path(DEFAULT_MODEL) / name, out / name)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--shape", default="v2-lite", choices=sorted(PRESETS))
    a = p.parse_args()
    print(write_dummy_checkpoint(a.out, a.shape))
