"""Tensor and expert parallelism: which part of each weight a rank holds, and the collectives.

The layout (docs/parallel.md has the table):
- attention split by heads: q_proj / q_b_proj and kv_b_proj by output rows, o_proj by input columns,
  then one all-reduce; q_a_proj, kv_a_proj_with_mqa, the norms and the latent cache replicated (the
  latent has a single head);
- routed experts partitioned whole across ranks (expert parallel); shared experts and dense MLPs split
  by the intermediate dimension; the MoE layer sums routed and shared outputs with one all-reduce;
- the router replicated and computed identically on every rank;
- the embedding replicated (a lookup reads only the rows it uses), the LM head split by vocabulary
  rows with the logits gathered (each rank reads 1/N of the largest matrix of a decode step).

Every split gives ranks contiguous ranges whose sizes differ by at most one (`split`), so 160 experts
over 6 ranks is 27, 27, 27, 27, 26, 26. With one rank every collective is a no-op and every module
holds the whole weight: the model reads exactly like the single-device model.

The linear layers (`Linear`, and `ShardedLinear` for the split ones) may hold FP8 weights with one
scale per 128 x 128 block (kernels/fp8.py); a rank's part of a split matrix keeps every block it
touches, whole, so a split that cuts a block needs no requantization: the part records where it
starts inside its first block (`block_offset`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .kernels import REFERENCE
from .kernels import fp8
from .kernels.fp8 import BLOCK, SCALED_MM_K, pad_columns, quantize_weight
from .plan import split  # in plan.py, which sizes the same parts without importing torch


@dataclass(frozen=True)
class Launch:
    """What a launcher (torchrun) told this process: its rank among `world` processes, of which
    `local_world` run on this node. One process when nothing launched it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1


def launch_env() -> Launch:
    """The variables torchrun sets (the one place the environment is read, for training and serving)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return Launch(int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world)))


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group. Without a group (the default: one process)
    the collectives are skipped; with one they run, even over a single rank (so that a one-GPU run
    exercises them, CUDA graphs included)."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def part(self, n: int) -> tuple[int, int]:
        """This rank's [start, end) of n items (heads, experts, intermediate columns, vocabulary rows)."""
        return split(n, self.size, self.rank)

    def _via_host(self, x: torch.Tensor) -> bool:
        """gloo reduces host memory: ranks that share a GPU (gloo on CUDA tensors) go through the host."""
        return x.is_cuda and dist.get_backend(self.group) == "gloo"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        if self.group is not None:
            if self._via_host(x):
                x.copy_(self.all_reduce(x.cpu()))
            else:
                dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Each rank's x [..., n_r] (its part of `total` along the last dim) -> [..., total] on every rank."""
        if self.group is None:
            return x
        if self._via_host(x):
            return self.all_gather_last(x.cpu(), total).to(x.device)
        width = split(total, self.size, 0)[1]  # the largest part; smaller ones are padded to it
        padded = F.pad(x, (0, width - x.shape[-1])).contiguous()
        gathered = torch.empty((self.size * padded.shape[0], *padded.shape[1:]), dtype=x.dtype, device=x.device)
        all_gather_single(gathered, padded, group=self.group)  # the ranks' parts along dim 0
        gathered = gathered.view(self.size, *padded.shape)
        bounds = [split(total, self.size, r) for r in range(self.size)]
        return torch.cat([gathered[r, ..., :end - start] for r, (start, end) in enumerate(bounds)], dim=-1)


SINGLE = TensorParallel()
# all_gather_single is all_gather_into_tensor's newer name (torch 2.13 deprecates the old one; 2.11 lacks the new)
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Linear(nn.Linear):
    """nn.Linear whose weight can be FP8: `to_fp8` turns `weight` into float8_e4m3fn beside
    `weight_scale_inv` (one fp32 scale per 128 x 128 block, the checkpoints' names), and the layer then
    multiplies through its kernel set's FP8 GEMM. block_offset: (rows, columns) of the first block
    that lie before this layer's part of the checkpoint's matrix (a tensor-parallel part)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 block_offset: tuple[int, int] = (0, 0)):
        super().__init__(in_features, out_features, bias=bias)
        self.register_parameter("weight_scale_inv", None)
        self.block_offset = block_offset
        self.kernels = REFERENCE

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x W^T (+ bias); x_fp8: x already quantized, for an FP8 weight (the kernels' linear's x_fp8)."""
        return self.kernels.linear(x, self.weight, self.bias, self.weight_scale_inv, self.block_offset, x_fp8=x_fp8)

    @torch.no_grad()
    def to_fp8(self) -> None:
        """FP8 weights: the weight quantized (on the meta device, before loading: just the new shapes)."""
        q, scale = quantize_weight(self.weight, self.block_offset)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(scale, requires_grad=False)

    @torch.no_grad()
    def pad_columns(self) -> None:
        """Inference, FP8: a weight whose K is not a multiple of fp8.SCALED_MM_K gets zero columns after
        its own (fp8.pad_columns), so that cuBLAS's FP8 GEMM takes it at many rows; the parameters keep
        their shapes and values (views). Not a weight that is a view of a fused matrix (fuse_rows)."""
        w, s = self.weight, self.weight_scale_inv
        if (not fp8.PAD_FOR_SCALED_MM or s is None or self.block_offset != (0, 0) or w.shape[1] % SCALED_MM_K == 0
                or not w.is_contiguous()
                or w.untyped_storage().nbytes() != w.numel() * w.element_size() or not s.is_contiguous()):
            return
        self.weight, self.weight_scale_inv = pad_columns(w, s)


