"""Held-out losses of checkpoints, for the context-extension card in docs/demo-model.md: the
assistant-token loss on data/demo/chat_val.jsonl (conversations packed in rows of 1024, as fine-tuning
evaluates), the text loss on data/demo/val.bin in rows of 1024 (as pretraining evaluates), and the
sliding-window loss of val.bin at 4K and 32K (eval/ppl.py). fp32, on the GPU when there is one.

    PYTHONPATH=. python scripts/heldout_loss.py deepseek_v2/default_model runs/demo-extend-32k/model
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from deepseek_v2 import DeepseekV2ForCausalLM, Tokenizer
from deepseek_v2.eval.ppl import sliding_window_nll
from deepseek_v2.train.data import IGNORE, TokenSequences, load_chat


@torch.no_grad()
def mean_loss(model, data, batch: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, data.num_sequences, batch):
        inputs, targets = data.get(list(range(start, min(start + batch, data.num_sequences))))
        logits = model(inputs.to(model.device))
        targets = targets.to(model.device)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum").item()
        count += int((targets != IGNORE).sum())
    return total / count


def main(paths: list[str]) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    val_tokens = np.fromfile("data/demo/val.bin", dtype=np.uint16).astype(np.int64).tolist()
    for path in paths:
        model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32, device=device)
        tokenizer = Tokenizer.from_pretrained(path)
        row = {"model": path,
               "chat_val_loss_1024": mean_loss(model, load_chat("data/demo/chat_val.jsonl", tokenizer, 1024)),
               "val_bin_loss_1024": mean_loss(model, TokenSequences("data/demo/val.bin", 1024))}
        for context in (4096, 32768):
            row[f"val_bin_sliding_{context}"] = sliding_window_nll(model, val_tokens, context, context // 2)["nll"]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        print("  perplexities: " + ", ".join(f"{k} {math.exp(v):.2f}" for k, v in row.items() if k != "model"),
              file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
