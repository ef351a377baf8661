"""Checkpoints in the official Hugging Face format: config.json plus one model.safetensors or
shards listed in model.safetensors.index.json. Loading fills a model built on the meta device
(DeepseekV2ForCausalLM.from_pretrained), each parameter once from the files (no second copy in
memory); routed experts, stored one tensor per expert in the files, are stacked into the model's
[E, ...] weights on the way in and unstacked on the way out. Under tensor parallelism a rank reads
only its part: its rows or columns of each sharded matrix (safetensors' get_slice) and its experts,
skipping the others'. FP8 weights (DeepSeek's layout: `weight` in e4m3 beside `weight_scale_inv`, one
scale per 128 x 128 block) load as they are; where the model and the files differ, the loader
converts: quantizes a float weight the model holds in FP8 (`--quantization fp8` of a bf16
checkpoint) and dequantizes an FP8 weight the model keeps in bf16, always over whole blocks of the
checkpoint's matrix, so a tensor-parallel part gets the very blocks a single process holds. This
module works on the model object it is given and does not import the model."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, ModelArgs
from .kernels.fp8 import BLOCK, FP8, cdiv, dequantize_weight, quantize_weight
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
        if hasattr(module, "first_expert"):  # the routed-expert stacks, or their FP8 block scales
            suffix = ".weight_scale_inv" if kind.endswith("_scale_inv") else ".weight"
            for e in range(param.shape[0]):  # this rank's experts: checkpoint ids first_expert + e
                expert = f"{module_name}.{module.first_expert + e}."
                if kind.startswith("gate_up_proj"):
                    half = param.shape[1] // 2
                    yield CheckpointTensor(expert + "gate_proj" + suffix, param[e, :half], (), (half, param.shape[2]))
                    yield CheckpointTensor(expert + "up_proj" + suffix, param[e, half:], (), (half, param.shape[2]))
                else:
                    yield CheckpointTensor(expert + "down_proj" + suffix, param[e], (), tuple(param.shape[1:]))
        elif isinstance(module, ShardedLinear) and (module.shard[0] == 0 or kind != "bias"):
            dim, start, end, total = module.shard  # a bias is split only with the output rows
            if kind == "weight_scale_inv":  # the blocks the part touches, whole
                start, end, total = start // BLOCK, cdiv(end, BLOCK), cdiv(total, BLOCK)
            shape = tuple(total if d == dim else n for d, n in enumerate(param.shape))
            yield CheckpointTensor(name, param, (slice(None),) * dim + (slice(start, end),), shape)
        else:
            yield CheckpointTensor(name, param, (), tuple(param.shape))


def whole_blocks(t: CheckpointTensor) -> tuple[tuple[slice, ...], tuple[slice, ...], tuple[slice, ...]]:
    """For a weight's part: (the checkpoint index of every 128 x 128 block the part touches, whole; the
    index of those blocks' scales; where the part lies within the blocks)."""
    if not t.index:
        return (), (), ()
    dim, part = len(t.index) - 1, t.index[-1]
    first, end = part.start // BLOCK * BLOCK, min(cdiv(part.stop, BLOCK) * BLOCK, t.shape[dim])
    lead = (slice(None),) * dim
    return (lead + (slice(first, end),), lead + (slice(part.start // BLOCK, cdiv(part.stop, BLOCK)),),
            lead + (slice(part.start - first, part.stop - first),))


def other_ranks_experts(model: nn.Module) -> set[str]:
    """The checkpoint names of the routed experts that other ranks hold (a rank skips them)."""
    names = set()
    for module_name, module in model.named_modules():
        if hasattr(module, "first_expert"):
            held = range(module.first_expert, module.first_expert + module.gate_up_proj.shape[0])
            for e in set(range(module.num_experts)) - set(held):
                names.update(f"{module_name}.{e}.{w}_proj.{kind}" for w in ("gate", "up", "down")
                             for kind in ("weight", "weight_scale_inv"))
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


def load_dtype(args: ModelArgs, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The dtype a model loads in: `dtype`, else the checkpoint's torch_dtype (float32 if it names none)."""
    return parse_dtype(dtype) or parse_dtype(args.torch_dtype if args.torch_dtype != "None" else "float32")


def load_weights(model: nn.Module, path, device="cpu", progress: bool | None = None) -> nn.Module:
    """Fill a model built on the meta device, in the dtypes it has (DeepseekV2ForCausalLM.from_pretrained
    sets them, FP8 included), with the checkpoint's weights on `device`; a tensor-parallel rank reads
    only its part. Every parameter must come from the files (an FP8 scale may come from quantizing
    its weight); buffers that are not in them are left uninitialised for the model to compute.
    Returns the model."""
    path = Path(path)
    files = weight_files(path)
    model.to_empty(device=device)
    targets = {t.name: t for t in checkpoint_tensors(model)}
    if model.args.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    elsewhere = other_ranks_experts(model)
    total = sum(f.stat().st_size for f in files)
    show = progress if progress is not None else total > PROGRESS_BAR_BYTES
    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=len(targets), desc=f"Loading {path.name}", unit="tensor")
    with ExitStack() as stack, torch.no_grad():
        located = {}  # checkpoint name -> (file, its open handle)
        for file in files:
            try:
                f = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            except SafetensorError as e:
                raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from None
            located.update((name, (file, f)) for name in f.keys())

        def read(name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:  # only this rank's part
            file, f = located[name]
            try:
                return f.get_slice(name)[index] if index else f.get_tensor(name)
            except SafetensorError as e:
                raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from None

        unexpected = [n for n in located if n not in targets and not IGNORED.match(n) and n not in elsewhere
                      and n.removesuffix("_scale_inv") not in targets]  # the scale of a weight dequantized below
        if unexpected:
            raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]}"
                                  + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
        missing = [n for n in targets if n not in located and not (n.endswith("_scale_inv") and
                                                                   n.removesuffix("_scale_inv") in located)]
        if missing:
            raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}"
                                  + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        for name, t in targets.items():
            if bar is not None:
                bar.update(1)
            if name not in located:
                continue  # a scale, made when its weight was quantized
            file, f = located[name]
            part = f.get_slice(name)
            if tuple(part.get_shape()) != t.shape:
                raise CheckpointError(f"{file.name}: tensor '{name}' has shape {list(part.get_shape())}, "
                                      f"the model expects {list(t.shape)}")
            scale_name = name + "_scale_inv"
            fp8_file = scale_name in located
            if fp8_file and part.get_dtype() != "F8_E4M3":
                raise CheckpointError(f"{file.name}: tensor '{name}' has a {scale_name} but is {part.get_dtype()}, "
                                      "not F8_E4M3")
            if fp8_file == (t.target.dtype == FP8):
                t.target.copy_(read(name, t.index))
                continue
            blocks, block_scales, inside = whole_blocks(t)
            if fp8_file:  # an FP8 weight the model keeps in bf16
                t.target.copy_(dequantize_weight(read(name, blocks), read(scale_name, block_scales))[inside])
            else:  # a float weight the model holds in FP8: quantized over the checkpoint's blocks
                q, scale = quantize_weight(read(name, blocks))
                t.target.copy_(q[inside])
                targets[scale_name].target.copy_(scale)
    if bar is not None:
        bar.close()
    return model


