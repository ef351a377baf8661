"""The linear layers on the GPU: F.linear (cuBLAS) for a weight in the model's dtype, and for an FP8
weight with 128 x 128 block scales one Triton kernel, after DeepSeek-V3's fp8_gemm, that quantizes the
activations as it goes (no separate quantization kernel, no FP8 copy of x in memory).

A program owns BLOCK_M rows of x and BLOCK_N output columns. Its K loop steps one 128-wide activation
group at a time, aligned with the weight's blocks: it loads the rows' group in x's dtype, takes each
row's absolute max, scales the group to e4m3 in registers (the arithmetic of kernels/fp8.py's
quantize_activation, so the quantized values are bit-identical to the reference's), multiplies it
with the weight tile on the FP8 tensor cores and adds the product times both scales (the rows'
and the columns' weight block) into an fp32 accumulator. A tensor-parallel part that starts inside a
block (block_offset) just starts its first group before column 0, masked. No host synchronisation:
CUDA-graph capturable.

Letters: M rows (tokens), N output features, K input features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fp8 import BLOCK, EPS, FP8, FP8_MAX, scale_shape


@triton.jit
def quantize_rows(x, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    """One activation group per row, x [ROWS, 128] (any float dtype; masked lanes 0) -> (e4m3 values,
    fp32 scales [ROWS]): scale = row max / 448, values times its reciprocal, as kernels/fp8.py does.
    Shared with the fused MoE."""
    x = x.to(tl.float32)
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), EPS), FP8_MAX)
    return tl.clamp(x * tl.div_rn(1.0, scale)[:, None], -FP8_MAX, FP8_MAX).to(tl.float8e4nv), scale


@triton.jit
def _fp8_linear_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, row_offset, col_offset,
    stride_xm, stride_wn, stride_sn, stride_ym,
    HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M blocks of rows walk the columns together, so their weight tiles are shared in L2
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    scale_rows = (offs_n + row_offset) // GROUP                          # each column's weight block row
    offs_k = tl.arange(0, GROUP) - col_offset                            # group 0's columns (< 0: not ours)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, tl.cdiv(K + col_offset, GROUP)):
        k = g * GROUP + offs_k
        mask_k = (k >= 0) & (k < K)
        x = tl.load(x_ptrs + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        x_q, x_scale = quantize_rows(x, FP8_MAX, EPS)                                    # [BLOCK_M, GROUP]
        w = tl.load(w_ptrs + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [GROUP, BLOCK_N]
        w_scale = tl.load(s_ptr + scale_rows * stride_sn + g, mask=mask_n, other=0.0)     # [BLOCK_N]
        acc += tl.dot(x_q, w) * (x_scale[:, None] * w_scale[None, :])
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def default_config(M: int) -> dict:
    """Launch config by the number of rows. Decode: thin row blocks and narrow column blocks, so that a
    single token's GEMM still spreads over many SMs (a guess until tuned on the H200: docs/fp8.md)."""
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_scale_inv: torch.Tensor | None = None, block_offset: tuple[int, int] = (0, 0), *,
           config: dict | None = None) -> torch.Tensor:
    """Same contract as reference.linear: y [..., N] = x W^T (+ bias) in x's dtype.

    Without weight_scale_inv, F.linear. With it: weight [N, K] float8_e4m3fn (rows may be strided, the
    last dim contiguous: a view of a fused matrix is fine), weight_scale_inv [ceil((N + r) / 128),
    ceil((K + c) / 128)] fp32 for block_offset (r, c); x [..., K] bf16/fp16/fp32 with a contiguous
    last dim; bias [N] or None. config (tests and tuning): BLOCK_M, BLOCK_N, GROUP_M, num_warps,
    num_stages. No host synchronisation.
    """
    if weight_scale_inv is None:
        return F.linear(x, weight, bias)
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
    tensors = [x, weight, weight_scale_inv] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"{name}: all tensors must be on one device")
    if x.stride(-1) != 1 or weight.stride(1) != 1 or weight_scale_inv.stride(1) != 1:
        raise ValueError(f"{name}: x, weight and weight_scale_inv need a contiguous last dim")

    shape = x.shape
    x = x.reshape(-1, K)
    M = x.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.view(*shape[:-1], N)
    cfg = config or default_config(M)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _fp8_linear_kernel[grid](
        x, weight, weight_scale_inv, bias if bias is not None else y, y, M, N, K, r, c,
        x.stride(0), weight.stride(0), weight_scale_inv.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, GROUP=BLOCK, FP8_MAX=FP8_MAX, EPS=EPS, **cfg,
    )
    return y.view(*shape[:-1], N)
