"""A GEMM for a few rows: y [M, N] = x [M, K] W^T (+ bias) for M <= MAX_ROWS (a decode step's
projections at small batches), W [N, K] in x's float dtype.

Why: at one row cuBLAS moves V2-Lite's projection weights at 840-1,670 GB/s on an H200 (docs/fp8.md's
kernel table, the bf16 column: o_proj 2048 x 2048 in 10.0 us), a third of the bandwidth; a batch-1
decode step runs five such GEMMs per layer. A matrix of 8-23 MB needs every SM reading at once: here
the output columns are cut into BLOCK_N-wide slabs and K into SPLIT_K pieces, one program per slab and
piece, so that a few hundred programs stream the weight once. Each piece's fp32 partial sums go to
a scratch buffer that a second launch adds up (with the bias), rounding once to x's dtype; with one
piece the first launch writes the output itself.

Not yet timed on a GPU, so the model does not call it yet: `scripts/bench_fp8.py --skinny` (and
`scripts/gpu_check.sh skinny`) measures it against cuBLAS with a sweep of its launch config; where it
wins, fp8_linear.linear (the kernel set's linear) is where a float weight's few-row GEMM would come here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # one tl.dot row block
_PROGRAMS_PER_SM = 4  # the split aims at this many programs per SM (untuned)


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, tiles_per_piece, stride_xm, stride_wn, stride_om,
                   stride_os, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """One BLOCK_N-wide slab of the columns over one piece of K, tiles_per_piece BLOCK_K tiles
    (program axis 1). DIRECT: the only piece, out is y (bias added, rounded to its dtype); else out is
    the fp32 partials [pieces, M, N]."""
    pid_n = tl.program_id(0)
    piece = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    first = piece * tiles_per_piece
    end = tl.minimum(first + tiles_per_piece, tl.cdiv(K, BLOCK_K))
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(first, end):
        ks = tile * BLOCK_K + offs_k  # whole tiles: the compiler sees aligned runs and loads them in vectors
        mask_k = ks < K
        x = tl.load(x_ptrs + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)   # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptrs + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)   # [BLOCK_K, BLOCK_N]
        if UPCAST_DOT:  # Triton 3.6's interpreter multiplies bf16 as raw uint16 bits
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc=acc, input_precision=DOT_PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask)
    else:
        tl.store(out_ptr + piece * stride_os + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _sum_pieces_kernel(part_ptr, bias_ptr, y_ptr, M, N, stride_ym, stride_ps, PIECES: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[row, cols] = sum over the pieces of part[piece, row, cols] (+ bias), rounded once."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for piece in tl.static_range(PIECES):
        acc += tl.load(part_ptr + piece * stride_ps + row * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def default_config(N: int, K: int, device: torch.device) -> dict:
    """BLOCK_N-wide column slabs, and K cut into as many pieces of whole BLOCK_K tiles as bring the
    programs to about _PROGRAMS_PER_SM per SM (untuned)."""
    block_n, block_k = 64, 128
    slabs = triton.cdiv(N, block_n)
    tiles = triton.cdiv(K, block_k)
    pieces = max(1, min(tiles, triton.cdiv(_PROGRAMS_PER_SM * _num_sms(device), slabs)))
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, PIECES=pieces, num_warps=4, num_stages=4)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: dict | None = None) -> torch.Tensor:
    """F.linear's contract for at most MAX_ROWS rows of x [..., K] (last dim contiguous) and weight
    [N, K] (rows may be strided, the last dim contiguous), both in one float dtype; bias [N] or None.
    The products are summed in fp32 and rounded to x's dtype once. config (tests and tuning): BLOCK_N,
    BLOCK_K, PIECES (how many pieces K is cut into, at most its BLOCK_K tiles), num_warps, num_stages.
    No host synchronisation."""
    name = "skinny linear"
    N, K = weight.shape
    if x.shape[-1] != K or weight.dtype != x.dtype or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"{name}: expected x [..., {K}], weight [{N}, {K}] and bias [{N}] in one dtype; got "
                         f"{tuple(x.shape)} {x.dtype}, {tuple(weight.shape)} {weight.dtype}"
                         + ("" if bias is None else f", {tuple(bias.shape)}"))
    if x.stride(-1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"{name}: x and weight need a contiguous last dim")
    shape = x.shape
    x = x.reshape(-1, K)
    M = x.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"{name}: at most {MAX_ROWS} rows, got {M}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.view(*shape[:-1], N)
    cfg = dict(config or default_config(N, K, x.device))
    block_k, pieces = cfg.pop("BLOCK_K"), cfg.pop("PIECES")
    tiles = triton.cdiv(K, block_k)
    tiles_per_piece = triton.cdiv(tiles, pieces)
    pieces = triton.cdiv(tiles, tiles_per_piece)
    direct = pieces == 1
    part = y if direct else torch.empty(pieces, M, N, dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else y
    on_cpu = x.device.type == "cpu"  # CPU tensors only run under TRITON_INTERPRET=1
    _skinny_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), pieces)](
        x, weight, bias_arg, part, M, N, K, tiles_per_piece, x.stride(0), weight.stride(0),
        y.stride(0), part.stride(0) if not direct else 0,
        DIRECT=direct, HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_K=block_k, UPCAST_DOT=on_cpu,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg)
    if not direct:
        sum_pieces(part, bias, y)
    return y.view(*shape[:-1], N)


def sum_pieces(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """y [M, N] = the sum of the fp32 partials part [pieces, M, N] (contiguous) + bias, rounded once to
    y's dtype (also the FP8 GEMM's, fp8_linear.linear, when K is cut into pieces)."""
    pieces, M, N = part.shape
    block = 1024
    _sum_pieces_kernel[(M, triton.cdiv(N, block))](part, bias if bias is not None else y, y, M, N, y.stride(0),
                                                  part.stride(0), PIECES=pieces, HAS_BIAS=bias is not None,
                                                  BLOCK=block, num_warps=4)
