"""Routed-expert MoE in Triton, after vLLM's fused_moe_kernel.

fused_moe, with no host synchronisation (CUDA-graph capturable for a fixed token count):
1. moe_align (kernels/moe_align.py, one small launch): the T*K rows sorted by expert, each expert's run
   padded to a multiple of BLOCK_M, -1 picks (experts on other ranks) in a bucket E of their own.
2. gate/up grouped GEMM: a program owns one block (so one expert) and BLOCK_N columns of gate_proj
   and of up_proj, and writes silu(gate) * up for its rows into inter [T*K, I].
3. down grouped GEMM: inter @ w2[e]^T times the routing weight, into [T*K, D]. A block of bucket E
   stores zero rows and reads no weights (the gate/up pass skips it altogether).
4. the K picks summed in fp32 and cast to x's dtype.
FP8 experts (weights in e4m3 with 128 x 128 block scales): each GEMM's input (x, then inter) is
quantized per token in groups of 128 with the reference's arithmetic, once by
fp8_linear.quantize_activation (quantizing inside the GEMM, once per column block, was slower where
timed: 3x bf16's time at 4096 tokens, 20% fewer tokens/s in decode steps of 256 sequences; in decode's
thin blocks, 2.40 against 2.25 ms/token at batch 1), or the intermediate by the gate/up GEMM as it stores
it (QUANTIZE_INTER_MAX_TOKENS, one 128-wide group a program); both GEMMs step K one 128-wide block at a
time and scale each block's product by the rows' and the weight block's scales.
Blocks past the padded total exit at once, so a decode step reads only the touched experts' weights.
With no -1 pick, bucket E is empty: no block, no zero store, no extra work in the GEMMs. One token
needs no alignment: its K picks are K distinct experts, and block k is pick k (a launch fewer at batch 1).
(torch._grouped_mm was slower at every size measured; scripts/bench_kernels.py keeps it as the baseline.)

Letters: T tokens, K picks per token, E experts, D hidden size, I expert intermediate size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .fp8 import BLOCK, EPS, FP8, FP8_MAX, cdiv
from .fp8_linear import accumulate, check_quantized_out, grouped_tile, quantize_activation, quantize_rows
from .launch import (arrival_counters, hopper_class, pdl_launch, prefetch_l2, prefetch_launch, tma_aligned,
                     wait_for_prior_kernels)
from .moe_align import MoeAlignment, moe_align


@triton.jit
def _store_rows(c_ptr, acc, rows, mask_m, offs_n, N, stride_cm):
    """c[rows, offs_n] = acc in c's dtype, for the real rows and the columns < N."""
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n < N)[None, :])


