"""SwiGLU's activation, silu(gate) * up, in one Triton launch (eager PyTorch: silu, then mul).

Rounded exactly as reference.silu_and_mul: silu in fp32 as torch's CUDA kernel computes it,
x / (1 + expf(-x)) with CUDA's accurate expf (libdevice, not Triton's ex2.approx-based tl.exp) and an
IEEE divide, rounded to the dtype; then the product of the two dtype values rounded once. Launched
with enable_fp_fusion=False and enable_reflect_ftz=False (no fused multiply-adds, denormals kept),
as torch's kernels are built.

Letters: T rows, I intermediate size (x holds [gate | up], 2I wide).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .fp8 import BLOCK, EPS, FP8_MAX
from .fp8_linear import check_x_fp8, store_quantized_groups
from .launch import pdl_launch, wait_for_prior_kernels

_BLOCK = 1024  # columns per program: 8 per thread with 4 warps, 16-byte bf16 accesses


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, q_ptr, qs_ptr, I, WIDTH, stride_x, stride_y, stride_q, stride_qs, stride_qsg,
                         BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr, QUANTIZE: tl.constexpr = False,
                         GROUP: tl.constexpr = 128, FP8_MAX: tl.constexpr = 448.0, EPS: tl.constexpr = 1e-10,
                         PDL: tl.constexpr = False):
    """QUANTIZE: the product also quantized for an FP8 GEMM (quantize_activation's groups of GROUP and
    arithmetic) into q and qs, WIDTH columns: past I, zeros (an FP8 weight's zero columns meet them)."""
    wait_for_prior_kernels(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if LIBDEVICE:  # CUDA's expf, what torch calls; the interpreter has no libdevice (numpy's exp there)
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    silu = tl.div_rn(g, 1.0 + e).to(gate.dtype)
    y = (silu.to(tl.float32) * up.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + offs, y, mask=mask)
    if QUANTIZE:  # masked lanes are 0 (silu(0) * 0)
        store_quantized_groups(y, row, tl.program_id(1) * (BLOCK // GROUP), WIDTH, q_ptr, qs_ptr, stride_q, stride_qs,
                               stride_qsg, BLOCK // GROUP, GROUP, FP8_MAX, EPS)


def silu_and_mul(x: torch.Tensor, *, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """y [..., I] = silu(x[..., :I]) * x[..., I:] for x [..., 2I] (rows of the flattened [T, 2I] view may be
    strided, the last dim contiguous), bf16/fp16/fp32; same contract as reference.silu_and_mul. x_fp8:
    buffers e4m3 [T', W] and fp32 [T', ceil(W / 128)] (T' >= T, W = I or a multiple of 128 above it; any
    strides) whose first T rows also receive y quantized for an FP8 GEMM (quantize_activation at width W,
    bit for bit), in the same launch. No host synchronisation."""
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: expected x [..., 2I]; got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"silu_and_mul: x dtype must be bf16, fp16 or fp32, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError("silu_and_mul: x needs a contiguous last dim")
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    T, I = x.shape[0], x.shape[1] // 2
    width = I
    if x_fp8 is not None:  # I columns, or a multiple of 128 past it (zeros: an FP8 weight's zero columns)
        wide = x_fp8[0].shape[-1]
        width = check_x_fp8("silu_and_mul", x_fp8, T, (I, wide) if wide > I and wide % BLOCK == 0 else (I,), x.device)
    y = torch.empty(T, I, dtype=x.dtype, device=x.device)
    if T > 0 and I > 0:
        block = min(_BLOCK, triton.next_power_of_2(I)) if x_fp8 is None else \
            max(BLOCK, min(_BLOCK, triton.next_power_of_2(width)))
        q, qs = x_fp8 if x_fp8 is not None else (y, y)  # (unused without QUANTIZE)
        _silu_and_mul_kernel[(T, triton.cdiv(width, block))](
            x, y, q, qs, I, width, x.stride(0), y.stride(0), q.stride(0), qs.stride(0), qs.stride(-1), BLOCK=block,
            LIBDEVICE=x.is_cuda, QUANTIZE=x_fp8 is not None, GROUP=BLOCK, FP8_MAX=FP8_MAX, EPS=EPS,
            num_warps=4, enable_fp_fusion=False, enable_reflect_ftz=False, **pdl_launch(x.device, T),
        )
    return y.view(*shape[:-1], I)
