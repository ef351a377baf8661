"""Plain PyTorch references for the Triton kernels: absorbed MLA decode over a paged latent cache and
the routed-expert MoE. They are the CPU path of the model and the oracle of the kernel tests.

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
        out[rows] = (F.silu(gate) * up) @ w2[e].t()                       # [n, D]
        start += n
    y = (out.view(T, K, D).float() * topk_weights.float().unsqueeze(-1)).sum(dim=1)
    return y.to(x.dtype)