def write_config(model: nn.Module, path: Path) -> None:
    """config.json and generation_config.json from the model's args and dtype."""
    config = model.args.to_hf_config()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": model.args.bos_token_id, "eos_token_id": model.args.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


class ShardWriter:
    """Tensors written into safetensors shards of at most max_shard_size bytes as they come (one shard in
    memory at a time); close() gives the shards their names (model.safetensors, or
    model-0000i-of-0000n.safetensors and the index). Old shards in the directory are removed first, so
    none is left beside the new ones."""

    def __init__(self, path: Path, max_shard_size: int):
        self.path, self.max_shard_size = path, max_shard_size
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []  # (file under a temporary name, its tensors)
        for old in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
            old.unlink(missing_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        # clone: one expert's slice shares storage with its stack, which safetensors refuses
        self.pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self.pending_bytes += nbytes

    def _flush(self) -> None:
        file = self.path / f"model-part-{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, str(file), metadata={"format": "pt"})
        self.written.append((file, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.written:
            self._flush()
        if len(self.written) == 1:
            self.written[0][0].rename(self.path / SINGLE_FILE)
            return
        weight_map = {}
        for i, (file, names) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            file.rename(self.path / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def save_model(model: nn.Module, path, max_shard_size: int = 5 * 1024**3) -> None:
    """Write config.json, generation_config.json and the weights (sharded above max_shard_size) from
    the model's parameters, args and dtype."""
    path = Path(path)
    if getattr(model, "tp", None) is not None and model.tp.size > 1:
        raise ValueError("save_pretrained writes a whole model: save from a single process, not a tensor-parallel rank")
    path.mkdir(parents=True, exist_ok=True)
    write_config(model, path)
    writer = ShardWriter(path, max_shard_size)
    for name, tensor, _, _ in checkpoint_tensors(model):
        if not (model.args.tie_word_embeddings and name == "lm_head.weight"):
            writer.add(name, tensor)
    writer.close()


def quantize_checkpoint(model: nn.Module, source, target, max_shard_size: int = 5 * 1024**3) -> None:
    """Write the checkpoint at `source` again at `target` with the weights `model` holds in FP8 quantized
    (DeepSeek's layout, as loading with quantization="fp8" quantizes them), one tensor at a time: the
    memory of a shard, not of the model (V2's 236B fits where its weights do not). `model` is the
    checkpoint's model built on the meta device with FP8 weights (use_fp8): it says which tensors are FP8,
    which others the files must hold, and in which dtype. A tensor already in FP8 is copied with its scale."""
    source, target = Path(source), Path(target)
    expected = {t.name: t for t in checkpoint_tensors(model)}
    if model.args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    target.mkdir(parents=True, exist_ok=True)
    write_config(model, target)
    writer, seen = ShardWriter(target, max_shard_size), set()
    for file in weight_files(source):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if IGNORED.match(name):
                        continue
                    tensor, want = f.get_tensor(name), expected.get(name)
                    if want is None and not name.endswith("_scale_inv"):
                        raise CheckpointError(f"{file.name}: unexpected tensor '{name}'")
                    if want is not None and tuple(tensor.shape) != want.shape:
                        raise CheckpointError(f"{file.name}: tensor '{name}' has shape {list(tensor.shape)}, "
                                              f"the model expects {list(want.shape)}")
                    seen.add(name)
                    if want is None or tensor.dtype == FP8:  # a scale, or a weight in FP8 already
                        writer.add(name, tensor)
                    elif want.target.dtype == FP8:
                        q, scale = quantize_weight(tensor)
                        writer.add(name, q)
                        writer.add(name + "_scale_inv", scale)
                    else:
                        writer.add(name, tensor.to(want.target.dtype))
        except SafetensorError as e:
            raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from None
    missing = [n for n in expected if n not in seen and not n.endswith("_scale_inv")]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    writer.close()


__all__ = ["CheckpointError", "ConfigError", "checkpoint_args", "load_weights", "save_model", "quantize_checkpoint",
           "parse_dtype"]
