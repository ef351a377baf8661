"""`deepseek-v2 eval niah` (needle in a haystack, niah.py) and `deepseek-v2 eval ppl` (sliding-window
perplexity of a text file, ppl.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..flags import add_engine_arguments, add_model_arguments, engine_kwargs
from .needles import KINDS
from .niah import DEPTHS, HAYSTACK, parse_length


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True)
    p = sub.add_parser("niah", help="needle in a haystack: a heatmap of retrieval over context length and depth")
    add_model_arguments(p)
    add_engine_arguments(p)
    g = p.add_argument_group("server (instead of --model)")
    g.add_argument("--base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1; --model is "
                   "then the served model's name (default: the server's first)")
    g.add_argument("--api-key", default=None)
    g.add_argument("--tokenizer", default=None, help="directory of the served model's tokenizer, to count "
                   "lengths in its tokens (default: the bundled one)")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--lengths", default=None, help="context lengths, comma-separated, e.g. 1k,2k,4k (default: "
                   "powers of two from 1K to the model's limit; 1K-32K against a server)")
    p.add_argument("--depths", default=",".join(str(round(100 * d)) for d in DEPTHS),
                   help="needle depths in percent (default: %(default)s)")
    p.add_argument("--needle", default="passkey", choices=KINDS)
    p.add_argument("--trials", type=int, default=1, help="needles per cell")
    p.add_argument("--max-tokens", type=int, default=24, help="reply budget (part of each length)")
    p.add_argument("--haystack", default=str(HAYSTACK), help="text file (default: the bundled haystack)")
    p.add_argument("--needle-seed", type=int, default=0, help="seed of the needles' values")
    p.add_argument("--out", default="niah", help="writes OUT.json and OUT.png (default: %(default)s)")
    p.add_argument("--title", default=None, help="heatmap title")
    p.set_defaults(func=run_niah_command)

    p = sub.add_parser("ppl", help="perplexity of a text file at a context length, sliding window")
    p.add_argument("text", help="a UTF-8 text file")
    add_model_arguments(p)
    p.add_argument("--context", type=parse_length, default=4096, help="window length in tokens (default: 4096)")
    p.add_argument("--stride", type=parse_length, default=None, help="window step (default: half the context)")
    p.add_argument("--max-chars", type=int, default=None, help="read only the first N characters")
    p.set_defaults(func=run_ppl_command)


def run(args: argparse.Namespace) -> None:
    args.func(args)


def run_niah_command(args: argparse.Namespace) -> None:
    from ..config import DEFAULT_MODEL
    from ..tokenizer import Tokenizer
    from .niah import EngineBackend, ServerBackend, plot_heatmap, run_niah
    if args.base_url:
        backend = ServerBackend(args.base_url, args.api_key, args.model,
                                Tokenizer.from_pretrained(args.tokenizer or DEFAULT_MODEL), args.concurrency)
        limit = 32768
    else:
        backend = EngineBackend(args.model, dtype=args.dtype, device=args.device, **engine_kwargs(args))
        limit = backend.max_len
    lengths = ([parse_length(x) for x in args.lengths.split(",")] if args.lengths
               else [1024 << i for i in range(16) if 1024 << i <= limit])
    depths = [float(x) / 100 for x in args.depths.split(",")]
    haystack = Path(args.haystack).read_text(encoding="utf-8")
    result = run_niah(backend, haystack, lengths, depths, args.needle, args.trials, args.max_tokens, args.needle_seed)
    result["arguments"] = {k: v for k, v in vars(args).items() if k != "func" and k != "api_key"}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"mean score {result['mean']:.3f} over {len(result['cases'])} prompts; wrote {args.out}.json")
    try:
        plot_heatmap(result, args.out + ".png", args.title)
        print(f"wrote {args.out}.png")
    except ImportError:
        print("matplotlib is not installed: no heatmap (pip install 'deepseek-v2[eval]')", file=sys.stderr)


def run_ppl_command(args: argparse.Namespace) -> None:
    import torch
    from ..config import DEFAULT_MODEL
    from ..model import DeepseekV2ForCausalLM
    from ..tokenizer import Tokenizer
    from .ppl import text_perplexity
    path = args.model or DEFAULT_MODEL
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype == "auto" else args.dtype
    model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, device=device)
    text = Path(args.text).read_text(encoding="utf-8")[:args.max_chars]
    result = text_perplexity(model, Tokenizer.from_pretrained(path), text, args.context,
                             args.stride or max(args.context // 2, 1))
    print(json.dumps({"model": path, "text": args.text, **result}))
