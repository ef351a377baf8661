"""Causal attention of a step's prefill sequences, packed, in one Triton launch: FlashAttention-2's
algorithm (after Triton's fused-attention tutorial) at MLA's head dims as they are.

Why a kernel of our own rather than flash's varlen call (kernels/prefill.py runs this one on GPUs):
flash needs one head dim for q, k and v, so V (128 wide) is padded to the query's 192 and a fifth of
the value product's work is on zeros; here V keeps its width. On an H200 it took half flash's time on
every workload of scripts/prefill_attention_variants.py (80 prompts of ~200 tokens 0.31 ms against
0.56; 4 x 4096 0.76 against 1.53; a 16K chunk after 112K cached 44.6 against 79.0).

A query/key head of width d is read as two tiles whose dot products add, d = D_FIRST + D_REST with
D_FIRST the largest power of two <= d (MLA's 192 = 128 + 64: the no-position part and the rotary
part), because a Triton tile's width is a power of two.

One program: BLOCK_M queries of one head of one sequence. It walks the keys BLOCK_N at a time with an
online softmax in fp32 (exp2, log2 units): first the key blocks every query of the block sees (no
mask), then the few along the diagonal (masked). The causal mask is aligned to the end, as the
contract says: query i of a sequence with C cached tokens sees keys 0 .. C + i. A sequence's query
blocks are handed out from the last (the most keys) to the first, every head's block before the next
block, so the longest programs start first and the short ones fill the tail. Grid: (heads, query
blocks of the longest sequence, sequences); the programs past a shorter sequence's end return at
once. No host synchronisation beyond the host lists of lengths.

Letters: Tq packed queries, Tk packed keys, H heads, d the query/key head dim, dv the value head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .launch import hopper_class, pdl_launch, tma_aligned, wait_for_prior_kernels

_LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr, rows_mask, MASK_ROWS: tl.constexpr):
    """A [rows, BLOCK_D] tile; columns >= D (a width that is not a power of two) and masked rows read as 0."""
    if BLOCK_D == D:
        if MASK_ROWS:
            return tl.load(ptrs, mask=rows_mask[:, None], other=0.0)
        return tl.load(ptrs)
    if MASK_ROWS:
        return tl.load(ptrs, mask=rows_mask[:, None] & (offs_d < D)[None, :], other=0.0)
    return tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)


@triton.jit
def _key_tile(ptr, desc, key_rows, first_row, head, col, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr,
              in_range, MASKED: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr):
    """Columns col .. col + BLOCK_D of BLOCK_N keys (or values) of one head: through the tensor-memory
    accelerator (desc: [packed keys, heads, width], rows past the whole tensor read as 0, the next
    sequence's rows as they are: the caller masks them), or with pointers (ptr: this head's column col
    of the sequence's key 0; rows past the sequence read as 0 when MASKED)."""
    if TMA:
        return tl.reshape(desc.load([first_row, head, col]), [BLOCK_N, BLOCK_D])
    return _load_tile(ptr + key_rows[:, None] + offs_d[None, :], offs_d, D, BLOCK_D, in_range, MASKED)


@triton.jit
def _attend_keys(acc, l_i, m_i, q_first, q_rest, k_ptr, v_ptr, k_desc, k_rest_desc, v_desc, k_start, head,
                 key_start, key_end, key_len, rows, sm_scale_log2, stride_kt, stride_vt, offs_df, offs_dr, offs_dv,
                 D_FIRST: tl.constexpr, D_REST: tl.constexpr, D_V: tl.constexpr,
                 BLOCK_FIRST: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """The online softmax over keys key_start .. key_end (whole BLOCK_N tiles unless MASKED: then the
    causal mask, keys <= rows, and keys < key_len). k_ptr / v_ptr point at this head's key 0."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(key_start, key_end, BLOCK_N):
        keys = start + offs_n
        in_range = keys < key_len
        first_row = k_start + start  # in the packed tensors (TMA)
        k_first = _key_tile(k_ptr, k_desc, keys.to(tl.int64) * stride_kt, first_row, head, 0, offs_df, D_FIRST,
                            BLOCK_FIRST, in_range, MASKED, TMA, BLOCK_N)
        v = _key_tile(v_ptr, v_desc, keys.to(tl.int64) * stride_vt, first_row, head, 0, offs_dv, D_V, BLOCK_V,
                      in_range, MASKED, TMA, BLOCK_N)
        if UPCAST_DOT:  # Triton 3.6's interpreter multiplies bf16 as raw uint16 bits
            k_first, v = k_first.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q_first, tl.trans(k_first), input_precision=DOT_PRECISION)
        if D_REST > 0:
            k_rest = _key_tile(k_ptr + D_FIRST, k_rest_desc, keys.to(tl.int64) * stride_kt, first_row, head, D_FIRST,
                               offs_dr, D_REST, BLOCK_REST, in_range, MASKED, TMA, BLOCK_N)
            if UPCAST_DOT:
                k_rest = k_rest.to(tl.float32)
            qk = tl.dot(q_rest, tl.trans(k_rest), acc=qk, input_precision=DOT_PRECISION)
        if MASKED:
            visible = (keys[None, :] <= rows[:, None]) & in_range[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        # the scale applied inside the exponent's argument (one multiply-add an element); every row has
        # seen a key by its first tile (key 0 is visible to all), so m_new is finite
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * sm_scale_log2)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * sm_scale_log2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Nothing that changes from step to step is a kernel argument Triton specialises on (the lengths are read
# from cu_query / cu_key), so one compiled variant serves every step of a model.
@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, k_rest_desc, v_desc, out_ptr, cu_query_ptr, cu_key_ptr, sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    D_FIRST: tl.constexpr, D_REST: tl.constexpr, D_V: tl.constexpr,
    BLOCK_FIRST: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    wait_for_prior_kernels(PDL)
    head = tl.program_id(0)
    seq = tl.program_id(2)
    q_start = tl.load(cu_query_ptr + seq)
    q_len = tl.load(cu_query_ptr + seq + 1) - q_start
    k_start = tl.load(cu_key_ptr + seq)
    k_len = tl.load(cu_key_ptr + seq + 1) - k_start
    num_blocks = tl.cdiv(q_len, BLOCK_M)
    if tl.program_id(1) >= num_blocks:
        return
    first_row = (num_blocks - 1 - tl.program_id(1)) * BLOCK_M  # the last block first: the most keys
    context = k_len - q_len

    offs_m = first_row + tl.arange(0, BLOCK_M)
    mask_m = offs_m < q_len
    offs_df = tl.arange(0, BLOCK_FIRST)
    offs_dr = tl.arange(0, BLOCK_REST)
    offs_dv = tl.arange(0, BLOCK_V)
    q_rows = q_ptr + (q_start + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh
    q_first = _load_tile(q_rows + offs_df[None, :], offs_df, D_FIRST, BLOCK_FIRST, mask_m, True)
    if D_REST > 0:
        q_rest = _load_tile(q_rows + D_FIRST + offs_dr[None, :], offs_dr, D_REST, BLOCK_REST, mask_m, True)
    else:  # a power-of-two head dim: one tile (this one is never read)
        q_rest = tl.zeros([BLOCK_M, BLOCK_REST], dtype=q_first.dtype)
    if UPCAST_DOT:
        q_first, q_rest = q_first.to(tl.float32), q_rest.to(tl.float32)

    k_head = k_ptr + k_start.to(tl.int64) * stride_kt + head * stride_kh
    v_head = v_ptr + k_start.to(tl.int64) * stride_vt + head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    # keys 0 .. context + first_row are visible to every query of the block (<= k_len, as first_row < q_len);
    # whole tiles of them need no mask, the rest up to the block's last query's keys do
    unmasked_end = (context + first_row + 1) // BLOCK_N * BLOCK_N
    end = tl.minimum(k_len, context + first_row + BLOCK_M)
    rows = context + offs_m  # the last key each query sees
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q_first, q_rest, k_head, v_head, k_desc, k_rest_desc, v_desc,
                                 k_start, head, 0, unmasked_end, k_len, rows, sm_scale_log2, stride_kt, stride_vt,
                                 offs_df, offs_dr, offs_dv, D_FIRST, D_REST, D_V, BLOCK_FIRST, BLOCK_REST, BLOCK_V,
                                 BLOCK_N, False, TMA, UPCAST_DOT, DOT_PRECISION)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q_first, q_rest, k_head, v_head, k_desc, k_rest_desc, v_desc,
                                 k_start, head, unmasked_end, end, k_len, rows, sm_scale_log2, stride_kt, stride_vt,
                                 offs_df, offs_dr, offs_dv, D_FIRST, D_REST, D_V, BLOCK_FIRST, BLOCK_REST, BLOCK_V,
                                 BLOCK_N, True, TMA, UPCAST_DOT, DOT_PRECISION)
    out = acc / l_i[:, None]
    out_ptrs = out_ptr + (q_start + offs_m).to(tl.int64)[:, None] * stride_ot + head * stride_oh + offs_dv[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_dv < D_V)[None, :])


# From this many keys in a step's longest sequence, K and V go through TMA (the bf16 / fp16 launch at
# wide heads): on an H200, one 16K chunk after 112K cached keys took 41.6 ms with it and 45.5 ms
# without; at 4 x 4096 tokens the two were equal (scripts/prefill_attention_variants.py --sweep).
TMA_FROM_KEYS = 16384


def default_config(head_dim: int, dtype: torch.dtype = torch.bfloat16, longest_keys: int = 0) -> dict:
    """The launch: 128 queries a program, as Triton's tutorial does on Hopper, and key tiles whose
    K and V fit three stages in shared memory beside the query tile; K and V through TMA for long
    contexts. fp32 (tests: exact dots) takes small tiles that fit; at MLA's 192 wide heads its
    registers spill a little, which only costs time."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)
    if head_dim > 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=longest_keys >= TMA_FROM_KEYS)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)


