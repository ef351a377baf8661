"""MLA's step between the projections and attention, for T tokens, in one Triton launch: RMSNorm of
the latent, RoPE of k_pe and (in place) of every head's q_pe, and the write of [c_kv ; k_pe] into the
paged latent cache. Eager PyTorch spends ~25 small kernels on this.

Grid (T, 1 + head blocks): program (t, 0) does token t's latent, k_pe and cache slot; program
(t, 1 + j) rotates heads [j * BLOCK_H, (j + 1) * BLOCK_H) of q_pe. So a decode step (T = 1) still
spreads over a few SMs. The rotation of a pair (x0, x1) by (cos, sin) is done in fp32 as
(x0 cos - x1 sin, x0 sin + x1 cos), each product rounded, no fused multiply-add
(enable_fp_fusion=False), then rounded to the tensor's dtype: bit-identical to reference.apply_rotary.
The norm is norm.rms_norm_row: same rounding as reference.rms_norm. An FP8 cache (uint8 blocks of
e4m3 values and their fp32 scales, kernels/fp8.py) gets the row quantized as the reference does it:
bit-identical values and scale.

Letters: T tokens, H heads, R kv_lora_rank, P qk_rope_head_dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import CACHE_SCALE_BYTES, EPS, FP8_MAX
from .launch import pdl_launch, wait_for_prior_kernels
from .norm import MAX_D, rms_norm_row

_BLOCK_H = 32  # heads per program: 2048 q_pe values with P = 64


@triton.jit
def _rotate(x, cos, sin, ROWS: tl.constexpr, BLOCK_P: tl.constexpr):
    """x [ROWS, BLOCK_P] (pairs 2i, 2i+1 adjacent), cos/sin [BLOCK_P // 2] fp32 -> rotated, x's dtype."""
    x0, x1 = tl.split(tl.reshape(x.to(tl.float32), [ROWS, BLOCK_P // 2, 2]))
    c, s = cos[None, :], sin[None, :]
    y = tl.join(x0 * c - x1 * s, x0 * s + x1 * c)
    return tl.reshape(y, [ROWS, BLOCK_P]).to(x.dtype)


@triton.jit
def _mla_prepare_kernel(
    q_pe_ptr, kv_ptr, cos_ptr, sin_ptr, weight_ptr, c_kv_ptr, k_pe_ptr, cache_ptr, slot_ptr,
    H, inv_r, eps, stride_q_t, stride_q_h, stride_kv, stride_cos, stride_sin,
    stride_cache_block, stride_cache_tok, block_size,
    R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr, HAS_CACHE: tl.constexpr, FP8_CACHE: tl.constexpr, FP8_MAX: tl.constexpr,
    EPS: tl.constexpr, PDL: tl.constexpr = False,
):
    wait_for_prior_kernels(PDL)
    t = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    offs_i = tl.arange(0, BLOCK_P // 2)
    cos = tl.load(cos_ptr + t * stride_cos + offs_i, mask=offs_i < P // 2, other=0.0)
    sin = tl.load(sin_ptr + t * stride_sin + offs_i, mask=offs_i < P // 2, other=0.0)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    if part == 0:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        latent = tl.load(kv_ptr + t * stride_kv + offs_r, mask=mask_r, other=0.0)
        w = tl.load(weight_ptr + offs_r, mask=mask_r, other=0.0)
        c_kv = rms_norm_row(latent, w, inv_r, eps)                                   # [BLOCK_R]
        pe = tl.load(kv_ptr + t * stride_kv + R + offs_p[None, :], mask=mask_p[None, :], other=0.0)
        k_pe = _rotate(pe, cos, sin, 1, BLOCK_P)                                     # [1, BLOCK_P]
        tl.store(c_kv_ptr + t * R + offs_r, c_kv, mask=mask_r)
        tl.store(k_pe_ptr + t * P + offs_p[None, :], k_pe, mask=mask_p[None, :])
        if HAS_CACHE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:  # a negative slot (a padding token) writes nothing
                block = cache_ptr + (slot // block_size) * stride_cache_block
                if FP8_CACHE:  # e4m3 values scaled by the row's max / 448; the fp32 scale after the block's values
                    c32, pe32 = c_kv.to(tl.float32), k_pe.to(tl.float32)
                    row_max = tl.maximum(tl.max(tl.abs(c32), axis=0), tl.max(tl.max(tl.abs(pe32), axis=1), axis=0))
                    scale = tl.div_rn(tl.maximum(row_max, EPS), FP8_MAX)
                    inv = tl.div_rn(1.0, scale)
                    values = (block + (slot % block_size) * (R + P)).to(tl.pointer_type(tl.float8e4nv))
                    tl.store(values + offs_r, tl.clamp(c32 * inv, -FP8_MAX, FP8_MAX).to(tl.float8e4nv), mask=mask_r)
                    tl.store(values + R + offs_p[None, :], tl.clamp(pe32 * inv, -FP8_MAX, FP8_MAX).to(tl.float8e4nv),
                             mask=mask_p[None, :])
                    scales = (block + block_size * (R + P)).to(tl.pointer_type(tl.float32))
                    tl.store(scales + slot % block_size, scale)
                else:
                    row = block + (slot % block_size) * stride_cache_tok
                    dtype = cache_ptr.dtype.element_ty  # via fp32: one rounding, as torch's .to()
                    tl.store(row + offs_r, c_kv.to(tl.float32).to(dtype), mask=mask_r)
                    tl.store(row + R + offs_p[None, :], k_pe.to(tl.float32).to(dtype), mask=mask_p[None, :])
    else:
        offs_h = (part - 1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (offs_h < H)[:, None] & mask_p[None, :]
        ptrs = q_pe_ptr + t * stride_q_t + offs_h[:, None] * stride_q_h + offs_p[None, :]
        q = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, _rotate(q, cos, sin, BLOCK_H, BLOCK_P), mask=mask)


def mla_prepare(q_pe: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor | None = None,
                slot_mapping: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as reference.mla_prepare; returns (q_pe, c_kv [T, R], k_pe [T, P]): q_pe is the
    input, rotated in place; c_kv and k_pe are new and contiguous in kv's dtype.

    q_pe [T, H, P] (last dim contiguous; the strided rope slice of the query is fine), kv [T, R + P]
    (kv_a_proj_with_mqa's output, last dim contiguous), cos/sin [T, P/2] fp32, norm_weight [R] in
    kv's dtype. Optionally kv_cache [num_blocks, block_size, R + P] (last dim contiguous, any float
    dtype: values are cast; or uint8 [num_blocks, block_size, R + P + 4]: an FP8 cache as kernels/fp8.py
    lays it out, contiguous, rows quantized)
    and slot_mapping [T] int64/int32: token t's [c_kv ; k_pe] goes to slot
    slot_mapping[t] = block * block_size + offset; negative slots are skipped, duplicate slots get
    one of their writers. No host synchronisation.
    """
    name = "mla_prepare"
    if q_pe.dim() != 3 or kv.dim() != 2:
        raise ValueError(f"{name}: expected q_pe [T, H, P] and kv [T, R + P];"
                         f" got {tuple(q_pe.shape)}, {tuple(kv.shape)}")
    T, H, P = q_pe.shape
    R = kv.shape[1] - P
    if kv.shape[0] != T or P % 2 or P < 2 or not 1 <= R <= MAX_D:
        raise ValueError(f"{name}: shapes disagree: q_pe {tuple(q_pe.shape)}, kv {tuple(kv.shape)}"
                         f" (want kv [T, R + P] with P even and 1 <= R <= {MAX_D})")
    if cos.shape != (T, P // 2) or sin.shape != (T, P // 2) or norm_weight.shape != (R,):
        raise ValueError(f"{name}: expected cos/sin [{T}, {P // 2}] and norm_weight [{R}]; got"
                         f" {tuple(cos.shape)}, {tuple(sin.shape)}, {tuple(norm_weight.shape)}")
    if kv.dtype not in (torch.bfloat16, torch.float16, torch.float32) or q_pe.dtype != kv.dtype \
            or norm_weight.dtype != kv.dtype:
        raise ValueError(f"{name}: q_pe, kv and norm_weight must share one of bf16/fp16/fp32;"
                         f" got {q_pe.dtype}, {kv.dtype}, {norm_weight.dtype}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"{name}: cos and sin must be fp32; got {cos.dtype}, {sin.dtype}")
    if q_pe.stride(2) != 1 or kv.stride(1) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1 \
            or norm_weight.stride(0) != 1:
        raise ValueError(f"{name}: q_pe, kv, cos and sin need a contiguous last dim, norm_weight contiguous")
    if (kv_cache is None) != (slot_mapping is None):
        raise ValueError(f"{name}: pass both kv_cache and slot_mapping, or neither")
    tensors = [q_pe, kv, cos, sin, norm_weight]
    if kv_cache is not None:
        width = R + P + (CACHE_SCALE_BYTES if kv_cache.dtype == torch.uint8 else 0)
        if kv_cache.dim() != 3 or kv_cache.shape[2] != width or kv_cache.stride(2) != 1:
            raise ValueError(f"{name}: expected kv_cache [num_blocks, block_size, {width}] with a contiguous"
                             f" last dim; got {tuple(kv_cache.shape)} strides {kv_cache.stride()}")
        if kv_cache.dtype == torch.uint8 and not kv_cache.is_contiguous():
            raise ValueError(f"{name}: an FP8 kv_cache must be contiguous")
        if kv_cache.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.uint8):
            raise ValueError(f"{name}: kv_cache dtype must be bf16, fp16, fp32 or uint8 (FP8), got {kv_cache.dtype}")
        if slot_mapping.shape != (T,) or slot_mapping.dtype not in (torch.int64, torch.int32) \
                or (T > 0 and slot_mapping.stride(0) != 1):
            raise ValueError(f"{name}: expected slot_mapping [{T}] int64/int32, contiguous; got"
                             f" {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
        tensors += [kv_cache, slot_mapping]
    if any(t.device != kv.device for t in tensors):
        raise ValueError(f"{name}: all tensors must be on one device")

    c_kv = torch.empty(T, R, dtype=kv.dtype, device=kv.device)
    k_pe = torch.empty(T, P, dtype=kv.dtype, device=kv.device)
    if T == 0:
        return q_pe, c_kv, k_pe
    has_cache = kv_cache is not None
    cache = kv_cache if has_cache else c_kv  # unused without a cache
    block_h = min(_BLOCK_H, triton.next_power_of_2(H))
    block_r = triton.next_power_of_2(R)
    _mla_prepare_kernel[(T, 1 + triton.cdiv(H, block_h))](
        q_pe, kv, cos, sin, norm_weight, c_kv, k_pe, cache, slot_mapping if has_cache else c_kv,
        H, 1.0 / R, eps, q_pe.stride(0), q_pe.stride(1), kv.stride(0), cos.stride(0), sin.stride(0),
        cache.stride(0) if has_cache else 0, cache.stride(1) if has_cache else 0,
        kv_cache.shape[1] if has_cache else 1,
        R=R, P=P, BLOCK_R=block_r, BLOCK_P=triton.next_power_of_2(P), BLOCK_H=block_h, HAS_CACHE=has_cache,
        FP8_CACHE=has_cache and kv_cache.dtype == torch.uint8, FP8_MAX=FP8_MAX, EPS=EPS,
        num_warps=4 if block_r <= 1024 else 8, enable_fp_fusion=False, **pdl_launch(kv.device, T),
    )
    return q_pe, c_kv, k_pe
