"""Rotary position embedding for the decoupled RoPE part of MLA, plain or YaRN-scaled.

The official checkpoints rotate adjacent channel pairs (2i, 2i+1) of q_pe and k_pe by angle
pos * inv_freq[i] (GPT-J / "interleaved" convention). The official code gets there by permuting
to half-split and applying rotate_half; we rotate the pairs in place, which gives the same dot
products and keeps the output interleaved (as transformers' native port and DeepSeek-V3 do).
Only dot products of rotated q and k are ever used, so the layout is internal to this project. The
rotation itself is kernels/reference.py's apply_rotary (the MLA prepare kernel family).

YaRN is static: the blended frequencies apply at every position. Its length correction lives in
the attention softmax scale (ModelArgs.softmax_scale); the cos/sin magnitude is
mscale / mscale_all_dim, which is exactly 1 for every released config.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelArgs, yarn_get_mscale


def yarn_inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim / 2] and the cos/sin magnitude, as the official code builds them."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freq_extra = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = args.rope_scaling
    if rs is None:
        return freq_extra, 1.0
    freq_inter = freq_extra / rs.factor

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: keep the original (high) frequency, 0: interpolate by the factor
    inv_freq = freq_inter * (1 - keep) + freq_extra * keep
    magnitude = yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
    return inv_freq, magnitude


class RotaryEmbedding(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        inv_freq, self.magnitude = yarn_inv_freq(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building the model on 'meta'."""
        inv_freq, _ = yarn_inv_freq(self.args)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> cos, sin [..., rope_dim / 2] in fp32."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return torch.cos(angles) * self.magnitude, torch.sin(angles) * self.magnitude

