"""The linear layers on the GPU: F.linear (cuBLAS) for a weight in the model's dtype, and for an FP8
weight with 128 x 128 block scales (W8A8, the activations quantized per token in groups of 128):

- up to FUSED_MAX_M rows (decode): one Triton kernel, after DeepSeek-V3's fp8_gemm, that quantizes the
  activations as it goes (no separate quantization kernel, no FP8 copy of x in memory): a program owns
  BLOCK_M rows of x and BLOCK_N output columns, its K loop steps one 128-wide activation group at a
  time, aligned with the weight's blocks, takes each row's absolute max, scales the group to e4m3 in
  registers, multiplies it with the weight tile on the FP8 tensor cores and adds the product times both
  scales (the rows' and the columns' weight block) into an fp32 accumulator;
- more rows: x is quantized once by its own kernel (`quantize_activation`; re-quantizing it in every
  column block's program made the fused kernel 3-4x slower than bf16 at 256 rows and more), then
  torch._scaled_mm (cuBLAS, 1x128 activation and 128x128 weight block scales) where its layout
  rules hold (block-aligned part, K a multiple of 512, N of 128: measured 1.4x faster than bf16 at
  4096 rows, docs/fp8.md; a weight zero-padded to such a K at inference, fp8.pad_columns, at its padded
  width), else the same Triton kernel reading the pre-quantized x.

Every path quantizes with the arithmetic of kernels/fp8.py's quantize_activation, so the e4m3 values
are bit-identical to the reference's. A tensor-parallel part that starts inside a block (block_offset)
just starts its first group before column 0, masked. No host synchronisation: CUDA-graph capturable.

Letters: M rows (tokens), N output features, K input features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from .fp8 import BLOCK, EPS, FP8, FP8_MAX, SCALED_MM_K, cdiv, scale_shape, zero_padded
from .launch import arrival_counters, num_sms, pdl_launch, prefetch_l2, prefetch_launch, wait_for_prior_kernels


@triton.jit
def quantize_rows(x, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    """One activation group per row, x [ROWS, 128] (any float dtype; masked lanes 0) -> (e4m3 values,
    fp32 scales [ROWS]): scale = row max / 448, values times its reciprocal, as kernels/fp8.py does."""
    x = x.to(tl.float32)
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), EPS), FP8_MAX)
    return tl.clamp(x * tl.div_rn(1.0, scale)[:, None], -FP8_MAX, FP8_MAX).to(tl.float8e4nv), scale


@triton.jit
def store_quantized_groups(y, row, first_group, width, q_ptr, qs_ptr, stride_q, stride_qs, stride_qsg,
                           GROUPS: tl.constexpr, GROUP: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    """A row's GROUPS x GROUP values y [GROUPS * GROUP] (masked lanes 0) quantized as quantize_activation
    does, stored at groups first_group.. of row `row` (columns below width): e4m3 into q, scales into qs.
    The in-launch quantization of an FP8 GEMM's input (rms_norm's and silu_and_mul's x_fp8)."""
    q, scale = quantize_rows(tl.reshape(y, (GROUPS, GROUP)), FP8_MAX, EPS)
    groups = first_group + tl.arange(0, GROUPS)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    tl.store(q_ptr + row * stride_q + cols, q, mask=cols < width)
    tl.store(qs_ptr + row * stride_qs + groups * stride_qsg, scale, mask=groups * GROUP < width)