class ShardedLinear(Linear):
    """A linear layer holding rows [start, end) of the checkpoint's weight (dim 0: output features) or
    columns (dim 1: input features). `shard` says which, in the checkpoint's coordinates, for the
    loader. With input features split, the outputs are partial sums: `reduce` all-reduces them
    (before the bias, which only the whole sum gets); without it the caller reduces once for several."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dim: int, units: int, unit_size: int,
                 tp: TensorParallel, reduce: bool = True):
        start, end = tp.part(units)
        local = (end - start) * unit_size
        offset = (start * unit_size % BLOCK, 0) if dim == 0 else (0, start * unit_size % BLOCK)
        super().__init__(local if dim == 1 else in_features, local if dim == 0 else out_features, bias=bias,
                         block_offset=offset)
        self.shard = (dim, start * unit_size, end * unit_size, units * unit_size)  # dim, [start, end), whole
        self.tp, self.reduce = tp, reduce

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.shard[0] == 0 or self.tp.group is None:
            return super().forward(x, x_fp8)
        y = self.kernels.linear(x, self.weight, None, self.weight_scale_inv, self.block_offset, x_fp8=x_fp8)
        if self.reduce:
            self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def fuse_rows(layers: list[Linear]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Inference: the weights of layers that multiply the same input stacked into one matrix (and their
    FP8 block scales likewise), each layer's weight becoming a view of it: one GEMM instead of several,
    no extra memory, parameter names unchanged. Returns (weight, weight_scale_inv or None), or None
    (nothing done) when a layer has a bias, or when FP8 blocks would straddle two layers (a part that
    starts inside a block, or rows that are not whole blocks before the last layer)."""
    scaled = [layer.weight_scale_inv is not None for layer in layers]
    if any(layer.bias is not None for layer in layers) or (any(scaled) and not (
            all(scaled) and all(layer.block_offset == (0, 0) for layer in layers)
            and all(layer.out_features % BLOCK == 0 for layer in layers[:-1]))):
        return None
    names = ["weight", "weight_scale_inv"] if scaled[0] else ["weight"]
    fused = {name: torch.cat([getattr(layer, name) for layer in layers]) for name in names}
    for name in names:
        views = fused[name].split([getattr(layer, name).shape[0] for layer in layers])
        for layer, view in zip(layers, views):
            setattr(layer, name, nn.Parameter(view, requires_grad=False))
    return fused["weight"], fused.get("weight_scale_inv")


def column_parallel(in_features: int, units: int, unit_size: int, tp: TensorParallel, bias: bool = False):
    """Output features split: `units` groups of `unit_size` rows (heads, intermediate columns, tokens of
    the vocabulary) divided between ranks."""
    return ShardedLinear(in_features, units * unit_size, bias, 0, units, unit_size, tp)


def row_parallel(units: int, unit_size: int, out_features: int, tp: TensorParallel, bias: bool = False,
                 reduce: bool = True):
    """Input features split (the outputs of a column-parallel layer): partial sums, all-reduced unless
    reduce=False."""
    return ShardedLinear(units * unit_size, out_features, bias, 1, units, unit_size, tp, reduce)


def split_parameters(model: nn.Module) -> set[str]:
    """The names of the parameters split between ranks (the rest are replicated): sharded linear
    weights and their scales (and the biases of output-split ones) and the routed-expert stacks."""
    names = set()
    for name, _ in model.named_parameters():
        module_name, _, kind = name.rpartition(".")
        module = model.get_submodule(module_name)
        if (isinstance(module, ShardedLinear) and (module.shard[0] == 0 or kind != "bias")) or \
                hasattr(module, "first_expert"):
            names.add(name)
    return names
