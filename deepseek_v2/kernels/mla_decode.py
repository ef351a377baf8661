"""Absorbed MLA decode over a paged latent cache (Triton), after FlashMLA and SGLang's grouped
decode kernel.

With W_UK folded into the query, decode is MQA with one shared 576-dim key [c ; k_pe] and the
512-dim latent c itself as the value. One program handles (head group, kv split, sequence): it
loads the queries of BLOCK_H heads once, walks its share of the sequence BLOCK_N tokens at a time
through the block table, reads each latent tile ONCE for all those heads and keeps an online
softmax in fp32. From TMA_MIN_SEQS sequences on Hopper-class GPUs a sequence's whole tiles come through
the tensor-memory accelerator (tensor descriptors; one thread issues a tile's copy), its last partial
tile through masked pointers. When the sequence is split, a second kernel merges the partial outputs with
their log-sum-exp (kernels/mla_merge.py; for few sequences, and W_UV given, the same launch multiplies by
W_UV). No host synchronisation: the launch is CUDA-graph capturable for fixed shapes.

An FP8 cache (uint8 blocks: each token's R + P e4m3 values, then the tokens' fp32 scales,
kernels/fp8.py) is widened in registers to the query's dtype (exact); a token's scale multiplies its
scores after the dot and its softmax weight before the value dot, so no tile is ever dequantized in memory.
Its latent is read as 16-bit pairs of e4m3 values (a token's columns 2j and 2j + 1) and attended as two
interleaved halves, even columns and odd, each with its own accumulator: `ldmatrix` then moves the tiles
into both dots' layouts as it does bf16 tiles, where one-byte values took a shared-memory load each for the
value dot, whose K runs across tokens (sm_90 build: 633 instructions a tile a thread against 985, 221
registers and no spills against 255 and 72 spilled bytes; docs/fp8.md, "MLA decode over the FP8 cache in
pairs").

Letters: N sequences, H heads, R kv_lora_rank, P qk_rope_head_dim, S kv splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton.tools.tensor_descriptor import TensorDescriptor

from .fp8 import CACHE_SCALE_BYTES, FP8
from .launch import hopper_class, num_sms, pdl_launch, prefetch_l2, tma_aligned, wait_for_prior_kernels
from .mla_merge import _split_len, merge, merge_and_project

_LOG2E = 1.4426950408889634
# Tokens per tile: SGLang's choice for MLA on Hopper. With 4 warps, sm_90 builds of the bf16 kernel
# take ~210 registers (two programs per SM) and no spills; fp32 needs the smaller tile to not spill. An
# FP8 cache: _FP8_CACHE_BLOCK_N.
_BLOCK_N = {torch.bfloat16: 32, torch.float16: 32, torch.float32: 16}
# An FP8 cache with bf16 / fp16 queries: 32-token tiles in 8 warps while the programs fit one an SM, in 4
# warps past that (two programs an SM). With the latent read byte by byte (before its pairs) 8 warps took
# 212 registers a thread, so one program an SM, and 4 took 255 and spilled 72 bytes; on an H200 (us,
# 1,152-token sequences, tiles through TMA) 256 sequences 138.7 in 4 warps against 209.2 in 8, 32 sequences
# 27.1 against 36.4, one 1K-token sequence, no TMA, 12.0 in 8 against 12.6 in 4 (docs/fp8.md, "MLA decode
# over the FP8 cache through TMA"). In pairs, 152 and 221 registers, no spills; not yet timed.
_FP8_CACHE_BLOCK_N = 32
_BLOCK_H = 16                # heads per program; V2-Lite: all 16 heads in one program
_PROGRAMS_PER_SM = 2         # what fits at once (registers); the split count aims at one full wave
_MIN_TOKENS_PER_SPLIT = 128  # keeps the fp32 partials small next to the latent bytes read
_MAX_SPLITS = 128
# Up to this many sequences, the split merge also does W_UV's product (w_uv given): one launch for what
# took the merge and a batched matmul. Its programs multiply on CUDA cores, each re-merging its head's
# partials, so many sequences keep the matmul on tensor cores. 0: never. One: on an H200, batch-1 decode
# gained with it beside absorb.ABSORB_MAX_SEQS (the attention then our launches from its projection to
# its output under programmatic dependent launch: 2.49 against 2.50 ms/token), and 8 sequences lost 2-3%
# with it at 8 (docs/benchmarks.md, "Batch 1's attention in our launches").
PROJECT_IN_MERGE_MAX_SEQS = 1
# value columns a program of _merge_project_kernel writes: 32 halves the programs that each merge their
# head's partials again; on an H200, batch-1 decode 1.98 against 2.04 ms/token with 16 beside the weights
# asked of L2 (FP8 weights; bf16 2.37 against 2.44; docs/benchmarks.md, "The weights asked of L2 before
# the wait")
_PROJECT_BLOCK_V = 32
# Read the bf16 / fp16 cache's whole tiles through Hopper's tensor-memory accelerator (tensor descriptors
# over [blocks, block_size, R + P]; one thread issues a tile's copy) rather than with every thread's
# pointers, from TMA_MIN_SEQS sequences: on an H200, 97 against 115 us at 256 x 1K tokens (1.18x), 1.05x
# at 32 sequences, 0.89x at one (docs/benchmarks.md, "MLA decode through TMA").
TMA = True
TMA_MIN_SEQS = 32
# Under programmatic dependent launch, the split kernel's programs ask L2 for their pieces' cache rows
# before waiting for the kernel ahead: they read the block tables and lengths before that wait, so these
# must come from the host or a kernel before the one ahead (the engine's do). Without TMA only. On an
# H200, batch-1 decode with FP8 weights 1.89 against 1.90 ms/token, twice each (docs/benchmarks.md, "MLA
# decode's merge in wide loads").
PREFETCH_CACHE = True
# Tiles a split-kernel program keeps in flight: the depth of its software pipeline's buffers. A tile's page
# comes from a load in the same loop (the block table), and Triton 3.6's pipeliner shares num_stages between
# that load and the tile's: num_stages 2 to 4 all give one buffer (the next tile's copy is issued after this
# tile's dots, so each tile waits out most of its own latency), 5 gives two, 7 three (the sm_90 build test
# checks the depth). 1: num_stages 2, the launch every timing so far used; 2 and 3 build without spills, but
# their GPU tests (tests/gpu) have not run yet, nor their timing (`scripts/bench_fp8.py --mla-sweep`).
TILE_BUFFERS = 1


@triton.jit
def _attend_tile(q, q_odd, q_pe, c, c_odd, pe, mask_t, score_scale, weight_scale, m_i, l_i, acc, acc_odd,
                 sm_scale_log2, FP8_CACHE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One tile of BLOCK_N tokens into the online softmax: scores q c^T + q_pe pe^T, tokens outside mask_t
    dropped, and the latent c as the value. FP8_CACHE: the latent in halves, q and c its even columns
    (acc their output), q_odd and c_odd its odd ones (acc_odd), and the tokens' scales on the scores
    (score_scale) and on the softmax weights (weight_scale); otherwise q_odd, c_odd and acc_odd are unused."""
    qk = tl.dot(q, tl.trans(c), input_precision=DOT_PRECISION)
    if FP8_CACHE:
        qk = tl.dot(q_odd, tl.trans(c_odd), acc=qk, input_precision=DOT_PRECISION)
    qk = tl.dot(q_pe, tl.trans(pe), acc=qk, input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
    if FP8_CACHE:
        qk = qk * score_scale[None, :]
    qk = tl.where(mask_t[None, :], qk * sm_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # finite: every tile holds a valid token
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if FP8_CACHE:
        p = p * weight_scale[None, :]
        acc_odd = tl.dot(p.to(c.dtype), c_odd, acc=acc_odd * alpha[:, None], input_precision=DOT_PRECISION)
    acc = tl.dot(p.to(c.dtype), c, acc=acc, input_precision=DOT_PRECISION)  # latent is the value
    return m_new, l_i, acc, acc_odd


@triton.jit
def _piece_range(seq_lens_ptr, seq, split, num_splits, BLOCK_N: tl.constexpr):
    """The tokens [start, end) of a sequence that one split holds, in whole tiles (_split_len); empty for
    a split past the sequence's last piece."""
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = _split_len(seq_len, num_splits, BLOCK_N)
    start = split * split_len
    return start, tl.minimum(start + split_len, seq_len)


@triton.jit
def _cache_rows(block_tables_ptr, seq, stride_bt_n, offs_t, mask_t, stride_kv_block, stride_kv_tok, R: tl.constexpr,
                P: tl.constexpr, PAGE_SIZE: tl.constexpr, FP8_CACHE: tl.constexpr):
    """Where tokens offs_t of a sequence lie in the paged cache, in its elements: (their blocks' first
    element, their rows' first). An FP8 cache's block holds its tokens' R + P e4m3 values, then their fp32
    scales (kernels/fp8.py)."""
    block = tl.load(block_tables_ptr + seq * stride_bt_n + offs_t // PAGE_SIZE, mask=mask_t, other=0)
    block_start = block.to(tl.int64) * stride_kv_block
    return block_start, block_start + (offs_t % PAGE_SIZE) * ((R + P) if FP8_CACHE else stride_kv_tok)


@triton.jit
def _prefetch_piece(kv_ptr, block_tables_ptr, seq_lens_ptr, seq, split, num_splits, stride_kv_block, stride_kv_tok,
                    stride_bt_n, R: tl.constexpr, P: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                    FP8_CACHE: tl.constexpr, ROW_LINES: tl.constexpr, LINE: tl.constexpr):
    """prefetch.global.L2 for the cache rows of one split's tokens (ROW_LINES lines of LINE elements a
    row; an FP8 cache's token scales too). Reads the sequence's length and block table."""
    start, end = _piece_range(seq_lens_ptr, seq, split, num_splits, BLOCK_N)
    lines = tl.arange(0, ROW_LINES) * LINE
    for tile_start in range(start, end, BLOCK_N):
        offs_t = tile_start + tl.arange(0, BLOCK_N)
        mask_t = offs_t < end
        block_start, row = _cache_rows(block_tables_ptr, seq, stride_bt_n, offs_t, mask_t, stride_kv_block,
                                       stride_kv_tok, R, P, PAGE_SIZE, FP8_CACHE)
        prefetch_l2(kv_ptr + row[:, None] + lines[None, :], mask_t[:, None] & (lines < R + P)[None, :])
        if FP8_CACHE:
            prefetch_l2(kv_ptr + block_start + PAGE_SIZE * (R + P) + (offs_t % PAGE_SIZE) * 4, mask_t)


@triton.jit
def _widen_pairs(pairs, dtype: tl.constexpr, ASM: tl.constexpr):
    """uint16 pairs of e4m3 values (a token's latent columns 2j, 2j + 1) -> (even, odd) in dtype, exactly.
    ASM (fp16 on the GPU): a byte permute and two e4m3x2 -> f16x2 conversions for each two pairs."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; .reg .b16 e, o; prmt.b32 t, $2, 0, 0x3120; mov.b32 {e, o}, t; "
            "cvt.rn.f16x2.e4m3x2 $0, e; cvt.rn.f16x2.e4m3x2 $1, o; }",
            "=r,=r,r", [pairs], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    even = (pairs & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(dtype)
    odd = (pairs >> 8).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(dtype)
    return even, odd


@triton.jit
def _widen_tile(c, pe, kv_ptr, block_start, offs_t, mask_t, q_dtype: tl.constexpr, q_unscale, R: tl.constexpr,
                P: tl.constexpr, PAGE_SIZE: tl.constexpr, FP8_CACHE: tl.constexpr, FP16_DOTS: tl.constexpr,
                UPCAST_DOT: tl.constexpr):
    """A tile as the dots take it: (c, c_odd, pe, score_scale, token_scale). An FP8 cache's latent pairs
    (uint16) widened to the queries' dtype in its even and odd columns, its rope key widened, and its
    tokens' scales (block_start: their block's first byte) for after the score dot (with the queries' power
    of two where FP16_DOTS) and on the softmax weights before the value dot; other caches as they are (c_odd
    unused), scales 1. UPCAST_DOT (the interpreter): fp32 where the dots would take bf16."""
    dtype: tl.constexpr = tl.float32 if UPCAST_DOT and not FP16_DOTS else q_dtype
    c_odd = c  # (unused but for an FP8 cache)
    if FP8_CACHE:
        c, c_odd = _widen_pairs(c, dtype, FP16_DOTS and not UPCAST_DOT)
        scales = (kv_ptr + block_start + PAGE_SIZE * (R + P)).to(tl.pointer_type(tl.float32))
        token_scale = tl.load(scales + offs_t % PAGE_SIZE, mask=mask_t, other=0.0)
        score_scale = token_scale * q_unscale
    else:
        c = c.to(dtype)
        token_scale = 1.0  # (unused)
        score_scale = 1.0
    return c, c_odd, pe.to(dtype), score_scale, token_scale


# Triton compiles a variant per pattern of the integer arguments (1, a multiple of 16, other); those
# that vary from step to step are not specialised on, so that the first step of a new width or split
# count does not compile in the middle of serving (model_runner._warm_up_steps).
@triton.jit(do_not_specialize=["num_splits", "stride_bt_n"])
def _mla_decode_split_kernel(
    q_lat_ptr, q_pe_ptr, kv_ptr, c_desc, pe_desc, block_tables_ptr, seq_lens_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
    sm_scale_log2, num_heads, num_splits,
    stride_ql_n, stride_ql_h, stride_qp_n, stride_qp_h,
    stride_kv_block, stride_kv_tok, stride_bt_n,
    stride_o_n, stride_o_h,
    R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT_OUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8_CACHE: tl.constexpr,
    FP16_DOTS: tl.constexpr, TMA: tl.constexpr, PDL: tl.constexpr = False,
    PREFETCH_CACHE: tl.constexpr = False, ROW_LINES: tl.constexpr = 1, LINE: tl.constexpr = 1,
):
    head_group = tl.program_id(0)  # fastest axis: the groups of one (split, seq) share latent tiles in L2
    split = tl.program_id(1)
    seq = tl.program_id(2)
    if PREFETCH_CACHE:  # (PREFETCH_CACHE) this piece's cache rows asked of L2 while the kernel ahead runs
        if head_group == 0:
            _prefetch_piece(kv_ptr, block_tables_ptr, seq_lens_ptr, seq, split, num_splits, stride_kv_block,
                            stride_kv_tok, stride_bt_n, R, P, PAGE_SIZE, BLOCK_N, FP8_CACHE, ROW_LINES, LINE)
    wait_for_prior_kernels(PDL)

    # This split's token range; short sequences leave late splits empty, and those store nothing (the merge
    # reads only a sequence's pieces)
    start, end = _piece_range(seq_lens_ptr, seq, split, num_splits, BLOCK_N)
    if not DIRECT_OUT and start >= end:
        return

    offs_h = head_group * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    mask_h = offs_h < num_heads
    mask_r = offs_r < R
    mask_p = offs_p < P

    q = tl.load(q_lat_ptr + seq * stride_ql_n + offs_h[:, None] * stride_ql_h + offs_r[None, :],
                mask=mask_h[:, None] & mask_r[None, :], other=0.0)             # [BLOCK_H, BLOCK_R]
    q_pe = tl.load(q_pe_ptr + seq * stride_qp_n + offs_h[:, None] * stride_qp_h + offs_p[None, :],
                   mask=mask_h[:, None] & mask_p[None, :], other=0.0)          # [BLOCK_H, BLOCK_P]
    q_unscale = 1.0
    if FP16_DOTS:  # (FP8 cache) the dots in fp16, which e4m3 can widen to in one instruction per pair:
        # the queries scaled by a power of two into fp16's range (exact for bf16 values), undone on the scores
        q_max = tl.maximum(tl.max(tl.max(tl.abs(q.to(tl.float32)), axis=1), axis=0),
                           tl.max(tl.max(tl.abs(q_pe.to(tl.float32)), axis=1), axis=0))
        q_unscale = tl.exp2(tl.maximum(tl.ceil(tl.log2(q_max + 1e-30)) - 14.0, 0.0))  # |q| <= 2^14 < 65504
        q = (q.to(tl.float32) / q_unscale).to(tl.float16)
        q_pe = (q_pe.to(tl.float32) / q_unscale).to(tl.float16)
    elif UPCAST_DOT:  # Triton 3.6's interpreter multiplies bf16 as raw uint16 bits
        q = q.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    q_odd = q  # (unused but for an FP8 cache)
    if FP8_CACHE:  # its latent in halves (BLOCK_C columns each): even columns, odd ones
        q, q_odd = tl.split(tl.reshape(q, [BLOCK_H, BLOCK_C, 2]))

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)                 # running sum of exp2
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    acc_odd = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)  # (an FP8 cache's odd columns)
    # TMA: the whole tiles through the tensor-memory accelerator (a tile lies in one page: BLOCK_N divides
    # PAGE_SIZE), the last partial tile with pointers, whose masked loads read its tokens past the end as 0
    whole_end = start
    if TMA:
        whole_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
        for tile_start in range(start, whole_end, BLOCK_N):
            page = tl.load(block_tables_ptr + seq * stride_bt_n + tile_start // PAGE_SIZE)
            in_page = tile_start % PAGE_SIZE
            c = tl.reshape(c_desc.load([page, in_page, 0]), [BLOCK_N, BLOCK_C])
            pe = tl.reshape(pe_desc.load([page, in_page, R]), [BLOCK_N, BLOCK_P])
            offs_t = tile_start + tl.arange(0, BLOCK_N)
            c, c_odd, pe, score_scale, token_scale = _widen_tile(
                c, pe, kv_ptr, page.to(tl.int64) * stride_kv_block, offs_t, offs_t < end, q.dtype, q_unscale, R, P,
                PAGE_SIZE, FP8_CACHE, FP16_DOTS, UPCAST_DOT)
            m_i, l_i, acc, acc_odd = _attend_tile(q, q_odd, q_pe, c, c_odd, pe, offs_t < end, score_scale,
                                                  token_scale, m_i, l_i, acc, acc_odd, sm_scale_log2, FP8_CACHE,
                                                  DOT_PRECISION)
    for tile_start in range(whole_end, end, BLOCK_N):
        offs_t = tile_start + tl.arange(0, BLOCK_N)
        mask_t = offs_t < end
        block_start, row = _cache_rows(block_tables_ptr, seq, stride_bt_n, offs_t, mask_t, stride_kv_block,
                                       stride_kv_tok, R, P, PAGE_SIZE, FP8_CACHE)      # [BLOCK_N] each
        if FP8_CACHE:  # the latent's e4m3 pairs (a row starts at an even byte), then the rope key's values
            offs_c = tl.arange(0, BLOCK_C)
            c = tl.load(kv_ptr.to(tl.pointer_type(tl.uint16)) + row[:, None] // 2 + offs_c[None, :],
                        mask=mask_t[:, None] & (offs_c < R // 2)[None, :], other=0)   # [BLOCK_N, BLOCK_C]
            pe = tl.load(kv_ptr.to(tl.pointer_type(tl.float8e4nv)) + row[:, None] + R + offs_p[None, :],
                         mask=mask_t[:, None] & mask_p[None, :], other=0.0)        # [BLOCK_N, BLOCK_P]
        else:
            c = tl.load(kv_ptr + row[:, None] + offs_r[None, :],
                        mask=mask_t[:, None] & mask_r[None, :], other=0.0)         # [BLOCK_N, BLOCK_R]
            pe = tl.load(kv_ptr + row[:, None] + R + offs_p[None, :],
                         mask=mask_t[:, None] & mask_p[None, :], other=0.0)        # [BLOCK_N, BLOCK_P]
        c, c_odd, pe, score_scale, token_scale = _widen_tile(c, pe, kv_ptr, block_start, offs_t, mask_t, q.dtype,
                                                             q_unscale, R, P, PAGE_SIZE, FP8_CACHE, FP16_DOTS,
                                                             UPCAST_DOT)
        m_i, l_i, acc, acc_odd = _attend_tile(q, q_odd, q_pe, c, c_odd, pe, mask_t, score_scale, token_scale, m_i,
                                              l_i, acc, acc_odd, sm_scale_log2, FP8_CACHE, DOT_PRECISION)

    if FP8_CACHE:  # the even and odd columns back in order
        acc = tl.reshape(tl.join(acc, acc_odd), [BLOCK_H, BLOCK_R])
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty range (DIRECT_OUT, length 0): zeros
    if DIRECT_OUT:  # a single split: write the final output, no merge
        tl.store(out_ptr + seq * stride_o_n + offs_h[:, None] * stride_o_h + offs_r[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_r[None, :])
    else:
        # partials: mid_o [N, H, S, BLOCK_R] fp32 and mid_lse [N, H, S] fp32 (log2 units)
        lse = m_i + tl.log2(l_i)
        mid = ((seq * num_heads + offs_h) * num_splits + split).to(tl.int64)   # [BLOCK_H]
        tl.store(mid_o_ptr + mid[:, None] * BLOCK_R + offs_r[None, :], out, mask=mask_h[:, None])
        tl.store(mid_lse_ptr + mid, lse, mask=mask_h)


def _split_warps(fp8_tile: bool, fp8: bool, block_n: int, programs: int, device: torch.device) -> int:
    """The split kernel's warps: 4 for a float cache's tiles of up to 32 tokens, 8 for larger ones (and fp32
    queries over an FP8 cache); over an FP8 cache with bf16 / fp16 queries, 8 while the programs fit one an SM,
    4 past that (_FP8_CACHE_BLOCK_N)."""
    if fp8_tile:
        return 8 if programs <= num_sms(device) else 4
    return 4 if block_n <= 32 and not fp8 else 8


def _split_stages(fp8: bool, fp32: bool) -> int:
    """The split kernel's num_stages for TILE_BUFFERS tiles in flight (fp32 queries over an FP8 cache, the
    tests': 1, it spills at more)."""
    if fp8 and fp32:
        return 1
    return 2 if TILE_BUFFERS <= 1 else 2 * TILE_BUFFERS + 1


def _default_num_splits(device, programs: int, max_seq_len: int) -> int:
    """Fill one wave (never more, a partial second wave would halve the speed), never cutting a
    sequence into pieces shorter than _MIN_TOKENS_PER_SPLIT tokens."""
    want = _PROGRAMS_PER_SM * num_sms(device) // programs
    return max(1, min(want, triton.cdiv(max_seq_len, _MIN_TOKENS_PER_SPLIT), _MAX_SPLITS))


def _tma_views(kv_cache: torch.Tensor, R: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache as tensor descriptors address it, (latent, rope key): a float cache itself, twice; an FP8
    cache's values with each block's scales left out (views): the latent as uint16 pairs of e4m3 values,
    [blocks, block_size, (R + P) / 2], the rope key as e4m3, [blocks, block_size, R + P]."""
    if kv_cache.dtype != torch.uint8:
        return kv_cache, kv_cache
    blocks, block_size, width = kv_cache.shape
    values = kv_cache.view(FP8).as_strided((blocks, block_size, R + P), (block_size * width, R + P, 1))
    pairs = kv_cache.view(torch.uint16).as_strided((blocks, block_size, (R + P) // 2),
                                                   (block_size * width // 2, (R + P) // 2, 1))
    return pairs, values


def _tma_fits(kv_cache: torch.Tensor, R: int, P: int, block_n: int) -> bool:
    """Tensor descriptors can read this cache's tiles whole: R and P powers of two (a tile's widths), a
    tile inside one page, 16-byte aligned start and strides (of an FP8 cache's views: _tma_views)."""
    return (R & (R - 1) == 0 and P & (P - 1) == 0 and kv_cache.shape[1] % block_n == 0
            and all(tma_aligned(view) for view in _tma_views(kv_cache, R, P)))


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
               block_tables: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float,
               num_kv_splits: int | None = None, max_seq_len: int | None = None, *,
               block_n: int | None = None, num_warps: int | None = None,
               num_stages: int | None = None, fp16_dots: bool | None = None,
               w_uv: torch.Tensor | None = None, tma: bool | None = None) -> torch.Tensor:
    """Absorbed MLA decode; same contract as reference.mla_decode, returns out [N, H, R] (with w_uv,
    [N, H, dv]).

    q_lat [N, H, R] and q_pe [N, H, P] (last dim contiguous), kv_cache [num_blocks, block_size, R+P]
    (last dim contiguous; a layer view of a bigger cache is fine), all one float dtype, or an FP8
    cache: uint8 [num_blocks, block_size, R+P+4] as kernels/fp8.py lays it out, contiguous, R and P even;
    block_tables [N, max_blocks] int32, seq_lens [N] int32 (0 gives zeros). num_kv_splits: how many
    pieces each sequence is cut into (None: from the SM count and max_seq_len); max_seq_len: an
    upper bound on seq_lens used only for that choice (None: max_blocks * block_size, the table's
    capacity). block_n: tokens per tile; num_warps, num_stages: the split kernel's launch (tests and
    tuning; None: the defaults below). fp16_dots (an FP8 cache with bf16 or fp16 queries; None: on for
    them): widen e4m3 to fp16 rather than to the queries' dtype (one instruction a pair, against several
    to bf16) and run both dots in fp16, the queries scaled into its range by a power of two; on an H200
    1.16-1.31x faster than widening to bf16 (docs/fp8.md). w_uv [H, dv, R] (absorbed decode's W_UV, a
    view with a contiguous last dim is fine): the output projected per head, as the reference does it;
    for up to PROJECT_IN_MERGE_MAX_SEQS sequences in the launch that merges the splits. tma: read the
    whole tiles through tensor descriptors (None: the TMA setting, for bf16 / fp16 queries on a Hopper-class
    GPU, where the cache allows it: _tma_fits; an FP8 cache's values too). Never reads device values on the host.
    Under programmatic dependent launch (few sequences, PREFETCH_CACHE) block_tables and seq_lens are read
    before the kernel ahead has finished: no kernel launched just before this call may write them.
    """
    if q_lat.dim() != 3 or q_pe.dim() != 3 or kv_cache.dim() != 3:
        raise ValueError(f"mla_decode: expected q_lat [N,H,R], q_pe [N,H,P], kv_cache [blocks,bs,R+P];"
                         f" got {tuple(q_lat.shape)}, {tuple(q_pe.shape)}, {tuple(kv_cache.shape)}")
    N, H, R = q_lat.shape
    P = q_pe.shape[2]
    num_blocks, block_size, width = kv_cache.shape
    fp8 = kv_cache.dtype == torch.uint8
    if q_pe.shape[:2] != (N, H) or width != R + P + (CACHE_SCALE_BYTES if fp8 else 0):
        raise ValueError(f"mla_decode: shapes disagree: q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)},"
                         f" kv_cache {tuple(kv_cache.shape)} (last dim must be R+P = {R + P}, +4 for FP8)")
    if fp8 and not kv_cache.is_contiguous():
        raise ValueError("mla_decode: an FP8 kv_cache must be contiguous (its blocks' values, then their scales)")
    if fp8 and (R % 2 or P % 2):  # its latent is read in 16-bit pairs of values, from 2-byte aligned rows
        raise ValueError(f"mla_decode: an FP8 kv_cache needs even R and P, got R={R}, P={P}")
    if block_tables.dim() != 2 or block_tables.shape[0] != N or seq_lens.shape != (N,):
        raise ValueError(f"mla_decode: expected block_tables [{N}, max_blocks] and seq_lens [{N}];"
                         f" got {tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    if q_lat.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"mla_decode: q_lat dtype must be bf16, fp16 or fp32, got {q_lat.dtype}")
    if q_pe.dtype != q_lat.dtype or (kv_cache.dtype != q_lat.dtype and not fp8):
        raise ValueError(f"mla_decode: q_lat, q_pe and kv_cache must share a dtype (or the cache be uint8: FP8);"
                         f" got {q_lat.dtype}, {q_pe.dtype}, {kv_cache.dtype}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(f"mla_decode: block_tables and seq_lens must be int32;"
                         f" got {block_tables.dtype}, {seq_lens.dtype}")
    tensors = (q_lat, q_pe, kv_cache, block_tables, seq_lens)
    if any(t.device != q_lat.device for t in tensors):
        raise ValueError("mla_decode: all tensors must be on one device")
    if q_lat.stride(2) != 1 or q_pe.stride(2) != 1 or kv_cache.stride(2) != 1 or block_tables.stride(1) != 1:
        raise ValueError("mla_decode: q_lat, q_pe, kv_cache and block_tables need a contiguous last dim")
    if not seq_lens.is_contiguous():
        raise ValueError("mla_decode: seq_lens must be contiguous")
    fp16_dots_apply = fp8 and q_lat.dtype in (torch.bfloat16, torch.float16)
    if fp16_dots is None:
        fp16_dots = fp16_dots_apply
    if fp16_dots and not fp16_dots_apply:
        raise ValueError("mla_decode: fp16_dots is for an FP8 cache with bf16 or fp16 queries")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"mla_decode: block_size must be a power of two, got {block_size}")
    fp8_tile = fp8 and q_lat.dtype != torch.float32  # (fp32 queries over an FP8 cache: tests only)
    block_n = block_n or (_FP8_CACHE_BLOCK_N if fp8_tile else _BLOCK_N[q_lat.dtype])
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"mla_decode: block_n must be a power of two >= 16, got {block_n}")

    if w_uv is not None and (w_uv.dim() != 3 or w_uv.shape[0] != H or w_uv.shape[2] != R
                             or w_uv.dtype != q_lat.dtype or w_uv.stride(2) != 1 or w_uv.device != q_lat.device):
        raise ValueError(f"mla_decode: w_uv must be [{H}, dv, {R}] {q_lat.dtype} with a contiguous last dim, on "
                         f"q_lat's device; got {tuple(w_uv.shape)} {w_uv.dtype}")
    out = torch.empty_like(q_lat, memory_format=torch.contiguous_format)
    if N == 0:
        return out if w_uv is None else q_lat.new_empty(0, H, w_uv.shape[1])
    project_in_merge = w_uv is not None and N <= PROJECT_IN_MERGE_MAX_SEQS
    block_h = _BLOCK_H if H >= _BLOCK_H else max(16, triton.next_power_of_2(H))  # tl.dot needs M >= 16
    head_groups = triton.cdiv(H, block_h)
    if num_kv_splits is None:
        capacity = block_tables.shape[1] * block_size
        num_kv_splits = _default_num_splits(q_lat.device, N * head_groups, max_seq_len or capacity)
    if num_kv_splits < 1:
        raise ValueError(f"mla_decode: num_kv_splits must be >= 1, got {num_kv_splits}")
    block_r, block_p = max(16, triton.next_power_of_2(R)), max(16, triton.next_power_of_2(P))
    if num_kv_splits > 1 or project_in_merge:  # (one split is "merged" too, to be projected in that launch)
        mid_o = torch.empty(N, H, num_kv_splits, block_r, dtype=torch.float32, device=q_lat.device)
        mid_lse = torch.empty(N, H, num_kv_splits, dtype=torch.float32, device=q_lat.device)
    else:
        mid_o = mid_lse = out  # unused
    on_cpu = q_lat.device.type == "cpu"  # CPU tensors only run under TRITON_INTERPRET=1
    if tma is None:  # (an fp32 cache, the tests', spills registers through TMA: it keeps pointers)
        tma = (TMA and N >= TMA_MIN_SEQS and q_lat.dtype != torch.float32 and hopper_class(q_lat.device)
               and _tma_fits(kv_cache, R, P, block_n))
    elif tma and not _tma_fits(kv_cache, R, P, block_n):
        raise ValueError(f"mla_decode: tma needs power-of-two R and P, block_n dividing the"
                         f" block size ({block_size}) and 16-byte aligned rows; got R={R}, P={P}, block_n={block_n},"
                         f" {kv_cache.dtype}")
    block_c = block_r // 2 if fp8 else block_r  # an FP8 cache's latent in halves: even columns, odd ones
    if tma:  # the latent and the rope key of BLOCK_N tokens of one page a load (an FP8 latent in pairs)
        latent, rope = _tma_views(kv_cache, R, P)
        c_desc = TensorDescriptor.from_tensor(latent, [1, block_n, R // 2 if fp8 else R])
        pe_desc = TensorDescriptor.from_tensor(rope, [1, block_n, P])
    else:
        c_desc = pe_desc = kv_cache  # unused

    _mla_decode_split_kernel[(head_groups, num_kv_splits, N)](
        q_lat, q_pe, kv_cache, c_desc, pe_desc, block_tables, seq_lens, out, mid_o, mid_lse,
        softmax_scale * _LOG2E, H, num_kv_splits,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        R=R, P=P, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_P=block_p, PAGE_SIZE=block_size, BLOCK_H=block_h,
        BLOCK_N=block_n, DIRECT_OUT=num_kv_splits == 1 and not project_in_merge, UPCAST_DOT=on_cpu, FP8_CACHE=fp8,
        FP16_DOTS=fp16_dots, TMA=tma,
        **(dict(PREFETCH_CACHE=True, LINE=128 // kv_cache.element_size(),
                ROW_LINES=triton.next_power_of_2(triton.cdiv((R + P) * kv_cache.element_size(), 128)))
           if PREFETCH_CACHE and not tma and pdl_launch(q_lat.device, N) else {}),
        DOT_PRECISION="ieee" if q_lat.dtype == torch.float32 else "tf32",
        num_warps=num_warps or _split_warps(fp8_tile, fp8, block_n, head_groups * num_kv_splits * N, q_lat.device),
        num_stages=num_stages or _split_stages(fp8, q_lat.dtype == torch.float32),
        **pdl_launch(q_lat.device, N),
    )
    if project_in_merge:
        out = q_lat.new_empty(N, H, w_uv.shape[1])
        merge_and_project(mid_o, mid_lse, seq_lens, w_uv, out, num_kv_splits, block_n, _PROJECT_BLOCK_V)
        return out
    if num_kv_splits > 1:
        merge(mid_o, mid_lse, seq_lens, out, num_kv_splits, block_n)
    if w_uv is None:
        return out
    return torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # W_UV on tensor cores
