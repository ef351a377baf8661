"""Checkpoints in the official Hugging Face format: config.json plus one model.safetensors or
shards listed in model.safetensors.index.json. Loading fills a model built on the meta device
(DeepseekV2ForCausalLM.from_pretrained), each parameter once from the files (no second copy in
memory); routed experts, stored one tensor per expert in the files, are stacked into the model's
[E, ...] weights on the way in and unstacked on the way out. Under tensor parallelism a rank reads
only its part: its rows or columns of each sharded matrix (safetensors' get_slice) and its experts,
skipping the others'. This module works on the model object it is given and does not import the
model."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, ModelArgs
from .parallel import ShardedLinear

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROGRESS_BAR_BYTES = 1 << 30  # show a progress bar for checkpoints above 1 GiB
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer some older exports carry


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names the file or tensor."""


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
             "fp32": torch.float32, "float": torch.float32}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r} (use bfloat16, float16 or float32)")
    return names[dtype]


class CheckpointTensor(NamedTuple):
    name: str  # as the checkpoint names it
    target: torch.Tensor  # the parameter, or the slice of an expert stack, it fills
    index: tuple[slice, ...]  # the part of the checkpoint's tensor that goes there: () for all of it
    shape: tuple[int, ...]  # the checkpoint tensor's whole shape


def checkpoint_tensors(model: nn.Module) -> Iterator[CheckpointTensor]:
    """Every tensor this model (this rank's part of it) holds, with where it comes from."""
    for name, param in model.named_parameters(remove_duplicate=True):
        module_name, _, kind = name.rpartition(".")
        module = model.get_submodule(module_name)
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            prefix = f"{module_name}."
            inter = param.shape[-1] if kind == "down_proj" else param.shape[1] // 2
            for e in range(param.shape[0]):  # this rank's experts: checkpoint ids first_expert + e
                expert = f"{prefix}{module.first_expert + e}."
                if kind == "gate_up_proj":
                    yield CheckpointTensor(expert + "gate_proj.weight", param[e, :inter], (), (inter, param.shape[2]))
                    yield CheckpointTensor(expert + "up_proj.weight", param[e, inter:], (), (inter, param.shape[2]))
                else:
                    yield CheckpointTensor(expert + "down_proj.weight", param[e], (), tuple(param.shape[1:]))
        elif isinstance(module, ShardedLinear) and (module.shard[0] == 0 or kind == "weight"):
            dim, start, end, total = module.shard  # a bias is split only with the output rows
            shape = tuple(total if d == dim else n for d, n in enumerate(param.shape))
            yield CheckpointTensor(name, param, (slice(None),) * dim + (slice(start, end),), shape)
        else:
            yield CheckpointTensor(name, param, (), tuple(param.shape))


def other_ranks_experts(model: nn.Module) -> set[str]:
    """The checkpoint names of the routed experts that other ranks hold (a rank skips them)."""
    names = set()
    for module_name, module in model.named_modules():
        if hasattr(module, "first_expert"):
            held = range(module.first_expert, module.first_expert + module.gate_up_proj.shape[0])
            for e in set(range(module.num_experts)) - set(held):
                names.update(f"{module_name}.{e}.{w}_proj.weight" for w in ("gate", "up", "down"))
    return names


def weight_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: not a valid safetensors index ({e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} is missing")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (not a safetensors checkpoint)")


def checkpoint_args(path) -> ModelArgs:
    """The architecture of a checkpoint directory (its config.json)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    return ModelArgs.from_pretrained(path)


def load_weights(model: nn.Module, path, dtype=None, device="cpu", progress: bool | None = None) -> nn.Module:
    """Fill a model built on the meta device with the checkpoint's weights, in `dtype` (default: the
    checkpoint's torch_dtype) on `device`; a tensor-parallel rank reads only its part. Every parameter
    must come from the files; buffers that are not in them are left uninitialised for the model to
    compute. Returns the model."""
    path = Path(path)
    args = model.args
    dtype = parse_dtype(dtype) or parse_dtype(args.torch_dtype if args.torch_dtype != "None" else "float32")
    files = weight_files(path)
    model.to(dtype=dtype).to_empty(device=device)
    targets = {t.name: t for t in checkpoint_tensors(model)}
    if args.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    elsewhere = other_ranks_experts(model)
    total = sum(f.stat().st_size for f in files)
    show = progress if progress is not None else total > PROGRESS_BAR_BYTES
    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=len(targets), desc=f"Loading {path.name}", unit="tensor")
    seen, unexpected = set(), []
    with torch.no_grad():
        for file in files:
            try:
                with safe_open(file, framework="pt", device="cpu") as f:
                    for name in f.keys():
                        if name not in targets:
                            if not IGNORED.match(name) and name not in elsewhere:
                                unexpected.append(name)
                            continue
                        t = targets[name]
                        part = f.get_slice(name)
                        shape = tuple(part.get_shape())
                        if shape != t.shape:
                            raise CheckpointError(f"{file.name}: tensor '{name}' has shape {list(shape)}, "
                                                  f"the model expects {list(t.shape)}")
                        t.target.copy_(part[t.index] if t.index else f.get_tensor(name))  # only this rank's part
                        seen.add(name)
                        if bar is not None:
                            bar.update(1)
            except SafetensorError as e:
                raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from None
    if bar is not None:
        bar.close()
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]}"
                              + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    missing = [n for n in targets if n not in seen]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return model


def save_model(model: nn.Module, path, max_shard_size: int = 5 * 1024**3) -> None:
    """Write config.json, generation_config.json and the weights (sharded above max_shard_size) from
    the model's parameters, args and dtype."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.args.to_hf_config()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": model.args.bos_token_id, "eos_token_id": model.args.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    if getattr(model, "tp", None) is not None and model.tp.size > 1:
        raise ValueError("save_pretrained writes a whole model: save from a single process, not a tensor-parallel rank")
    for name, tensor, _, _ in checkpoint_tensors(model):
        if model.args.tie_word_embeddings and name == "lm_head.weight":
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        old.unlink(missing_ok=True)  # never leave stale shards beside the new ones
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, shard in zip(names, shards):
        # clone: one expert's slice shares storage with its stack, which safetensors refuses
        tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in shard}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = file
            total += t.numel() * t.element_size()
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


__all__ = ["CheckpointError", "ConfigError", "checkpoint_args", "load_weights", "save_model", "parse_dtype"]
