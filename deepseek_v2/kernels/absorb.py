"""W_UK folded into absorbed decode's queries, q_lat[n, h] = q_nope[n, h] @ w_uk[h], for few sequences in
one Triton launch; more sequences go to torch's batched matmul.

At few sequences the product is a batch of GEMVs over 2 MB (V2-Lite: 16 heads of 128 x 512 bf16) that
cuBLAS runs as one short kernel between two of ours (MLA prepare, MLA decode). Here each program holds one
head's 128 x BLOCK_R slice of w_uk and takes every sequence's query through it, fp32 sums, one rounding
to q_nope's dtype (cuBLAS's arithmetic, summed in another order). Launched as ours are (programmatic
dependent launch at few rows: launch.py), it keeps decode's chain of kernels ours from the attention's
projection to its output.

Letters: N sequences, H heads, DN = qk_nope_head_dim, R = kv_lora_rank.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .launch import pdl_launch, prefetch_l2, prefetch_launch, wait_for_prior_kernels

# Up to this many sequences the product runs in our launch; past it (and at 0) torch.bmm. One: on an H200
# at the V2-Lite shape, batch-1 decode took 2.50 ms/token with it against 2.52 (and 2.45 against 2.53 with
# the two settings beside it, mla_decode.PROJECT_IN_MERGE_MAX_SEQS and moe.SWAP_AB_MAX_BLOCK_M), while 8
# sequences lost about 1% with it at 16 (docs/benchmarks.md, "Batch 1's attention in our launches").
ABSORB_MAX_SEQS = 1
_BLOCK_R = 64


@triton.jit
def _absorb_query_kernel(q_ptr, w_ptr, out_ptr, N, R, stride_qn, stride_qh, stride_wh, stride_wd, stride_on,
                         stride_oh, DN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                         PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    """Program (head, r block): out[n, head, r block] = q[n, head] @ w[head][:, r block] for every n.
    PREFETCH: its slice of w asked of L2 before the wait (launch.PREFETCH_WEIGHTS)."""
    head = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d, mask_r = offs_d < DN, offs_r < R
    if PREFETCH:  # a row of the slice asked for 32 values at a time (an fp32 line)
        lines = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R // 32) * 32
        prefetch_l2(w_ptr + head * stride_wh + offs_d[:, None] * stride_wd + lines[None, :],
                    mask_d[:, None] & (lines < R)[None, :])
    wait_for_prior_kernels(PDL)
    w = tl.load(w_ptr + head * stride_wh + offs_d[:, None] * stride_wd + offs_r[None, :],
                mask=mask_d[:, None] & mask_r[None, :], other=0.0).to(tl.float32)          # [BLOCK_D, BLOCK_R]
    for n in range(N):
        q = tl.load(q_ptr + n * stride_qn + head * stride_qh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        out = tl.sum(q[:, None] * w, axis=0)  # fp32 products and sums (no dot: nothing for the interpreter to upcast)
        tl.store(out_ptr + n * stride_on + head * stride_oh + offs_r, out.to(out_ptr.dtype.element_ty), mask=mask_r)


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_lat [N, H, R] = q_nope [N, H, DN] @ w_uk [H, DN, R] per head, in q_nope's dtype; same contract as
    reference.absorb_query. Both may be strided views (the last dim contiguous); our launch for N in
    [1, ABSORB_MAX_SEQS], the reference's batched matmul otherwise."""
    N, H, DN = q_nope.shape
    if w_uk.dim() != 3 or w_uk.shape[:2] != (H, DN) or w_uk.dtype != q_nope.dtype or w_uk.device != q_nope.device:
        raise ValueError(f"absorb_query: expected w_uk [{H}, {DN}, R] {q_nope.dtype} on q_nope's device; got "
                         f"{tuple(w_uk.shape)} {w_uk.dtype} on {w_uk.device}")
    if not 1 <= N <= ABSORB_MAX_SEQS or q_nope.stride(2) != 1 or w_uk.stride(2) != 1:
        return reference.absorb_query(q_nope, w_uk)
    R = w_uk.shape[2]
    out = q_nope.new_empty(N, H, R)
    _absorb_query_kernel[(H, triton.cdiv(R, _BLOCK_R))](
        q_nope, w_uk, out, N, R, q_nope.stride(0), q_nope.stride(1), w_uk.stride(0), w_uk.stride(1),
        out.stride(0), out.stride(1), DN=DN, BLOCK_D=triton.next_power_of_2(DN), BLOCK_R=_BLOCK_R,
        num_warps=4, **pdl_launch(q_nope.device, N), **prefetch_launch(q_nope.device, N),
    )
    return out
