"""The pieces of absorbed MLA decode's split sequences (kernels/mla_decode.py): how a sequence's tokens are
cut into pieces, which the split kernel shares, and the merge of the pieces' partial outputs by their
log-sum-exp, for few sequences with W_UV's product in the same launch.

For each (sequence, head, piece) the split kernel stores the piece's softmax-normalised output and its
log-sum-exp in log2 units: mid_o [N, H, S, BLOCK_R] and mid_lse [N, H, S] fp32. Splits past a sequence's
last piece store nothing; the merge reads only the pieces. No host synchronisation: the launches are
CUDA-graph capturable for fixed shapes.

Letters: N sequences, H heads, R kv_lora_rank, S kv splits, DV value dims a head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pdl_launch, prefetch_l2, prefetch_launch, wait_for_prior_kernels

_MERGE_PIECES = tl.constexpr(16)  # partials the merge loads at once ([16, 512] fp32: 64 registers a thread)


@triton.jit
def _split_len(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """Tokens per split of a seq_len-token sequence: its num_splits equal shares in whole tiles (at least one
    tile). Its pieces, the splits that hold its tokens: cdiv(seq_len, this) <= num_splits. The split count is
    set on the host for the longest context a launch may see (a CUDA graph's: the engine's max_model_len, 128
    splits from 16K on), so a short sequence leaves most splits empty: those store nothing and the merge
    reads only the pieces (on an H200, a 1K-token sequence in 128 splits took 24.0 us before, 11.8 after;
    docs/benchmarks.md, "MLA decode's empty splits")."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, BLOCK_N)


@triton.jit
def _merge_splits(mid_o_ptr, mid_lse_ptr, seq_lens_ptr, seq, head, num_heads, num_splits, BLOCK_R: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """One (sequence, head)'s output [BLOCK_R] fp32: sum_s 2^lse_s o_s / sum_s 2^lse_s over the partials of
    its pieces (the splits that hold its tokens, _split_len), _MERGE_PIECES at a time (their loads issued
    together: one piece a step waited on L2 once a piece, most of the merge's time at 32 pieces), as an
    online merge; length 0 gives zeros."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_s = tl.arange(0, _MERGE_PIECES)
    base = ((seq * num_heads + head) * num_splits).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    pieces = tl.cdiv(seq_len, _split_len(seq_len, num_splits, BLOCK_N))
    m = float("-inf")
    denom = 0.0
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for first in range(0, pieces, _MERGE_PIECES):
        s = first + offs_s
        mask_s = s < pieces
        lse = tl.load(mid_lse_ptr + base + s, mask=mask_s, other=float("-inf"))  # every piece's is finite
        o = tl.load(mid_o_ptr + (base + s)[:, None] * BLOCK_R + offs_r[None, :], mask=mask_s[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        alpha = tl.exp2(m - m_new)
        weight = tl.exp2(lse - m_new)                                              # 0 past the pieces
        acc = acc * alpha + tl.sum(weight[:, None] * o, axis=0)
        denom = denom * alpha + tl.sum(weight, axis=0)
        m = m_new
    return acc / tl.where(denom > 0, denom, 1.0)


@triton.jit(do_not_specialize=["num_splits"])
def _mla_decode_merge_kernel(
    mid_o_ptr, mid_lse_ptr, seq_lens_ptr, out_ptr, num_heads, num_splits, stride_o_n, stride_o_h,
    R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False,
):
    """out[seq, head] = its splits' partials merged, in out's dtype."""
    wait_for_prior_kernels(PDL)
    head = tl.program_id(0)
    seq = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    out = _merge_splits(mid_o_ptr, mid_lse_ptr, seq_lens_ptr, seq, head, num_heads, num_splits, BLOCK_R, BLOCK_N)
    tl.store(out_ptr + seq * stride_o_n + head * stride_o_h + offs_r, out.to(out_ptr.dtype.element_ty),
             mask=offs_r < R)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_project_kernel(
    mid_o_ptr, mid_lse_ptr, seq_lens_ptr, w_ptr, out_ptr, num_heads, num_splits, DV, stride_wh, stride_wv,
    stride_o_n, stride_o_h, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False,
):
    """out[seq, head, v block] = w[head, v block] @ (its splits' partials merged, rounded to out's dtype
    as the latent output is): the merge and absorbed decode's W_UV product in one launch, for few
    sequences. Each of a head's DV / BLOCK_V programs merges the head's partials again (from L2).
    PREFETCH: its rows of w asked of L2 before the wait (launch.PREFETCH_WEIGHTS)."""
    head = tl.program_id(0)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    seq = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    if PREFETCH:  # a row asked for 32 values at a time (an fp32 line)
        lines = tl.arange(0, (BLOCK_R + 31) // 32) * 32
        prefetch_l2(w_ptr + head * stride_wh + offs_v[:, None] * stride_wv + lines[None, :],
                    (offs_v < DV)[:, None] & (lines < R)[None, :])
    wait_for_prior_kernels(PDL)
    o = _merge_splits(mid_o_ptr, mid_lse_ptr, seq_lens_ptr, seq, head, num_heads, num_splits, BLOCK_R, BLOCK_N)
    o = o.to(out_ptr.dtype.element_ty).to(tl.float32)
    mask_v = offs_v < DV
    w = tl.load(w_ptr + head * stride_wh + offs_v[:, None] * stride_wv + offs_r[None, :],
                mask=mask_v[:, None] & (offs_r < R)[None, :], other=0.0)
    y = tl.sum(w.to(tl.float32) * o[None, :], axis=1)
    tl.store(out_ptr + seq * stride_o_n + head * stride_o_h + offs_v, y.to(out_ptr.dtype.element_ty), mask=mask_v)


def merge(mid_o: torch.Tensor, mid_lse: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor, num_splits: int,
          block_n: int) -> None:
    """out [N, H, R] (last dim contiguous) = each (sequence, head)'s pieces merged, in out's dtype; block_n:
    the split kernel's tile (the pieces are whole tiles)."""
    N, H, R = out.shape
    _mla_decode_merge_kernel[(H, N)](
        mid_o, mid_lse, seq_lens, out, H, num_splits, out.stride(0), out.stride(1),
        R=R, BLOCK_R=mid_o.shape[-1], BLOCK_N=block_n, num_warps=4, **pdl_launch(out.device, N),
    )


def merge_and_project(mid_o: torch.Tensor, mid_lse: torch.Tensor, seq_lens: torch.Tensor, w_uv: torch.Tensor,
                      out: torch.Tensor, num_splits: int, block_n: int, block_v: int) -> None:
    """out [N, H, DV] = w_uv [H, DV, R] (last dim contiguous) times each (sequence, head)'s pieces merged
    (rounded to out's dtype first, as the latent output is), in one launch: block_v value columns a
    program, each merging its head's pieces again."""
    N, H, dv = out.shape
    _merge_project_kernel[(H, triton.cdiv(dv, block_v), N)](
        mid_o, mid_lse, seq_lens, w_uv, out, H, num_splits, dv, w_uv.stride(0), w_uv.stride(1), out.stride(0),
        out.stride(1), R=w_uv.shape[2], BLOCK_R=mid_o.shape[-1], BLOCK_V=block_v, BLOCK_N=block_n,
        num_warps=4, **pdl_launch(out.device, N), **prefetch_launch(out.device, N),
    )
