"""Plain PyTorch references for the Triton kernels: absorbed MLA decode over a paged latent cache,
the routed-expert MoE, and the fused small ops (RMSNorm, MLA's norm/RoPE/cache write, SiLU-and-mul,
top-k softmax). They are the CPU path of the model and the oracle of the kernel tests.

Letters: N sequences, H heads, R kv_lora_rank, P qk_rope_head_dim, L = max_blocks * block_size,
T tokens, K experts per token, E experts, D hidden size, I expert intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mla_decode_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                   block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   softmax_scale: float) -> torch.Tensor:
    """out[n, h] = sum_t softmax_t(scale * (q_lat[n,h].c_t + q_pe[n,h].pe_t)) c_t over t < seq_lens[n].

    kv_cache [num_blocks, block_size, R + P] holds per token the latent c (first R) and the rotated
    k_pe (last P); token t of sequence n sits in block block_tables[n, t // block_size] at row
    t % block_size. Table entries past a sequence's last block are ignored. A sequence of length 0
    gets a zero output. Math in fp32, result in q_lat's dtype.
    """
    R = q_lat.shape[-1]
    num_blocks, block_size, _ = kv_cache.shape
    blocks = block_tables.long().clamp(0, num_blocks - 1)                 # unused entries may be junk
    kv = kv_cache[blocks].flatten(1, 2).float()                           # [N, L, R+P]
    q = torch.cat([q_lat, q_pe], dim=-1).float()                          # [N, H, R+P]
    scores = torch.bmm(q, kv.transpose(1, 2)) * softmax_scale             # [N, H, L]
    positions = torch.arange(kv.shape[1], device=kv.device)
    valid = positions[None, :] < seq_lens[:, None].long()                 # [N, L]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)                     # length 0: all -inf -> 0
    return torch.bmm(p, kv[..., :R]).to(q_lat.dtype)                      # [N, H, R]


def moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_k topk_weights[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t,k].

    x [T, D]; w13 [E, 2I, D] (rows :I gate_proj, I: up_proj); w2 [E, D, I]. Expert outputs in x's
    dtype, combined in fp32, cast back to x's dtype. Tokens are grouped by expert; the loop runs over
    experts (with a host sync for the counts, which is fine for a reference).
    """
    T, D = x.shape
    E, K = w13.shape[0], topk_ids.shape[1]
    flat = topk_ids.flatten().long()                                      # [T*K], row t*K + k
    order = flat.argsort(stable=True)                                     # rows grouped by expert
    counts = torch.bincount(flat, minlength=E).tolist()
    out = x.new_empty(T * K, D)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start:start + n]
        gate, up = (x[rows // K] @ w13[e].t()).chunk(2, dim=-1)           # [n, I] each
        out[rows] = ((F.silu(gate) * up) @ w2[e].t()).to(out.dtype)      # [n, D] (bf16 under autocast)
        start += n
    y = (out.view(T, K, D).float() * topk_weights.float().unsqueeze(-1)).sum(dim=1)
    return y.to(x.dtype)


# ---------------------------------------------------------------- fused elementwise kernels (norm, mla_prepare,
# activation, router): the eager code they replace, rounding step by rounding step.

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = weight * (v / rms(v)) over the last dim, v = x or s = x + residual (in x's dtype); returns
    y, or (y, s) with a residual. Normalised in fp32 and cast to v's dtype BEFORE the weight multiply,
    as model.RMSNorm does (the official rounding order)."""
    v = x if residual is None else x + residual
    vf = v.float()
    y = weight * (vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + eps)).to(v.dtype)
    return y if residual is None else (y, v)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope.apply_rotary, repeated here because kernels import nothing internal (a test checks they agree):
    pairs (2i, 2i+1) of x [..., P] rotated by cos/sin [..., P/2] in fp32, returned in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def mla_prepare_ref(q_pe: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor | None = None,
                    slot_mapping: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA between the projections and attention. kv [T, R + P] = [latent | raw k_pe]; returns
    c_kv = RMSNorm(latent) [T, R] and k_pe = RoPE(raw k_pe) [T, P]; rotates q_pe [T, H, P] in place;
    with kv_cache [num_blocks, block_size, R + P] writes [c_kv ; k_pe] (in the cache dtype) to the
    flat slot slot_mapping[t] of every token t."""
    R = kv.shape[1] - q_pe.shape[-1]
    c_kv = rms_norm_ref(kv[:, :R], norm_weight, eps)
    k_pe = _apply_rotary(kv[:, R:], cos, sin)
    q_pe.copy_(_apply_rotary(q_pe, cos[:, None], sin[:, None]))
    if kv_cache is not None:
        latent = torch.cat([c_kv, k_pe], dim=-1).to(kv_cache.dtype)                 # [T, R + P]
        kv_cache.view(-1, kv_cache.shape[-1]).index_copy_(0, slot_mapping.long(), latent)
    return c_kv, k_pe


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> silu(gate) * up [T, I], each op rounded to x's dtype."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def topk_softmax_ref(logits: torch.Tensor, k: int, renormalize: bool,
                     scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy routing as model.MoEGate does it: scores = softmax(logits [T, E]) in fp32, the top-k
    scores divided by their sum (+1e-20) if renormalize, else times scaling. Returns (weights [T, k]
    fp32, ids [T, k] int32), in descending score order."""
    scores = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(scores, k, dim=-1)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        weights = weights * scaling
    return weights, ids.int()