def check_x_fp8(name: str, x_fp8: tuple[torch.Tensor, torch.Tensor], rows: int, widths: tuple[int, ...],
                device: torch.device) -> int:
    """Raise unless x_fp8 can hold `rows` rows of activations quantized at one of `widths`: e4m3 [M', W] and
    fp32 [M', ceil(W / 128)] (M' >= rows, last dim contiguous, any scale strides) on `device`. Returns W."""
    q, s = x_fp8
    width = q.shape[-1] if q.dim() == 2 else -1
    if width not in widths:
        raise ValueError(f"{name}: x_fp8 must be {' or '.join(map(str, widths))} columns wide; got {tuple(q.shape)}")
    check_quantized_out(f"{name} x_fp8", q, s, q.shape[0], width, cdiv(width, BLOCK))
    if q.shape[0] < rows or q.device != device or s.device != device:
        raise ValueError(f"{name}: x_fp8 holds {q.shape[0]} rows on {q.device}; needs {rows} on {device}")
    return width


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program pid's (row block, column block): GROUP_M row blocks walk the columns together, so their
    weight tiles are shared in L2. Shared with the fused MoE."""
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_pid_n)) % group_m, (pid % (GROUP_M * num_pid_n)) // group_m


@triton.jit
def accumulate(acc, a, b, scale, FP8_W: tl.constexpr, SWAP_AB: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b for a [rows, K] and b [K, columns]; FP8_W: the product scaled by scale [rows], the rows'
    activation scales times the weight block's (one for the tile: its columns lie in one 128-row block,
    so a multiply a row, not one an element). SWAP_AB: acc is [columns, rows] and gets b^T a^T, so that
    the weight's columns are the MMA's rows: Hopper's warpgroup MMA needs 64 of them, and decode's
    row blocks hold 16 or 32. Shared with the fused MoE."""
    if FP8_W:
        if SWAP_AB:
            acc += tl.dot(tl.trans(b), tl.trans(a)) * scale[None, :]
        else:
            acc += tl.dot(a, b) * scale[:, None]
    elif SWAP_AB:
        acc = tl.dot(tl.trans(b), tl.trans(a), acc=acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, M, M_PAD, K, K_PAD, col_offset, stride_xm, stride_qm, stride_sm, stride_sg,
                     ROWS: tl.constexpr, GROUP: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr,
                     PDL: tl.constexpr = False):
    """ROWS rows of x, one 128-wide group (program_id 1) -> e4m3 values and the rows' scales of it; rows
    M..M_PAD-1 and columns K..K_PAD-1 (padding) get zeros."""
    wait_for_prior_kernels(PDL)
    g = tl.program_id(1)
    offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    k = g * GROUP - col_offset + tl.arange(0, GROUP)
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + k[None, :],
                mask=(offs_m < M)[:, None] & ((k >= 0) & (k < K))[None, :], other=0.0)
    q, scale = quantize_rows(x, FP8_MAX, EPS)
    tl.store(q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm + k[None, :], q,
             mask=(offs_m < M_PAD)[:, None] & ((k >= 0) & (k < K_PAD))[None, :])
    tl.store(s_ptr + offs_m * stride_sm + g * stride_sg, scale, mask=offs_m < M_PAD)