def _tma_fits(*tensors: torch.Tensor) -> bool:
    """TMA reads a tensor on a Hopper-class GPU whose start and strides (but the last) are multiples of 16
    bytes."""
    return all(hopper_class(t.device) and tma_aligned(t) for t in tensors)


def _check_args(q, k, v, cu_query, cu_key, query_lens, key_lens):
    name = "prefill_attention"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{name}: expected q [Tq,H,d], k [Tk,H,d], v [Tk,H,dv]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1:] != q.shape[1:] or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"{name}: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if len(query_lens) != len(key_lens) or any(kl < ql for ql, kl in zip(query_lens, key_lens)):
        raise ValueError(f"{name}: every sequence needs at least as many keys as queries; got query_lens "
                         f"{query_lens[:8]} and key_lens {key_lens[:8]}")
    if sum(query_lens) != q.shape[0] or sum(key_lens) != k.shape[0]:
        raise ValueError(f"{name}: the lengths sum to {sum(query_lens)} queries and {sum(key_lens)} keys; "
                         f"q holds {q.shape[0]}, k {k.shape[0]}")
    if cu_query.shape != (len(query_lens) + 1,) or cu_key.shape != cu_query.shape or \
            cu_query.dtype != torch.int32 or cu_key.dtype != torch.int32:
        raise ValueError(f"{name}: cu_query and cu_key must be int32 [{len(query_lens) + 1}]")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k and v must share a float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.device != q.device for t in (k, v, cu_query, cu_key)):
        raise ValueError(f"{name}: all tensors must be on one device")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(f"{name}: q, k and v need a contiguous last dim")


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_query: torch.Tensor,
                      cu_key: torch.Tensor, query_lens: list[int], key_lens: list[int], scale: float, *,
                      config: dict | None = None) -> torch.Tensor:
    """Same contract as reference.prefill_attention: out [Tq, H, dv] in q's dtype. q, k and v may be
    views (the last dim contiguous). config (tests and tuning) overrides the launch: BLOCK_M, BLOCK_N,
    num_warps, num_stages, and TMA: read K and V through Hopper's tensor-memory accelerator (tensor
    descriptors; their strides must be multiples of 16 bytes)."""
    _check_args(q, k, v, cu_query, cu_key, query_lens, key_lens)
    Tq, H, d = q.shape
    dv = v.shape[2]
    out = q.new_empty(Tq, H, dv)
    if Tq == 0:
        return out
    cfg = dict(config or default_config(d, q.dtype, max(key_lens)))
    d_first = 1 << (d.bit_length() - 1)  # the largest power of two <= d; the rest in a second tile
    d_rest = d - d_first
    block = lambda n: max(16, triton.next_power_of_2(n))  # tl.dot needs 16 or more
    on_cpu = q.device.type == "cpu"  # CPU tensors only run under TRITON_INTERPRET=1
    tma = cfg.pop("TMA", False)
    if tma and config is None:  # the default asks for TMA where the tensors allow it
        tma = _tma_fits(k, v)
    if tma:  # [packed keys, heads, width] descriptors, one tile of one head a load
        block_n = cfg["BLOCK_N"]
        describe = lambda t, width: TensorDescriptor(t, list(t.shape), list(t.stride()), [block_n, 1, width])
        k_desc, k_rest_desc, v_desc = describe(k, block(d_first)), describe(k, block(d_rest)), describe(v, block(dv))
    else:
        k_desc = k_rest_desc = v_desc = k  # unused
    grid = (H, triton.cdiv(max(query_lens), cfg["BLOCK_M"]), len(query_lens))
    _prefill_attention_kernel[grid](
        q, k, v, k_desc, k_rest_desc, v_desc, out, cu_query, cu_key, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        D_FIRST=d_first, D_REST=d_rest, D_V=dv, BLOCK_FIRST=block(d_first), BLOCK_REST=block(d_rest),
        BLOCK_V=block(dv), TMA=tma, UPCAST_DOT=on_cpu, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **cfg,
        **pdl_launch(q.device, q.shape[0]),
    )
    return out
