"""Fused RMSNorm (optionally with the residual add before it) in one Triton launch, one program per row.

Eager PyTorch spends ~7 elementwise kernels on an RMSNorm; this does the same arithmetic in one, in the
same rounding order as reference.rms_norm: the residual sum rounded to the input dtype, the sum of
squares and 1/rms in fp32, the normalised row rounded to the input dtype, THEN times the weight (one
more rounding). Only the order of the fp32 sum differs from torch's, so where the normalised value sits
on a bf16 rounding boundary it can round the other way: one ulp, rarely two after the weight multiply.

Every kernel here is launched with enable_fp_fusion=False: eager torch runs each multiply and add as
its own kernel, so a fused multiply-add would round differently.

Letters: T rows, D hidden size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import BLOCK, EPS, FP8_MAX
from .fp8_linear import check_x_fp8, store_quantized_groups
from .launch import pdl_launch, wait_for_prior_kernels

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_D = 8192


@triton.jit
def rms_norm_row(x, weight, inv_n, eps):
    """weight * (x / rms(x)) for one row x [BLOCK] (masked lanes 0) in its storage dtype, rounded as
    torch rounds `weight * (xf * rsqrt(mean(xf^2) + eps)).to(dtype)`. inv_n = 1 / row length: torch's
    CUDA mean multiplies the sum by it too. Shared with mla_prepare."""
    xf = x.to(tl.float32)
    mean = tl.sum(xf * xf, axis=0) * inv_n
    normed = (xf * tl.rsqrt(mean + eps)).to(x.dtype)
    return (weight.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, y_ptr, sum_ptr, q_ptr, qs_ptr, D, inv_d, eps,
                     stride_x, stride_r, stride_y, stride_s, stride_q, stride_qs, stride_qsg,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, QUANTIZE: tl.constexpr = False,
                     GROUP: tl.constexpr = 128, FP8_MAX: tl.constexpr = 448.0, EPS: tl.constexpr = 1e-10,
                     PDL: tl.constexpr = False):
    """QUANTIZE: the normalised row also quantized for an FP8 GEMM (quantize_activation's groups of GROUP
    and arithmetic), e4m3 into q and the groups' scales into qs."""
    wait_for_prior_kernels(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # s = x + residual, rounded to x's dtype as torch's add does
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    y = rms_norm_row(x, w, inv_d, eps)
    tl.store(y_ptr + row * stride_y + offs, y, mask=mask)
    if QUANTIZE:  # masked lanes are 0, as quantize_activation pads a ragged group
        store_quantized_groups(y, row, 0, D, q_ptr, qs_ptr, stride_q, stride_qs, stride_qsg, BLOCK_D // GROUP, GROUP,
                               FP8_MAX, EPS)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, *,
             x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of each row; same contract as reference.rms_norm.

    x [..., D] (rows of the flattened [T, D] view may be strided, the last dim contiguous), weight [D],
    both one float dtype, D <= 8192. Without residual returns y; with residual (x's shape and dtype)
    returns (y, s), s = x + residual and y = rmsnorm(s). Outputs are new contiguous tensors of x's
    shape. x_fp8: buffers e4m3 [T', D] and fp32 [T', ceil(D / 128)] (T' >= T; any strides) whose first T
    rows also receive y quantized for an FP8 GEMM (quantize_activation, bit for bit), in the same launch.
    No host synchronisation.
    """
    shape = x.shape
    if x.dim() < 1 or weight.shape != shape[-1:]:
        raise ValueError(f"rms_norm: expected x [..., D] and weight [D]; got {tuple(shape)}, {tuple(weight.shape)}")
    D = shape[-1]
    x = x.reshape(-1, D)
    T = x.shape[0]
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: x and weight must share one of bf16/fp16/fp32; got {x.dtype}, {weight.dtype}")
    if not 1 <= D <= MAX_D:
        raise ValueError(f"rms_norm: D must be in [1, {MAX_D}], got {D}")
    if x.stride(1) != 1 or weight.stride(0) != 1:
        raise ValueError("rms_norm: x needs a contiguous last dim and weight must be contiguous")
    if weight.device != x.device:
        raise ValueError("rms_norm: x and weight must be on one device")
    if residual is not None:
        if residual.shape != shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"rms_norm: residual must match x ({tuple(shape)}, {x.dtype}, {x.device});"
                             f" got {tuple(residual.shape)}, {residual.dtype}, {residual.device}")
        residual = residual.reshape(-1, D)
        if residual.stride(1) != 1:
            raise ValueError("rms_norm: residual needs a contiguous last dim")

    if x_fp8 is not None:
        check_x_fp8("rms_norm", x_fp8, T, (D,), x.device)

    y = torch.empty(T, D, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    if T > 0:
        block_d = triton.next_power_of_2(D) if x_fp8 is None else max(BLOCK, triton.next_power_of_2(D))
        r = residual if residual is not None else x  # unused without residual
        q, qs = x_fp8 if x_fp8 is not None else (y, y)  # (unused without QUANTIZE)
        _rms_norm_kernel[(T,)](
            x, r, weight, y, s if s is not None else y, q, qs, D, 1.0 / D, eps,
            x.stride(0), r.stride(0), y.stride(0), y.stride(0), q.stride(0), qs.stride(0), qs.stride(-1),
            HAS_RESIDUAL=residual is not None, BLOCK_D=block_d, QUANTIZE=x_fp8 is not None, GROUP=BLOCK,
            FP8_MAX=FP8_MAX, EPS=EPS,
            num_warps=min(max(block_d // 256, 1), 16), enable_fp_fusion=False, **pdl_launch(x.device, T),
        )
    return y.view(shape) if s is None else (y.view(shape), s.view(shape))
