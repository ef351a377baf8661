"""The flags every command shares: which checkpoint to load (--model, --dtype, --device, checked by
`check_model` and `check_device` before anything loads, in the same words for every command) and the engine
knobs. The engine flags are generated from EngineConfig's fields, so a knob's name, type, default and
help are written once, in config.py; `engine_kwargs` turns the parsed flags back into its fields."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from .config import DEFAULT_MODEL, EngineConfig

DTYPES = ["auto", "bfloat16", "float16", "float32"]
SERVER_ONLY = {"max_waiting_requests"}  # a limit on the HTTP server's queue; no other command has one


def add_model_argument(container) -> None:
    """--model alone (`info`, and bench's group of model sources)."""
    container.add_argument("--model", default=None,
                           help="checkpoint directory (default: the model shipped with the package)")


def add_model_arguments(parser: argparse.ArgumentParser, model_into=None) -> None:
    """--model, --dtype and --device under a "model" heading. `model_into`: where --model goes instead
    (bench puts it in a mutually exclusive group with its random-weight sources)."""
    g = parser.add_argument_group("model")
    add_model_argument(model_into or g)
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto: bfloat16 on GPU, float32 on CPU (default: %(default)s)")
    g.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_engine_arguments(parser: argparse.ArgumentParser, server: bool = False,
                         only: set[str] | None = None) -> None:
    """One flag per EngineConfig field under an "engine" heading (SERVER_ONLY's only when `server`;
    only the fields in `only` when given): max_num_seqs becomes --max-num-seqs, typed by the field's
    annotation and defaulting to the field's default; a bool becomes --x / --no-x."""
    g = parser.add_argument_group("engine")
    hints = typing.get_type_hints(EngineConfig)  # config.py's annotations are strings
    for f in dataclasses.fields(EngineConfig):
        if (f.name in SERVER_ONLY and not server) or (only is not None and f.name not in only):
            continue
        # %(default)s shows the parser's default, so a command's set_defaults override shows too; a
        # field whose default is None says in its help what None means.
        text = f.metadata["help"] + ("" if f.default is None else " (default: %(default)s)")
        kind = hints[f.name]
        kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # int | None -> int
        names = [flag_name(f.name)] + ([f.metadata["short"]] if f.metadata["short"] else [])
        if kind is bool:
            g.add_argument(*names, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            g.add_argument(*names, type=kind, default=f.default, choices=f.metadata["choices"], help=text)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig's keyword arguments from the parsed flags; a field without a flag keeps its default."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}


def check_model(path: str | None, weights: bool = True):
    """The architecture of a checkpoint directory, after checking its files are whole (its weights
    too, unless `weights` is False: random weights of its shape): every command names a missing,
    foreign or truncated checkpoint in the same words, before anything is loaded."""
    from pathlib import Path

    from safetensors import safe_open

    from .checkpoint import checkpoint_args, weight_files
    path = path or DEFAULT_MODEL
    args = checkpoint_args(path)
    for file in weight_files(Path(path)) if weights else []:
        try:
            with safe_open(str(file), "pt"):  # reads the header and checks the file holds what it lists
                pass
        except Exception as e:  # safetensors raises its own error type
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    return args


def check_device(device: str | None) -> None:
    """Refuse a CUDA device this torch cannot use, before anything is loaded."""
    import torch
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        why = ("this torch is a CPU build (install a CUDA build of torch: see the README's Install)"
               if torch.version.cuda is None else "no CUDA GPU is visible")
        raise ValueError(f"--device {device}: {why}; or use --device cpu")
