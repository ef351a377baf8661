"""The FP8 (e4m3) formats, in plain PyTorch: DeepSeek's block-quantized weights, the per-token
activation quantization of its FP8 GEMMs, and the rows of the FP8 latent cache. The references
(reference.py) and the checkpoint code use these; each Triton kernel repeats the same arithmetic.

Weights (DeepSeek-V3's published layout, `quant_method: fp8`, `weight_block_size: [128, 128]`): a
matrix [N, K] is stored as `weight` [N, K] float8_e4m3fn and `weight_scale_inv` [ceil(N/128),
ceil(K/128)] fp32, one scale per 128 x 128 block, and means weight * weight_scale_inv of its block
(DeepSeek-V3's `weight_dequant`). The scale is the block's absolute max / 448 (e4m3's largest value),
so the largest element of each block is stored as +-448. Edge blocks may be partial. A
tensor-parallel rank's part of a matrix may start inside a block: `offset` = (rows, columns) of the
first block that lie before the part; the part keeps every block it touches, whole.

Activations: quantized on the fly per token (row), in groups of 128 along K aligned with the weight's
blocks (a group starts `offset` columns before the first), scale = group max / 448, values times the
reciprocal of the scale (one division per group: the kernels do the same, so the quantized values
are bit-identical).

Latent cache: one fp32 scale per token per layer (docs/fp8.md has the measurement behind the choice).
A layer's FP8 cache is a uint8 tensor [num_blocks, block_size, W + 4] (W = kv_lora_rank +
qk_rope_head_dim), the bytes of a bf16 cache's W / 2 + 2 values per token; each block holds its
block_size tokens' W e4m3 values first, token after token, then their block_size fp32 scales. Keeping
the values apart from the scales keeps every token's values at a multiple of 16 bytes (W = 576 for
DeepSeek-V2), so the kernels read them with 16-byte loads (rows of W + 4 bytes, the scale beside its
values, made MLA decode over the FP8 cache take 1.4-1.5x as long on an H200; docs/fp8.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0   # e4m3's largest finite value
BLOCK = 128       # weight blocks are BLOCK x BLOCK, activation groups BLOCK wide
EPS = 1e-10       # the smallest amax a scale is made from: an all-zero group gets a tiny scale, not 0
CACHE_SCALE_BYTES = 4  # the fp32 scale at the end of every FP8 cache row


def scale_of(amax: torch.Tensor) -> torch.Tensor:
    """The scales of groups with absolute max amax: max(amax, EPS) / 448 rounded once, as the kernels'
    div_rn. (Not `amax / FP8_MAX`: CUDA torch divides by a Python number as a multiply by its reciprocal,
    at times an ulp off, and bf16 values' ratios to their group's max often fall on e4m3's rounding ties,
    where that ulp picks the other value: 1 to 8 of 300 activations on an H200.)"""
    amax = amax.clamp(min=EPS)
    return amax / torch.full_like(amax, FP8_MAX)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(rows: int, cols: int, offset: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """The shape of weight_scale_inv for a [rows, cols] part whose first block starts `offset` earlier."""
    return cdiv(rows + offset[0], BLOCK), cdiv(cols + offset[1], BLOCK)


def _pad_to_blocks(w: torch.Tensor, offset: tuple[int, int]) -> torch.Tensor:
    """w [..., N, K] with offset[0] zero rows before and offset[1] zero columns left, then zeros up to
    whole blocks."""
    r, c = offset
    N, K = w.shape[-2:]
    return F.pad(w, (c, cdiv(K + c, BLOCK) * BLOCK - K - c, r, cdiv(N + r, BLOCK) * BLOCK - N - r))


def _expand(s: torch.Tensor, shape: tuple[int, int], offset: tuple[int, int]) -> torch.Tensor:
    """Block scales [..., nb, kb] -> one scale per element [..., N, K] of a part at `offset`."""
    r, c = offset
    full = s.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return full[..., r:r + shape[0], c:c + shape[1]]


def quantize_weight(w: torch.Tensor, offset: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (any float dtype; leading dims: stacked experts) -> (weight fp8 [..., N, K],
    weight_scale_inv fp32 [..., nb, kb]). Blocks are absmax-scaled to 448, values divided by the
    scale and rounded to nearest (even)."""
    N, K = w.shape[-2:]
    padded = _pad_to_blocks(w.float(), offset)
    blocks = padded.unflatten(-1, (-1, BLOCK)).unflatten(-3, (-1, BLOCK))       # [..., nb, 128, kb, 128]
    scale = scale_of(blocks.abs().amax(dim=(-3, -1)))                         # [..., nb, kb]
    q = (w.float() / _expand(scale, (N, K), offset)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """weight fp8 [..., N, K] and its block scales -> fp32 [..., N, K]."""
    N, K = q.shape[-2:]
    if offset == (0, 0) and N % BLOCK == 0 and K % BLOCK == 0:  # whole blocks: broadcast, no expanded scales
        blocks = q.float().unflatten(-1, (-1, BLOCK)).unflatten(-3, (-1, BLOCK))  # [..., nb, 128, kb, 128]
        return (blocks * scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)
    return q.float() * _expand(scale, (N, K), offset)


def quantize_activation(x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (fp8 [..., K], fp32 scales [..., G]): per row, groups of BLOCK columns, the first
    group starting `offset` columns before column 0 (aligned with the weight's blocks)."""
    K = x.shape[-1]
    padded = F.pad(x.float(), (offset, cdiv(K + offset, BLOCK) * BLOCK - K - offset))
    groups = padded.unflatten(-1, (-1, BLOCK))                                 # [..., G, 128]
    scale = scale_of(groups.abs().amax(dim=-1))                               # [..., G]
    q = (groups * (1.0 / scale)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2)[..., offset:offset + K], scale


# torch._scaled_mm takes an FP8 GEMM whose K is a multiple of this (other K gave wrong products on an H200)
SCALED_MM_K = 512
# Inference widens the FP8 weights of other K with zero columns to such a K (parallel.Linear.pad_columns):
# on an H200, 256 V2-Lite decodes 1.5% faster with FP8 weights, a 4K prompt 3.4% (docs/fp8.md).
PAD_FOR_SCALED_MM = True


@torch.no_grad()
def pad_columns(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 weight [N, K] (block-aligned, K not a multiple of SCALED_MM_K) and its block scales, copied
    into storage whose rows are zero-padded to a multiple of SCALED_MM_K columns: parameters that are views
    of their first K (K / 128) columns, marked with the padded width (zero_padded). torch._scaled_mm then
    takes the layer at the padded width (V2-Lite's shared experts' down_proj, K = 2,816); same numbers, the
    zero columns meeting the activations' zero columns."""
    N, K = weight.shape
    width = cdiv(K, SCALED_MM_K) * SCALED_MM_K
    wide = torch.zeros(N, width, dtype=weight.dtype, device=weight.device)
    wide[:, :K] = weight
    wide_scale = torch.ones(scale.shape[0], width // BLOCK, dtype=scale.dtype, device=scale.device)
    wide_scale[:, :scale.shape[1]] = scale
    weight = torch.nn.Parameter(wide[:, :K], requires_grad=False)
    scale = torch.nn.Parameter(wide_scale[:, :scale.shape[1]], requires_grad=False)
    weight.zero_columns_to = width
    return weight, scale


def zero_padded(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight from pad_columns and its scales as views of their whole padded storage; any other weight
    and its scales as they are."""
    width = getattr(weight, "zero_columns_to", None)
    if width is None:
        return weight, scale
    return (weight.as_strided((weight.shape[0], width), (width, 1)),
            scale.as_strided((scale.shape[0], width // BLOCK), (width // BLOCK, 1)))


# Steps of at least this many tokens (0: none) quantize an FP8 GEMM's input once, in the launch that makes
# it, where each FP8 GEMM quantized its input in a launch of its own (fewer rows quantize x inside the GEMM):
# the input norm for MLA's first projection (rms_norm's x_fp8), the router for the routed and the shared
# experts alike (route's x_fp8, then linear's x_fp8), SwiGLU's activation for an FP8 down projection
# (silu_and_mul's x_fp8). Four launches fewer a MoE layer at 256 FP8 decodes. Built, passes the
# interpreter's tests (the engine's tokens with it on are the reference's); off until it has run and been
# timed on a GPU (scripts/gpu_check.sh router256).
QUANTIZE_ONCE_FROM = 0


def quantize_once(T: int) -> bool:
    """Whether a step of T tokens quantizes its FP8 GEMMs' inputs once (QUANTIZE_ONCE_FROM)."""
    return 0 < QUANTIZE_ONCE_FROM <= T


def quantized_buffers(M: int, K: int, device: torch.device, pad_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty buffers for M rows of K activations quantized (a kernel's out=): e4m3 [M', K] and fp32 scales
    [M', ceil(K / 128)], M' = M rounded up to pad_rows; with pad_rows = BLOCK, the scales M-major, the
    layout torch._scaled_mm reads (fp8_linear.linear's x_fp8), which the other FP8 kernels read too."""
    M_pad = cdiv(M, pad_rows) * pad_rows
    G = cdiv(K, BLOCK)
    scales = (torch.empty(G, M_pad, dtype=torch.float32, device=device).t() if pad_rows == BLOCK
              else torch.empty(M_pad, G, dtype=torch.float32, device=device))
    return torch.empty(M_pad, K, dtype=FP8, device=device), scales


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, offset: int = 0) -> torch.Tensor:
    K = q.shape[-1]
    return q.float() * scale.repeat_interleave(BLOCK, dim=-1)[..., offset:offset + K]


def quantize_cache_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent cache rows [..., W] (any float dtype) -> (e4m3 values [..., W], fp32 scales [...]): each row
    scaled by its max / 448."""
    rows = rows.float()
    scale = scale_of(rows.abs().amax(dim=-1, keepdim=True))                     # [..., 1]
    return (rows * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale[..., 0]


def cache_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 cache uint8 [num_blocks, block_size, W + 4] as (values uint8 [num_blocks, block_size, W],
    scales fp32 [num_blocks, block_size]): views of each block's bytes, its tokens' values first, then
    their scales (see the module's docstring)."""
    num_blocks, block_size, width = kv_cache.shape
    W = width - CACHE_SCALE_BYTES
    if (block_size * W) % 4 or not kv_cache.is_contiguous():
        raise ValueError(f"an FP8 cache needs block_size * W divisible by 4 and contiguous storage; got "
                         f"{tuple(kv_cache.shape)}")
    flat = kv_cache.view(num_blocks, block_size * width)
    return flat[:, :block_size * W].view(num_blocks, block_size, W), flat[:, block_size * W:].view(torch.float32)


def write_cache(kv_cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """Quantize rows [T, W] into the FP8 cache's flat slots [T] (slot = block * block_size + offset)."""
    values, scales = cache_views(kv_cache)
    q, scale = quantize_cache_rows(rows)
    block, offset = slots.long() // kv_cache.shape[1], slots.long() % kv_cache.shape[1]
    values[block, offset] = q.view(torch.uint8)
    scales[block, offset] = scale


def read_cache(kv_cache: torch.Tensor, block: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The FP8 cache's rows at (block, offset) (index tensors of one shape S) -> [*S, W] in dtype: values
    times their row's scale, in fp32, then rounded."""
    values, scales = cache_views(kv_cache)
    return (values[block, offset].view(FP8).float() * scales[block, offset][..., None]).to(dtype)


def quantize_cache(latents: torch.Tensor) -> torch.Tensor:
    """A whole FP8 cache made of latents [num_blocks, block_size, W] (tests and benchmarks)."""
    num_blocks, block_size, W = latents.shape
    cache = torch.zeros(num_blocks, block_size, W + CACHE_SCALE_BYTES, dtype=torch.uint8, device=latents.device)
    write_cache(cache, torch.arange(num_blocks * block_size, device=latents.device), latents.reshape(-1, W))
    return cache


def cache_width(kv_cache_dim: int, fp8: bool) -> int:
    """The last dim of a layer's cache tensor: kv_cache_dim values, plus the scale's bytes in FP8."""
    return kv_cache_dim + CACHE_SCALE_BYTES if fp8 else kv_cache_dim