@triton.jit
def _sum_arrived_rows(c_ptr, y_ptr, add_ptr, arrived_ptr, rows, mask_m, offs_n, N, stride_cm, pid_n, num_pid_n,
                      TOPK: tl.constexpr, HAS_ADD: tl.constexpr):
    """(The down pass, combining) once this program's rows of c are stored: count each row in for its
    token and this column block; the program that brings a token's TOPK-th row sums the token's TOPK
    rows into y, in pick order in fp32, rounded once (then + add, rounded again): _combine_kernel's
    arithmetic, without its launch. The counter goes back to zero for the next launch."""
    tl.debug_barrier()  # every store of this program issued before its arrivals are counted (release)
    tokens = tl.where(mask_m, rows // TOPK, 0)
    counters = arrived_ptr + tokens * num_pid_n + pid_n
    before = tl.atomic_add(counters, 1, mask=mask_m, sem="acq_rel", scope="gpu")
    tl.debug_barrier()  # the acquiring lanes' view passed to every thread of the program before it reads rows
    last = mask_m & (before == TOPK - 1)
    mask = last[:, None] & (offs_n < N)[None, :]
    acc = tl.zeros([rows.shape[0], offs_n.shape[0]], dtype=tl.float32)
    for k in tl.static_range(TOPK):  # .cg: from L2, where the other programs' rows are
        pick_rows = (tokens * TOPK + k).to(tl.int64)
        acc += tl.load(c_ptr + pick_rows[:, None] * stride_cm + offs_n[None, :], mask=mask, other=0.0,
                       cache_modifier=".cg").to(tl.float32)
    y = acc.to(y_ptr.dtype.element_ty)
    y_offs = tokens.to(tl.int64)[:, None] * N + offs_n[None, :]
    if HAS_ADD:
        y = (y.to(tl.float32) + tl.load(add_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)).to(y.dtype)
    tl.store(y_ptr + y_offs, y, mask=mask)
    tl.store(counters, 0, mask=last)


@triton.jit(do_not_specialize=["num_rows"])
def _moe_gemm_kernel(
    a_ptr, b_ptr, b_desc, c_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, bs_ptr, as_ptr,
    cs_ptr, y_ptr, add_ptr, arrived_ptr,
    N, K, max_padded, num_rows, num_experts, up_scale_row, num_shared,
    stride_am, stride_be, stride_bn, stride_cm, stride_bse, stride_bsn, stride_asm, stride_asg, stride_csm,
    A_ROW_DIV: tl.constexpr,   # a row = row id // A_ROW_DIV (K picks share one x row; 1 for inter)
    GATE_UP: tl.constexpr,     # b rows [n] are gate, [N + n] are up; store silu(gate) * up
    MUL_WEIGHT: tl.constexpr,  # scale rows by their routing weight
    FP8_W: tl.constexpr,       # b in e4m3 with block scales bs [E, block rows, K / 128] (BLOCK_K = 128),
                               # a in e4m3 with scales as [rows of a, K / 128] (quantize_activation;
                               # any strides: M-major where the shared experts' cuBLAS GEMM reads them too)
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ONE_ROW_BLOCKS: tl.constexpr,  # block m holds row m alone, expert_ids_ptr is topk_ids (no alignment)
    COMBINE: tl.constexpr,     # (down pass) also sum each token's TOPK rows into y [T, N] (+ add), as
    TOPK: tl.constexpr, HAS_ADD: tl.constexpr,  # _combine_kernel would: _sum_arrived_rows
    SWAP_AB: tl.constexpr,     # the products as b^T a^T (fp8_linear.accumulate)
    TMA: tl.constexpr,         # b's tiles through b_desc, a descriptor over b as [E * rows, K]
    QUANTIZE_OUT: tl.constexpr,  # (gate/up, BLOCK_N = 128) c in e4m3 with scales cs [rows, N / 128]:
                                 # quantize_activation of the rows rounded to y's dtype, one group a program
    FP8_MAX: tl.constexpr, EPS: tl.constexpr,  # (QUANTIZE_OUT) kernels/fp8.py's constants
    PDL: tl.constexpr = False,  # programmatic dependent launch (launch.wait_for_prior_kernels)
    PREFETCH: tl.constexpr = False,  # (ONE_ROW_BLOCKS) a shared expert's block asks L2 for its weight tile before
    PREFETCH_LINES: tl.constexpr = 1,  # the wait (picks TOPK - num_shared.. are the stack's last experts): a
    LINE: tl.constexpr = 1,            # row's K values in PREFETCH_LINES lines (a power of two) of LINE values
):
    """c[row, n] = a[row // A_ROW_DIV] . b[expert(row), n] for the rows of one expert block; the
    blocks of bucket num_experts (the -1 rows) store zero rows in the down pass and skip gate/up."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(max_padded, BLOCK_M), num_pid_n, GROUP_M)
    if PREFETCH:  # which expert a shared pick takes needs no load: its tile may come while the kernel ahead runs
        pick = pid_m % TOPK
        if pick >= TOPK - num_shared:
            lines = tl.arange(0, PREFETCH_LINES) * LINE
            tile = (b_ptr + (num_experts - TOPK + pick).to(tl.int64) * stride_be
                    + ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)[:, None] * stride_bn + lines[None, :])
            mask = tl.broadcast_to((lines < K)[None, :], [BLOCK_N, PREFETCH_LINES])
            prefetch_l2(tile, mask)
            if GATE_UP:
                prefetch_l2(tile + N * stride_bn, mask)
    wait_for_prior_kernels(PDL)
    if ONE_ROW_BLOCKS:
        rows = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_rows)           # row pid_m, then padding
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        expert = tl.where(expert < 0, num_experts, expert)                      # a -1 pick: bucket E
    else:
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))   # [BLOCK_M]
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    mask_m = rows < num_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if expert == num_experts:  # picks of experts held elsewhere: no weight read, no GEMM
        if not GATE_UP:  # the final sum reads every row of the down output, so these must be zero
            zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            _store_rows(c_ptr, zeros, rows, mask_m, offs_n, N, stride_cm)
            if COMBINE:
                _sum_arrived_rows(c_ptr, y_ptr, add_ptr, arrived_ptr, rows, mask_m, offs_n, N, stride_cm, pid_n,
                                  num_pid_n, TOPK, HAS_ADD)
        return
    offs_bn = offs_n % N  # wrap instead of masking the weight loads; wrapped columns are not stored
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows // A_ROW_DIV).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    as_ptrs = as_ptr + (rows // A_ROW_DIV).to(tl.int64) * stride_asm                # FP8: the rows' scales
    b_ptrs = b_ptr + expert * stride_be + offs_bn[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    bs_ptrs = bs_ptr + expert * stride_bse + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn  # FP8: the tile's block row
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros_like(acc)
    # TMA: this program's first weight row in the [E * rows, K] view; the rows past the expert's N (a
    # ragged last column block) are the next rows' (or zeros past the tensor's end), whose columns are not
    # stored, as the pointers' wrapped columns are not
    b_row = (expert * (stride_be // stride_bn) + pid_n * BLOCK_N).to(tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            mask_k = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if TMA:  # columns past K read as zeros
            b = tl.trans(b_desc.load([b_row, k * BLOCK_K]))
        elif EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=mask_k[:, None], other=0.0)
        if FP8_W:  # each K block's product scaled by the rows' and the weight block's scales
            a_scale = tl.load(as_ptrs + k * stride_asg, mask=mask_m, other=0.0)
            scale = a_scale * tl.load(bs_ptrs + k)
        else:
            a_scale, scale = 1.0, 1.0  # (unused)
            if UPCAST_DOT:  # Triton 3.6's interpreter multiplies bf16 as raw uint16 bits
                a = a.to(tl.float32)
                b = b.to(tl.float32)
        acc = accumulate(acc, a, b, scale, FP8_W, SWAP_AB, DOT_PRECISION)
        if GATE_UP:
            if TMA:
                b_up = tl.trans(b_desc.load([b_row + N, k * BLOCK_K]))
            elif EVEN_K:
                b_up = tl.load(b_ptrs + N * stride_bn)
            else:
                b_up = tl.load(b_ptrs + N * stride_bn, mask=mask_k[:, None], other=0.0)
            if FP8_W:  # the up_proj's scales: its block rows follow the gate_proj's
                up_scale = a_scale * tl.load(bs_ptrs + up_scale_row * stride_bsn + k)
            else:
                up_scale = 1.0  # (unused)
                if UPCAST_DOT:
                    b_up = b_up.to(tl.float32)
            acc_up = accumulate(acc_up, a, b_up, up_scale, FP8_W, SWAP_AB, DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if SWAP_AB:  # back to rows x columns for the epilogue
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)

    if GATE_UP:
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in fp32
    if MUL_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + rows, mask=mask_m, other=0.0)[:, None]
    if QUANTIZE_OUT:  # the rows rounded to y's dtype as the intermediate is, then their group quantized
        rounded = tl.where((offs_n < N)[None, :], acc.to(y_ptr.dtype.element_ty).to(tl.float32), 0.0)
        acc, scale = quantize_rows(rounded, FP8_MAX, EPS)
        tl.store(cs_ptr + rows.to(tl.int64) * stride_csm + pid_n, scale, mask=mask_m)
    _store_rows(c_ptr, acc, rows, mask_m, offs_n, N, stride_cm)
    if COMBINE:
        _sum_arrived_rows(c_ptr, y_ptr, add_ptr, arrived_ptr, rows, mask_m, offs_n, N, stride_cm, pid_n, num_pid_n,
                          TOPK, HAS_ADD)


@triton.jit
def _combine_kernel(out_ptr, add_ptr, y_ptr, D, K: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK: tl.constexpr,
                    PDL: tl.constexpr = False):
    """y[t] = the sum of token t's K weighted expert outputs in fp32, rounded to y's dtype (then, with
    add, y[t] + add[t] rounded again: what adding a tensor of that dtype gives), one launch for what
    took a sum, a cast and an add."""
    wait_for_prior_kernels(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        acc += tl.load(out_ptr + (t * K + k) * D + offs, mask=mask, other=0.0).to(tl.float32)
    y = acc.to(y_ptr.dtype.element_ty)
    if HAS_ADD:
        y = (y.to(tl.float32) + tl.load(add_ptr + t * D + offs, mask=mask, other=0.0).to(tl.float32))
        y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + t * D + offs, y, mask=mask)


# Row blocks of at most this many rows multiply with swapped operands (SWAP_AB: the weight's columns as the
# MMA's rows), so that Hopper's warpgroup MMA, which needs 64 rows, takes decode's thin blocks (tests/
# sm90_build.py: wgmma for 16- and 32-row blocks only this way; FP8: e4m3 operands, where 16-row blocks
# widen them to fp16 for mma.sync); 0: never. 16 (decode of up to ~170 V2-Lite sequences): on an H200,
# batch-1 decode with FP8 weights 2.28 against 2.33 ms/token, 32 sequences with FP8 weights 5,126 against
# 5,007 tokens/s in decode steps, bf16 within noise (docs/benchmarks.md, "Batch 1's attention in our
# launches"). 32 (256 V2-Lite decodes' 32-row blocks too): with FP8 weights 22,910 and 22,995 tokens/s in
# decode steps against 22,312 and 22,479 at 16 (same call, twice each: the FP8 tiles on wgmma with e4m3
# operands, not widened on mma.sync); bf16 17,798 against 17,648 in an earlier call (noise).
SWAP_AB_MAX_BLOCK_M = 32


# FP8 experts: steps of up to this many tokens have the gate/up GEMM store the intermediate quantized (its
# column blocks 128 wide, one activation group a program: quantize_activation's arithmetic on the rows
# rounded to x's dtype, bit for bit), so that the down GEMM reads it with no quantize_activation launch
# between: a launch fewer a MoE layer, for gate/up programs twice as wide. 0 (never): on an H200, batch-1
# decode took 2.07 ms/token with it at one token against 2.04 without (half as many gate/up programs;
# docs/benchmarks.md, "The weights asked of L2 before the wait").
QUANTIZE_INTER_MAX_TOKENS = 0


# Read the expert weights' tiles through Hopper's tensor-memory accelerator (a descriptor over each
# weight as [E * rows, K]) rather than with every thread's pointers. Off: on an H200, 256 V2-Lite decodes
# took 17,888 tokens/s with it against 18,019 without (noise), where MLA decode gained 1.18x from the same
# change (docs/benchmarks.md, "MLA decode through TMA").
TMA = False
# FP8 experts: one token's shared experts (fused_moe's num_shared: which expert such a pick takes needs no
# load) have each GEMM ask L2 for their weight tiles before it waits for the kernel ahead
# (launch.PREFETCH_WEIGHTS): the gate/up GEMM's 2 of 8 tiles while the router runs. On an H200, batch-1
# decode with FP8 weights 1.93 against 1.96 ms/token (twice each); with bf16 experts, twice the bytes,
# 2.45 against 2.37, so not for them (docs/benchmarks.md, "The shared experts asked of L2").
PREFETCH_SHARED = True


def _tma_fits(*weights: torch.Tensor) -> bool:
    """A descriptor can read these stacked weights as [E * rows, K]: contiguous, 16-byte aligned rows."""
    return all(w.is_contiguous() and tma_aligned(w) for w in weights)


def default_config(rows_per_expert: float, fp8: bool = False) -> dict:
    """The launch config of both GEMMs, by the mean rows per expert; decode gets thin row blocks. FP8
    experts step K by whole 128-wide blocks (their e4m3 tiles are the bf16 tiles' bytes at twice the
    width); the prefill tier's column tiles are 64 wide, as the per-block scaling of each product
    needs its own registers (tests/sm90_build.py: no spills)."""
    if rows_per_expert < 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if fp8:  # the best of scripts/bench_fp8.py --moe-sweep on an H200 (V2-Lite's layer): 256 tokens
        # (24 rows an expert) 190 us against 257 with 64-row blocks; 1,024 tokens (96 rows) 380 against 469
        if rows_per_expert < 64:
            return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    if rows_per_expert < 128:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    # prefill: 128-wide column tiles (8% faster than 64 for gate/up at 4096 tokens of the V2-Lite shape
    # on an H200; scripts/profile_decode.py sweeps these)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _check_args(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale):
    name = "fused_moe"
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"{name}: expected x [T,D], w13 [E,2I,D], w2 [E,D,I];"
                         f" got {tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    T, D = x.shape
    E, two_i, _ = w13.shape
    if two_i % 2 or w13.shape[2] != D or w2.shape != (E, D, two_i // 2):
        raise ValueError(f"{name}: shapes disagree: x {tuple(x.shape)}, w13 {tuple(w13.shape)},"
                         f" w2 {tuple(w2.shape)} (want w13 [E, 2I, {D}] and w2 [E, {D}, I])")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"{name}: expected topk_weights and topk_ids [{T}, K];"
                         f" got {tuple(topk_weights.shape)} and {tuple(topk_ids.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name}: x dtype must be bf16, fp16 or fp32, got {x.dtype}")
    if (w13_scale is None) != (w2_scale is None):
        raise ValueError(f"{name}: pass both w13_scale and w2_scale (FP8 experts), or neither")
    if w13_scale is None and (w13.dtype != x.dtype or w2.dtype != x.dtype):
        raise ValueError(f"{name}: x, w13 and w2 must share a dtype; got {x.dtype}, {w13.dtype}, {w2.dtype}")
    if w13_scale is not None:
        I = two_i // 2
        want13, want2 = (E, 2 * cdiv(I, BLOCK), cdiv(D, BLOCK)), (E, cdiv(D, BLOCK), cdiv(I, BLOCK))
        if w13.dtype != FP8 or w2.dtype != FP8 or w13_scale.dtype != torch.float32 or w2_scale.dtype != torch.float32:
            raise ValueError(f"{name}: FP8 experts need float8_e4m3fn w13/w2 and fp32 scales; got {w13.dtype}, "
                             f"{w2.dtype}, {w13_scale.dtype}, {w2_scale.dtype}")
        if tuple(w13_scale.shape) != want13 or tuple(w2_scale.shape) != want2:
            raise ValueError(f"{name}: expected w13_scale {list(want13)} and w2_scale {list(want2)}; got "
                             f"{list(w13_scale.shape)}, {list(w2_scale.shape)}")
        if w13_scale.stride(2) != 1 or w2_scale.stride(2) != 1 or w13_scale.device != x.device \
                or w2_scale.device != x.device:
            raise ValueError(f"{name}: the scales need a contiguous last dim, on x's device")
    if topk_weights.dtype != torch.float32 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: topk_weights must be fp32 and topk_ids int32/int64;"
                         f" got {topk_weights.dtype}, {topk_ids.dtype}")
    if any(t.device != x.device for t in (w13, w2, topk_weights, topk_ids)):
        raise ValueError(f"{name}: all tensors must be on one device")
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError(f"{name}: x, w13 and w2 need a contiguous last dim")


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              add: torch.Tensor | None = None, *, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
              num_shared: int = 0, config: dict | None = None) -> torch.Tensor:
    """Routed experts, same contract as reference.moe: y [T, D] in x's dtype.

    x [T, D] (last dim contiguous); w13 [E, 2I, D] (gate_proj rows then up_proj rows) and w2 [E, D, I]
    (last dims contiguous) in x's dtype; topk_weights [T, K] fp32; topk_ids [T, K] int32/int64 in
    [0, E) or -1, E = w13.shape[0] (the experts held here): a -1 pick (an expert on another rank)
    adds exactly zero and costs no weight read or GEMM work (its routing weight is never read). The
    intermediate and the weighted expert outputs are rounded to x's dtype, the K picks are summed in
    fp32. FP8 experts: w13 and w2 in float8_e4m3fn with w13_scale [E, 2 ceil(I/128), ceil(D/128)] (the
    gate_proj's block rows, then the up_proj's) and w2_scale [E, ceil(D/128), ceil(I/128)] fp32, as
    reference.moe takes them; BLOCK_K is then 128. add [T, D] in x's dtype (the shared experts'
    output): added to the result as a tensor add would, in the same launch as the K picks' sum. x_fp8
    (FP8 experts): x already quantized, e4m3 [T, D] and fp32 scales [T, ceil(D / 128)] (the router's
    launch makes them: route's x_fp8), read instead of quantizing x. num_shared: each token's last
    num_shared picks are the last num_shared experts of the stack, always (the shared experts: MoE's
    ExpertStack), so one token's GEMMs over FP8 experts may ask L2 for their tiles before waiting for the
    kernel ahead (PREFETCH_SHARED); 0: nothing known. config
    (tests and tuning) overrides the GEMMs' launch config: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    num_warps, num_stages, SWAP_AB (the products as weight columns x rows; default for row blocks
    of up to SWAP_AB_MAX_BLOCK_M rows), QUANTIZE_INTER (FP8: the gate/up GEMM stores the intermediate
    quantized; default up to QUANTIZE_INTER_MAX_TOKENS tokens) and TMA (the weights' tiles through tensor
    descriptors; default: the TMA setting, on a Hopper-class GPU, for contiguous weights). No host
    synchronisation.
    """
    _check_args(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    T, D = x.shape
    E, I = w13.shape[0], w2.shape[2]
    K = topk_ids.shape[1]
    if add is not None and (add.shape != (T, D) or add.dtype != x.dtype or not add.is_contiguous()
                            or add.device != x.device):
        raise ValueError(f"fused_moe: add must be a contiguous [{T}, {D}] {x.dtype} tensor on x's device; got "
                         f"{tuple(add.shape)} {add.dtype}")
    fp8 = w13_scale is not None
    if x_fp8 is not None:
        if not fp8:
            raise ValueError("fused_moe: x_fp8 is for FP8 experts")
        check_quantized_out("fused_moe x_fp8", *x_fp8, T, D, cdiv(D, BLOCK))
    if T == 0:
        return x.new_empty(0, D)
    cfg = dict(config or default_config(T * K / E, fp8), **({"BLOCK_K": BLOCK} if fp8 else {}))  # K steps: blocks
    if fp8 and (cfg["BLOCK_N"] > BLOCK or BLOCK % cfg["BLOCK_N"]):
        raise ValueError(f"fused_moe: FP8 experts need BLOCK_N dividing {BLOCK}, got {cfg['BLOCK_N']}")
    swap_ab = cfg.pop("SWAP_AB", cfg["BLOCK_M"] <= SWAP_AB_MAX_BLOCK_M)
    quantize_inter = cfg.pop("QUANTIZE_INTER", T <= QUANTIZE_INTER_MAX_TOKENS)
    tma = cfg.pop("TMA", None)
    if tma is None:
        tma = TMA and hopper_class(x.device) and _tma_fits(w13, w2)
    elif tma and not _tma_fits(w13, w2):
        raise ValueError(f"fused_moe: TMA needs contiguous w13 and w2 with rows of a multiple of 16 bytes; got "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)} {w13.dtype}")
    if T == 1:  # one token: its picks are distinct experts, a block each, in pick order (no alignment launch)
        flat = topk_ids.reshape(-1)
        align = MoeAlignment(flat, flat, flat)  # only expert_ids (the picks' ids) is read
        max_padded = K * cfg["BLOCK_M"]
    else:
        align = moe_align(topk_ids, E, cfg["BLOCK_M"])
        max_padded = align.sorted_ids.numel()
    weights = topk_weights.reshape(-1)
    # one token's shared FP8 experts' tiles asked of L2 before each GEMM waits (PREFETCH_SHARED)
    prefetch = prefetch_launch(x.device, T) if PREFETCH_SHARED and fp8 and T == 1 and num_shared else {}
    on_cpu = x.device.type == "cpu"  # CPU tensors only run under TRITON_INTERPRET=1
    precision = "ieee" if x.dtype == torch.float32 else "tf32"

    y = torch.empty(T, D, dtype=x.dtype, device=x.device)
    combine = combine_in_gemm(T, D, cfg["BLOCK_N"], x.device)

    def launch(a, b, scale, c, n, k, a_row_div, gate_up, mul_weight, a_scale=None, c_scale=None):
        """One GEMM; FP8: a quantized first unless a_scale is given (a already e4m3), c quantized by the
        GEMM itself with c_scale (the gate/up GEMM's output, a program a 128-wide group)."""
        launch_cfg = dict(cfg, BLOCK_N=BLOCK) if c_scale is not None else cfg
        grid = (triton.cdiv(max_padded, launch_cfg["BLOCK_M"]) * triton.cdiv(n, launch_cfg["BLOCK_N"]),)
        scale = scale if fp8 else weights  # unused without FP8
        if a_scale is None:
            a, a_scale = quantize_activation(a) if fp8 else (a, weights)
        c_scale = weights if c_scale is None else c_scale  # (unused without QUANTIZE_OUT)
        tile = [launch_cfg["BLOCK_N"], launch_cfg["BLOCK_K"]]
        b_desc = TensorDescriptor.from_tensor(b.view(-1, k), tile) if tma else b
        _moe_gemm_kernel[grid](
            a, b, b_desc, c, weights, align.sorted_ids, align.expert_ids, align.num_padded, scale, a_scale, c_scale,
            y, add if add is not None else y, combine if combine is not None else y, n, k,
            max_padded, T * K, E, cdiv(n, BLOCK), num_shared, a.stride(0), b.stride(0), b.stride(1), c.stride(0),
            scale.stride(0) if fp8 else 0, scale.stride(1) if fp8 else 0, a_scale.stride(0) if fp8 else 0,
            a_scale.stride(1) if fp8 else 0, c_scale.stride(0) if c_scale.dim() == 2 else 0,
            A_ROW_DIV=a_row_div, GATE_UP=gate_up, MUL_WEIGHT=mul_weight, FP8_W=fp8,
            EVEN_K=k % launch_cfg["BLOCK_K"] == 0, UPCAST_DOT=on_cpu, DOT_PRECISION=precision, ONE_ROW_BLOCKS=T == 1,
            COMBINE=mul_weight and combine is not None, TOPK=K, HAS_ADD=add is not None,
            SWAP_AB=swap_ab, TMA=tma, QUANTIZE_OUT=c.dtype == FP8, FP8_MAX=FP8_MAX, EPS=EPS, **launch_cfg,
            **pdl_launch(a.device, T), **prefetch,
            **(dict(PREFETCH_LINES=triton.next_power_of_2(cdiv(k * b.element_size(), 128)), LINE=128 // b.element_size())
               if prefetch else {}),
        )

    a, a_scale = x_fp8 if x_fp8 is not None else (x, None)  # the gate/up GEMM's input: x, or x quantized
    if fp8 and quantize_inter:  # the intermediate in e4m3, quantized by the gate/up GEMM as it stores it
        inter = torch.empty(T * K, I, dtype=FP8, device=x.device)
        inter_scale = torch.empty(T * K, cdiv(I, BLOCK), dtype=torch.float32, device=x.device)
        launch(a, w13, w13_scale, inter, I, D, K, True, False, a_scale=a_scale, c_scale=inter_scale)
    else:
        inter = x.new_empty(T * K, I)                   # silu(gate) * up, row t*K + k
        inter_scale = None
        launch(a, w13, w13_scale, inter, I, D, K, True, False, a_scale=a_scale)
    out = x.new_empty(T * K, D)                         # weighted expert outputs
    launch(inter, w2, w2_scale, out, D, I, 1, False, True, a_scale=inter_scale)
    if combine is None:
        block = 1024
        _combine_kernel[(T, triton.cdiv(D, block))](out, add if add is not None else y, y, D, K=K,
                                                    HAS_ADD=add is not None, BLOCK=block, num_warps=4,
                                                    **pdl_launch(y.device, T))
    return y


# Steps of up to this many tokens sum each token's picks in the down GEMM (_sum_arrived_rows: the last
# program to store a token's row of a column block adds them up), not in _combine_kernel's launch after
# it: a launch fewer a MoE layer. 0: never. Off: on an H200, batch-1 decode with it and the other
# launch-saving settings on was no faster (2.53 against 2.56 ms/token; docs/benchmarks.md).
COMBINE_IN_GEMM_MAX_TOKENS = 0
_ARRIVALS = 1 << 16  # counters: tokens x column blocks of the down GEMM (64 x 1024)


def combine_in_gemm(T: int, D: int, block_n: int, device: torch.device) -> torch.Tensor | None:
    """The arrival counters for a down GEMM that sums the picks itself, or None (_combine_kernel does)."""
    if T > COMBINE_IN_GEMM_MAX_TOKENS or T * triton.cdiv(D, block_n) > _ARRIVALS:
        return None
    return arrival_counters(device, "moe combine", _ARRIVALS)

