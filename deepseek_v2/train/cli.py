"""Command-line front of training: `deepseek-v2 train` (pretraining) and `deepseek-v2 sft`.

A config file (JSON or TOML, TrainConfig fields; the model shape under "model") plus overrides:
`--set key=value` for any field (values parsed as JSON, dotted keys reach into the model, e.g.
`--set model.num_hidden_layers=2`) and shortcuts for the common ones. On several GPUs of one host:

    torchrun --nproc-per-node N -m deepseek_v2.cli train CONFIG
"""

from __future__ import annotations

import argparse
import json

from .config import TrainConfig
from .long_context import extend
from .sft import sft
from .train import train


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value  # a bare string, e.g. a path


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="training config, .json or .toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_override,
                        metavar="KEY=VALUE", help="override a config field (repeatable)")
    parser.add_argument("--out-dir", help="where checkpoints, metrics and plots go")
    parser.add_argument("--init-from", help="checkpoint directory to start from")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--max-minutes", type=float, help="time budget: fit the schedule to it and stop")
    parser.add_argument("--device", help="auto, cuda or cpu")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/train_state.pt")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)


def _config(args: argparse.Namespace) -> TrainConfig:
    overrides = dict(args.overrides)
    for name in ("out_dir", "init_from", "max_steps", "max_minutes", "device"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.resume:
        overrides["resume"] = True
    return TrainConfig.load(args.config, overrides)


def run_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg.retrieval_fraction or cfg.chat_data:
        extend(cfg)  # context extension: long_context.py's mixed rows
    else:
        train(cfg)
    return 0


def run_sft(args: argparse.Namespace) -> int:
    sft(_config(args))
    return 0

