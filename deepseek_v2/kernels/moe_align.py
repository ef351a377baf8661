"""The fused MoE's first step (kernels/moe.py): the T*K rows of a step's picks (row t*K + k is token t's
k-th pick) sorted by expert, each expert's run padded to a multiple of BLOCK_M with the sentinel T*K,
the expert of every BLOCK_M block and the padded total: one small Triton kernel, no host
synchronisation (CUDA-graph capturable for a fixed token count). Picks with id -1 (under expert
parallelism: an expert on another rank) get their own bucket E, after the E experts' runs.

Letters: T tokens, K picks per token, E experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import pdl_launch, wait_for_prior_kernels


# num_rows (tokens x top-k) changes with every step: not specialised on (a multiple of 16 or not), so
# that one compiled variant serves every step (model_runner._warm_up_steps)
@triton.jit(do_not_specialize=["num_rows"])
def _moe_align_kernel(topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, num_rows, num_experts,
                      BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr = False):
    """One program per bucket (the experts, then bucket num_experts for the -1 rows); each recounts
    all experts (cheap) to find where its run starts."""
    wait_for_prior_kernels(PDL)
    e = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_rows, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_rows, other=0).to(tl.int32)
        counts += tl.histogram(ids, BLOCK_E, mask=(offs < num_rows) & (ids >= 0))  # -1 is out of range
    # the -1 rows are all the others: counted without widening the histogram past the E experts
    num_missing = num_rows - tl.sum(counts, axis=0)
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    run_start = tl.sum(tl.where(offs_e < e, padded, 0), axis=0)  # for bucket E: after every expert
    count = tl.where(e < num_experts, tl.sum(tl.where(offs_e == e, counts, 0), axis=0), num_missing)
    run_end = run_start + tl.cdiv(count, BLOCK_M) * BLOCK_M
    if e == 0:
        tl.store(num_padded_ptr, tl.sum(padded, axis=0) + tl.cdiv(num_missing, BLOCK_M) * BLOCK_M)

    target = tl.where(e < num_experts, e, -1)  # the id this program collects
    seen = tl.zeros([], dtype=tl.int32)  # this bucket's rows placed so far (row order kept)
    for start in range(0, num_rows, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_rows, other=-2).to(tl.int32)  # -2: no target
        hit = (ids == target).to(tl.int32)
        pos = run_start + seen + tl.cumsum(hit, axis=0) - 1
        tl.store(sorted_ids_ptr + pos, offs, mask=hit > 0)
        seen += tl.sum(hit, axis=0)
    offs_m = tl.arange(0, BLOCK_M)
    tl.store(sorted_ids_ptr + run_start + count + offs_m, num_rows, mask=count + offs_m < run_end - run_start)
    for block in range(run_start // BLOCK_M, run_end // BLOCK_M, BLOCK_T):
        offs_b = block + tl.arange(0, BLOCK_T)
        tl.store(expert_ids_ptr + offs_b, e, mask=offs_b < run_end // BLOCK_M)


class MoeAlignment(NamedTuple):
    sorted_ids: torch.Tensor   # [max_padded] int32: row ids grouped by expert; padding holds T*K
    expert_ids: torch.Tensor   # [max_padded // block_m] int32: the expert of each block (E: the -1 rows)
    num_padded: torch.Tensor   # [1] int32: the used length of sorted_ids (entries past it are garbage)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """Sort the T*K rows (row t*K + k) by expert, padding each expert's run to a multiple of block_m.

    topk_ids [T, K] must lie in [0, num_experts) or be -1. The rows with id -1 form one more run,
    of bucket num_experts, after all the experts' runs. Rows keep their order within a run.
    """
    flat = topk_ids.reshape(-1)
    rows = flat.numel()
    # each touched bucket (the experts and the -1 rows) wastes < block_m slots: a static bound, so
    # the grid needs no host sync
    max_padded = triton.cdiv(rows + min(num_experts + 1, rows) * (block_m - 1), block_m) * block_m
    def new(size, dtype=torch.int32):  # every entry a later step reads gets written: no fill
        return torch.empty(size, dtype=dtype, device=flat.device)

    out = MoeAlignment(new(max_padded), new(max_padded // block_m), new(1))
    _moe_align_kernel[(num_experts + 1,)](
        flat, out.sorted_ids, out.expert_ids, out.num_padded, rows, num_experts,
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_M=block_m, BLOCK_T=1024, num_warps=4,
        **pdl_launch(flat.device, topk_ids.shape[0]),
    )
    return out