def quantize_activation(x: torch.Tensor, col_offset: int = 0, pad_rows: int = 1,
                        scales_column_major: bool = False, width: int | None = None, *,
                        out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels/fp8.py's quantize_activation on the GPU, bit for bit: x [M, K] (last dim contiguous) ->
    (e4m3 [M', K'], fp32 scales [M', ceil((K' + col_offset) / 128)]), M' = M rounded up to pad_rows, K' =
    width (a multiple of 128 with col_offset 0; None: K), the padding rows and columns zero; the scales'
    storage M-major if scales_column_major (what cuBLAS asks for). out: the two tensors to write (of those
    shapes, last dims contiguous), returned."""
    M, K = x.shape
    M_pad = cdiv(M, pad_rows) * pad_rows
    K_pad = width or K
    if K_pad < K or (K_pad > K and (col_offset or K_pad % BLOCK)):
        raise ValueError(f"quantize_activation: width {K_pad} must be K ({K}) or a multiple of {BLOCK} above it"
                         f" with col_offset 0 (got {col_offset})")
    G = cdiv(K_pad + col_offset, BLOCK)
    if out is not None:
        q, s = out
        check_quantized_out("quantize_activation", q, s, M_pad, K_pad, G)
    else:
        q = torch.empty(M_pad, K_pad, dtype=FP8, device=x.device)
        s = (torch.empty(G, M_pad, dtype=torch.float32, device=x.device).t() if scales_column_major
             else torch.empty(M_pad, G, dtype=torch.float32, device=x.device))
    if M_pad:
        _quantize_kernel[(triton.cdiv(M_pad, 16), G)](
            x, q, s, M, M_pad, K, K_pad, col_offset, x.stride(0), q.stride(0), s.stride(0), s.stride(1),
            ROWS=16, GROUP=BLOCK, FP8_MAX=FP8_MAX, EPS=EPS, num_warps=4, **pdl_launch(x.device, M))
    return q, s


def check_quantized_out(name: str, q: torch.Tensor, s: torch.Tensor, M: int, K: int, groups: int) -> None:
    """Raise unless (q, s) can hold M rows of K activations quantized in `groups` groups: e4m3 [M, K] and
    fp32 [M, groups] (a kernel's out= buffers; scales may be M-major)."""
    if (q.dtype != FP8 or tuple(q.shape) != (M, K) or q.stride(-1) != 1 or s.dtype != torch.float32
            or tuple(s.shape) != (M, groups)):
        raise ValueError(f"{name}: out must be e4m3 [{M}, {K}] (last dim contiguous) and fp32 [{M}, {groups}]; got "
                         f"{q.dtype} {tuple(q.shape)}, {s.dtype} {tuple(s.shape)}")


@triton.jit
def _plain_product(x_ptrs, p_ptr, offs_n, mask_m, N_PLAIN, K, first, last, stride_pn, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """x's groups first..last-1 times the rows offs_n of the plain weight p [N_PLAIN, K] (x's dtype), in
    fp32: a program of the plain rows that follow the FP8 weight's (linear's plain_rows)."""
    offs_k = tl.arange(0, GROUP)
    mask_n = offs_n < N_PLAIN
    p_ptrs = p_ptr + offs_n.to(tl.int64)[None, :] * stride_pn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(first, last):
        k = g * GROUP + offs_k
        x = tl.load(x_ptrs + k[None, :], mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
        w = tl.load(p_ptrs + k[:, None], mask=(k < K)[:, None] & mask_n[None, :], other=0.0)  # [GROUP, BLOCK_N]
        if UPCAST_DOT:  # Triton 3.6's interpreter multiplies bf16 as raw uint16 bits
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc=acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fp8_product(x_ptrs, xs_ptr, w_ptrs, s_ptr, offs_m, offs_k, mask_m, mask_n, scale_rows, K, first, last,
                 stride_xsm, stride_xsg, stride_sn, A_FP8: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr, ONE_SCALE_ROW: tl.constexpr,
                 SWAP_AB: tl.constexpr = False):
    """x's groups first..last-1 (e4m3 with scales xs if A_FP8, else quantized here) times the FP8 weight's
    columns, each group's product scaled by the rows' and the weight block's scales, in fp32.
    ONE_SCALE_ROW: the tile's columns lie in one block row, scale_rows (a scalar): one weight scale a
    group, so a multiply a row scales the product, not one an element (same numbers). SWAP_AB (with
    ONE_SCALE_ROW): the products as w^T x^T, transposed back at the end, so that the warpgroup MMA, which
    needs 64 rows, takes a few rows' tile with e4m3 operands."""
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(first, last):
        k = g * GROUP + offs_k
        mask_k = (k >= 0) & (k < K)
        x = tl.load(x_ptrs + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if A_FP8:
            x_q = x
            x_scale = tl.load(xs_ptr + offs_m * stride_xsm + g * stride_xsg, mask=mask_m, other=0.0)
        else:
            x_q, x_scale = quantize_rows(x, FP8_MAX, EPS)                                # [BLOCK_M, GROUP]
        w = tl.load(w_ptrs + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [GROUP, BLOCK_N]
        if ONE_SCALE_ROW:
            acc = accumulate(acc, x_q, w, x_scale * tl.load(s_ptr + scale_rows * stride_sn + g), True, SWAP_AB,
                             "tf32")  # (DOT_PRECISION: unused for e4m3)
        else:
            w_scale = tl.load(s_ptr + scale_rows * stride_sn + g, mask=mask_n, other=0.0)  # [BLOCK_N]
            acc += tl.dot(x_q, w) * (x_scale[:, None] * w_scale[None, :])
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _fp8_linear_kernel(
    x_ptr, xs_ptr, xp_ptr, w_ptr, s_ptr, p_ptr, bias_ptr, y_ptr, sum_ptr, arrived_ptr, M, N, N_PLAIN, K, row_offset,
    col_offset, groups_per_piece, stride_xm, stride_xsm, stride_xsg, stride_xpm, stride_wn, stride_sn, stride_pn,
    stride_ym, stride_ys, stride_sum,
    HAS_BIAS: tl.constexpr, A_FP8: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr,
    SUM_ARRIVED: tl.constexpr, BIAS_IN_SUM: tl.constexpr, HAS_PLAIN: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ONE_SCALE_ROW: tl.constexpr, PIECES: tl.constexpr = 1, PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, SWAP_AB: tl.constexpr = False,
):
    """A_FP8: x is already e4m3 with scales xs [M, groups] (quantize_activation); else x in its float
    dtype, quantized here. Program axis 1: a piece of K, groups_per_piece groups of it; with several
    pieces y is the fp32 partial sums [pieces, M, N'] (stride_ys apart) that sum_pieces adds up, or
    (SUM_ARRIVED) that the last piece of a tile to arrive adds up into sum_ptr [M, N'] itself, with sum_pieces'
    arithmetic (in piece order in fp32, + bias if BIAS_IN_SUM, rounded once), counting on arrived_ptr;
    PIECES: then the number of pieces.
    HAS_PLAIN: N_PLAIN more output columns after the N of the FP8 weight (N a multiple of BLOCK_N, no
    col_offset), the product of unquantized x (xp: x itself, also where A_FP8) with the plain weight p
    [N_PLAIN, K] in x's dtype; N' = N + N_PLAIN.
    PREFETCH: the program's weight lines asked of L2 before the wait (launch.PREFETCH_WEIGHTS).
    ONE_SCALE_ROW: every tile's columns lie in one 128-row weight block (no row_offset, BLOCK_N dividing 128)."""
    num_pid_n = tl.cdiv(N, BLOCK_N) + (tl.cdiv(N_PLAIN, BLOCK_N) if HAS_PLAIN else 0)
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_pid_n, GROUP_M)
    piece = tl.program_id(1)
    width = N + N_PLAIN if HAS_PLAIN else N                              # y's columns

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if ONE_SCALE_ROW:
        scale_rows = (pid_n * BLOCK_N + row_offset) // GROUP             # the tile's weight block row
    else:
        scale_rows = (offs_n + row_offset) // GROUP                      # each column's weight block row
    offs_k = tl.arange(0, GROUP) - col_offset                            # group 0's columns (< 0: not ours)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    first = piece * groups_per_piece
    last = tl.minimum(first + groups_per_piece, tl.cdiv(K + col_offset, GROUP))
    if PREFETCH:  # no kernel writes the weights: their lines may come from HBM while the kernel ahead runs
        for g in range(first, last):
            prefetch_l2(w_ptrs + tl.maximum(g * GROUP - col_offset, 0), mask_n)  # an FP8 row's group: one line
            if HAS_PLAIN:  # a plain row's group: 128 values, asked for 32 at a time (an fp32 line)
                rows = offs_n - N
                lines = g * GROUP + tl.arange(0, 4) * 32
                prefetch_l2(p_ptr + rows.to(tl.int64)[:, None] * stride_pn + lines[None, :],
                            ((rows >= 0) & (rows < N_PLAIN))[:, None] & (lines < K)[None, :])
    wait_for_prior_kernels(PDL)
    if HAS_PLAIN:  # (a static branch first: the plain rows' dot is compiled only for launches that have them)
        if pid_n * BLOCK_N >= N:
            acc = _plain_product(xp_ptr + offs_m.to(tl.int64)[:, None] * stride_xpm, p_ptr, offs_n - N, mask_m,
                                 N_PLAIN, K, first, last, stride_pn, GROUP, BLOCK_M, BLOCK_N, UPCAST_DOT, DOT_PRECISION)
        else:
            acc = _fp8_product(x_ptrs, xs_ptr, w_ptrs, s_ptr, offs_m, offs_k, mask_m, mask_n, scale_rows, K, first,
                               last, stride_xsm, stride_xsg, stride_sn, A_FP8, GROUP, BLOCK_M, BLOCK_N, FP8_MAX, EPS,
                               ONE_SCALE_ROW, SWAP_AB)
    else:
        acc = _fp8_product(x_ptrs, xs_ptr, w_ptrs, s_ptr, offs_m, offs_k, mask_m, mask_n, scale_rows, K, first, last,
                           stride_xsm, stride_xsg, stride_sn, A_FP8, GROUP, BLOCK_M, BLOCK_N, FP8_MAX, EPS,
                           ONE_SCALE_ROW, SWAP_AB)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask_n = offs_n < width
    y_ptrs = y_ptr + piece * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if SUM_ARRIVED:
        tl.debug_barrier()  # every store of this program issued before its arrival is counted (release)
        counter = arrived_ptr + pid_m * num_pid_n + pid_n
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == tl.num_programs(1) - 1:
            tl.debug_barrier()  # the acquiring thread's view passed to every thread before the partials are read
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            parts = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
            for p in tl.static_range(PIECES):  # .cg: from L2, where the other pieces' partials are (the
                # loads issued together, not one piece's wait after another)
                total += tl.load(parts + p * stride_ys, mask=mask_m[:, None] & mask_n[None, :], other=0.0,
                                 cache_modifier=".cg")
            if BIAS_IN_SUM:
                total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(sum_ptr + offs_m.to(tl.int64)[:, None] * stride_sum + offs_n[None, :],
                     total.to(sum_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
            tl.store(counter, 0)  # zero again for the next launch


@triton.jit(do_not_specialize=["M"])
def _sum_pieces_kernel(part_ptr, bias_ptr, y_ptr, M, N, stride_ym, stride_ps, PIECES: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """y[row, cols] = sum over the pieces of part[piece, row, cols] (+ bias), rounded once."""
    wait_for_prior_kernels(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for piece in tl.static_range(PIECES):
        acc += tl.load(part_ptr + piece * stride_ps + row * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


FUSED_MAX_M = 16       # up to this many rows the GEMM quantizes x itself (decode)
# K in pieces: the last piece of each tile to arrive sums the pieces itself (an atomic count, as the router's),
# instead of sum_pieces' launch after the GEMM: a launch fewer an FP8 linear layer at few rows. On an H200
# with every FP8 projection of the attention in our launches (plain_rows), batch-1 decode with FP8 weights
# took 2.05 ms/token with it against 2.08 without (three times each), 256 sequences the same (23,022 against
# 22,983 tokens/s in decode steps); before, with cuBLAS's kv_a_proj between, no faster (docs/benchmarks.md,
# "The FP8 query projection and the bf16 kv_a_proj in one launch").
SUM_PIECES_IN_GEMM = True
_COUNTERS = 1 << 16    # arrival counters: the tiles of one GEMM
_PROGRAMS_PER_SM = 2   # few rows: K is cut into pieces until about this many programs per SM
SCALED_MM_MIN_M = 128  # from this many rows torch._scaled_mm, where its layout rules hold (None: never)
# Launches of up to this many rows (decode's 16-row tiles) multiply with swapped operands, the weight's 64
# columns as the MMA's rows, so that Hopper's warpgroup MMA takes e4m3 as it is (16 rows are below its 64;
# unswapped, they run mma.sync with e4m3 widened to fp16 in registers), as the fused MoE's thin blocks do
# (moe.SWAP_AB_MAX_BLOCK_M). sm_90 build, one row: 291 instructions a K step against 382, 77 registers against
# 96. On an H200, batch-1 decode with FP8 weights 1.85 ms/token with it in three runs against 1.88 without in
# five (three calls; docs/benchmarks.md, "Swapped operands on by default").
SWAP_AB_MAX_M = 16
# linear's plain_rows in the FP8 GEMM's launch where it can take them (decode's few rows); False: always a
# second product beside it (cuBLAS for the bf16 kv_a_proj_with_mqa).
PLAIN_ROWS_IN_LAUNCH = True
# ... and up to this many rows, past FUSED_MAX_M (x quantized first): the Triton GEMM with the plain rows in
# its launch in place of cuBLAS's FP8 GEMM and a bf16 one beside (at 256 decodes the query projection took
# 10 us in cuBLAS and the bf16 kv_a_proj_with_mqa 6.1 beside it: docs/benchmarks.md, "Where a 256-sequence
# decode step goes"). Built, passes the interpreter's tests; 16 (none past the fused rows) until timed on a GPU
# (scripts/gpu_check.sh more256).
PLAIN_ROWS_IN_LAUNCH_MAX_M = 16


def default_config(M: int, N: int = 0, groups: int = 1, sms: int = 132) -> dict:
    """Launch config by the number of rows (and, for few rows, the columns N and K's groups of 128).
    Decode: thin row blocks and column blocks of 64, and K cut into pieces until about
    _PROGRAMS_PER_SM programs per SM read the weight at once. On an H200 at one row this took V2-Lite's
    projections from 1.3-1.6x cuBLAS bf16's time to 1.0-1.2x, and V2's q_b_proj to 0.7x (a sweep of
    the launch, `scripts/bench_fp8.py --few-rows`, found the best at 130-380 programs: docs/fp8.md).
    A batch of decodes (129-512 rows) takes 64 x 64 tiles, K in pieces the same way: at 256 rows the
    best of a sweep (`--few-rows=256`) for the shapes torch._scaled_mm cannot take ran 18.8 us against
    28.6 with 128 x 128 tiles (the shared experts' down_proj, K = 2816, 3 pieces, as this rule gives) and
    13.9 against 23.3 (kv_a_proj, N = 576, with 4 pieces; this rule gives 8, not timed alone)."""
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=3, PIECES=_pieces(M, 16, N, groups, sms))
    if M <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=4)
    if M <= 512:
        return dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=3, PIECES=_pieces(M, 64, N, groups, sms))
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)


def _pieces(M: int, block_m: int, N: int, groups: int, sms: int) -> int:
    """How many pieces to cut K's groups into so that about _PROGRAMS_PER_SM programs per SM run the
    GEMM in 64-wide column blocks (at least one piece, at most one group each)."""
    blocks = cdiv(M, block_m) * cdiv(N, 64)
    return max(1, min(groups, cdiv(_PROGRAMS_PER_SM * sms, max(blocks, 1))))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_scale_inv: torch.Tensor | None = None, block_offset: tuple[int, int] = (0, 0), *,
           plain_rows: torch.Tensor | None = None, config: dict | None = None,
           x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as reference.linear: y [..., N] = x W^T (+ bias) in x's dtype (with plain_rows,
    (y, y2 [..., N2]): views of one output where one launch makes both, else two tensors).

    Without weight_scale_inv, F.linear. With it: weight [N, K] float8_e4m3fn (rows may be strided, the
    last dim contiguous: a view of a fused matrix is fine), weight_scale_inv [ceil((N + r) / 128),
    ceil((K + c) / 128)] fp32 for block_offset (r, c); x [..., K] bf16/fp16/fp32 with a contiguous
    last dim; bias [N] or None. config (tests and tuning): BLOCK_M, BLOCK_N, GROUP_M, num_warps,
    num_stages, FUSED (default True: quantize x inside the GEMM; False: quantize_activation first) and
    PIECES (K cut into this many pieces of whole groups, their fp32 partials summed by a second
    launch; default_config picks it for few rows); with a config the Triton kernel always runs.
    plain_rows [N2, K] in x's dtype (reference.linear's contract): x times them unquantized, a second output
    y2; with an FP8 weight, no bias and no block_offset, up to FUSED_MAX_M rows in the same
    launch (FP8 query projection and the bf16 kv_a_proj_with_mqa: a cuBLAS GEMM fewer a layer; with x
    quantized first up to PLAIN_ROWS_IN_LAUNCH_MAX_M rows). config's
    SWAP_AB: the FP8 products as weight columns x rows (default up to SWAP_AB_MAX_M rows; tiles inside one
    weight block row only). x_fp8: x already quantized (quantize_activation's values), e4m3 [M', K] (or
    the width of the weight's zero columns, fp8.pad_columns, zeros past K) and fp32 scales [M', groups] with
    M' >= M rows (rows past M are not read for the result), read
    instead of quantizing x where the path taken reads that layout: torch._scaled_mm with M' = M rounded
    up to 128 and M-major scales (fp8.quantized_buffers), the Triton kernel with x quantized first and no
    block_offset column; with x quantized inside the GEMM (few rows) it is not needed. No host
    synchronisation.
    """
    if weight_scale_inv is None:
        return reference.linear(x, weight, bias, plain_rows=plain_rows)
    name = "fp8 linear"
    if weight.dim() != 2 or weight.dtype != FP8:
        raise ValueError(f"{name}: expected a float8_e4m3fn weight [N, K]; got {weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    r, c = block_offset
    if not (0 <= r < BLOCK and 0 <= c < BLOCK):
        raise ValueError(f"{name}: block_offset must lie in [0, {BLOCK}), got {block_offset}")
    if weight_scale_inv.dtype != torch.float32 or tuple(weight_scale_inv.shape) != scale_shape(N, K, block_offset):
        raise ValueError(f"{name}: expected weight_scale_inv {list(scale_shape(N, K, block_offset))} fp32; got "
                         f"{weight_scale_inv.dtype} {list(weight_scale_inv.shape)}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{name}: x [..., {K}] expected, got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name}: x dtype must be bf16, fp16 or fp32, got {x.dtype}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"{name}: bias [{N}] expected, got {tuple(bias.shape)}")
    if plain_rows is not None and (plain_rows.dim() != 2 or plain_rows.shape[1] != K or plain_rows.dtype != x.dtype
                                   or plain_rows.stride(1) != 1):
        raise ValueError(f"{name}: plain_rows [N2, {K}] {x.dtype} with a contiguous last dim expected, got "
                         f"{tuple(plain_rows.shape)} {plain_rows.dtype}")
    wide, wide_scale = zero_padded(weight, weight_scale_inv)
    if x_fp8 is not None:  # x's width, or the weight's zero columns' (zeros past K)
        check_x_fp8(name, x_fp8, x.numel() // K, (K, wide.shape[1]), x.device)
    tensors = [x, weight, weight_scale_inv] + [t for t in (bias, plain_rows) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"{name}: all tensors must be on one device")
    if x.stride(-1) != 1 or weight.stride(1) != 1 or weight_scale_inv.stride(1) != 1:
        raise ValueError(f"{name}: x, weight and weight_scale_inv need a contiguous last dim")

    shape = x.shape
    x = x.reshape(-1, K)
    M = x.shape[0]
    N2 = 0 if plain_rows is None else plain_rows.shape[0]
    y = torch.empty(M, N + N2, dtype=x.dtype, device=x.device)
    if M == 0 or N + N2 == 0:
        return y.view(*shape[:-1], N + N2) if plain_rows is None else _two_outputs(y, N, shape)
    groups = cdiv(K + c, BLOCK)
    cfg = config or default_config(M, N + N2, groups, num_sms(x.device))
    fused = M <= FUSED_MAX_M if config is None else config.get("FUSED", True)
    if plain_rows is not None and not (PLAIN_ROWS_IN_LAUNCH and (fused or M <= PLAIN_ROWS_IN_LAUNCH_MAX_M)
                                       and bias is None and block_offset == (0, 0) and N % cfg["BLOCK_N"] == 0):
        # the plain rows beside, not in, this launch: two outputs (no copy into one)
        return (linear(x, weight, bias, weight_scale_inv, block_offset, config=config, x_fp8=x_fp8).view(*shape[:-1], N),
                F.linear(x, plain_rows).view(*shape[:-1], N2))
    if plain_rows is None and config is None and use_scaled_mm(x, wide, wide_scale, block_offset):
        # cuBLAS: x quantized with its rows padded to whole 128-row tiles (and its columns to the weight's
        # zero columns, if any) and M-major scales
        if x_fp8 is not None and x_fp8[0].shape == (cdiv(M, BLOCK) * BLOCK, wide.shape[1]) and x_fp8[1].stride(0) == 1:
            xq, xs = x_fp8
        else:
            xq, xs = quantize_activation(x, pad_rows=BLOCK, scales_column_major=True, width=wide.shape[1])
        out = torch._scaled_mm(xq, wide.t(), scale_a=xs, scale_b=wide_scale.t(), out_dtype=x.dtype)[:M]
        y = out if bias is None else (out.float() + bias.float()).to(x.dtype)
        return y.view(*shape[:-1], N)
    per_piece = cdiv(groups, cfg.get("PIECES", 1))
    pieces = cdiv(groups, per_piece)
    cfg = {k: v for k, v in cfg.items() if k not in ("FUSED", "PIECES")}
    one_scale_row = r == 0 and BLOCK % cfg["BLOCK_N"] == 0
    cfg["SWAP_AB"] = cfg.get("SWAP_AB", M <= SWAP_AB_MAX_M and one_scale_row)
    if cfg["SWAP_AB"] and not one_scale_row:
        raise ValueError(f"{name}: SWAP_AB needs tiles inside one weight block row (no block_offset row, BLOCK_N "
                         f"dividing {BLOCK}); got block_offset {block_offset}, BLOCK_N {cfg['BLOCK_N']}")
    xq, xs = (x, y) if fused else x_fp8 if x_fp8 is not None and c == 0 else quantize_activation(x, c)
    out = y if pieces == 1 else torch.empty(pieces, M, N + N2, dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * (triton.cdiv(N, cfg["BLOCK_N"]) + triton.cdiv(N2, cfg["BLOCK_N"]))
    summed_here = pieces > 1 and SUM_PIECES_IN_GEMM and tiles <= _COUNTERS
    arrived = arrival_counters(x.device, "fp8 pieces", _COUNTERS) if summed_here else None
    _fp8_linear_kernel[(tiles, pieces)](
        xq, xs, x, weight, weight_scale_inv, plain_rows if plain_rows is not None else weight,
        bias if bias is not None else y, out, y, arrived if arrived is not None else y, M, N, N2, K, r, c, per_piece,
        xq.stride(0), xs.stride(0), xs.stride(1), x.stride(0), weight.stride(0), weight_scale_inv.stride(0),
        plain_rows.stride(0) if plain_rows is not None else 0, out.stride(-2), out.stride(0) if pieces > 1 else 0,
        y.stride(0),
        HAS_BIAS=bias is not None and pieces == 1, A_FP8=not fused, GROUP=BLOCK, FP8_MAX=FP8_MAX, EPS=EPS,
        SUM_ARRIVED=arrived is not None, PIECES=pieces if arrived is not None else 1,
        BIAS_IN_SUM=bias is not None and pieces > 1, HAS_PLAIN=plain_rows is not None,
        UPCAST_DOT=x.device.type == "cpu", DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        ONE_SCALE_ROW=one_scale_row, **cfg,
        **pdl_launch(x.device, M), **prefetch_launch(x.device, M),
    )
    if pieces > 1 and arrived is None:
        sum_pieces(out, bias, y)
    return y.view(*shape[:-1], N + N2) if plain_rows is None else _two_outputs(y, N, shape)


def _two_outputs(y: torch.Tensor, N: int, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """One output [M, N + N2] as the W part and the plain rows' part, views of it in x's leading shape."""
    return y[:, :N].view(*shape[:-1], N), y[:, N:].view(*shape[:-1], y.shape[1] - N)


def use_scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_offset: tuple[int, int]) -> bool:
    """Whether torch._scaled_mm takes this GEMM: a CUDA bf16/fp16 x of at least SCALED_MM_MIN_M rows, a
    block-aligned weight with row-major storage, K a multiple of SCALED_MM_K (cuBLAS pads the scales' K
    blocks to a multiple of 4: other K gave wrong products on the H200; fp8.pad_columns widens a weight to
    one) and N of 128."""
    N, K = weight.shape
    return (SCALED_MM_MIN_M is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and x.shape[0] >= SCALED_MM_MIN_M and block_offset == (0, 0) and K % SCALED_MM_K == 0 and N % BLOCK == 0
            and weight.stride() == (K, 1) and scale.stride() == (K // BLOCK, 1))


def sum_pieces(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """y [M, N] = the sum of the fp32 partials part [pieces, M, N] (contiguous) + bias, rounded once to
    y's dtype: the FP8 GEMM's second launch when K is cut into pieces."""
    pieces, M, N = part.shape
    block = 1024
    _sum_pieces_kernel[(M, triton.cdiv(N, block))](part, bias if bias is not None else y, y, M, N, y.stride(0),
                                                  part.stride(0), PIECES=pieces, HAS_BIAS=bias is not None,
                                                  BLOCK=block, num_warps=4, **pdl_launch(y.device, M))
