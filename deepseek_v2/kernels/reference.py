"""The model's arithmetic for each kernel family, in plain PyTorch: the linear layers (FP8 weights with
block scales included), RMSNorm, RoPE, MLA's step between the projections and attention, the read
of cached latents for prefill, prefill attention over packed sequences, absorbed MLA decode over the
paged latent cache, SwiGLU's activation,
the softmax router's top-k (greedy and group-limited) and the routed experts (a pick with expert id
-1, an expert on another rank under expert parallelism, adds nothing).

The latent cache is in the model's dtype, or FP8 (a uint8 tensor; rows as kernels/fp8.py lays them
out): the functions that write or read it take either.

This is the model's own math, not a copy of it: the model calls these functions through its kernel set
(kernels/__init__.py), and they are what it runs for training, on the CPU and whenever the reference
set is chosen. They are differentiable (but for the FP8 paths, which are inference only) and run on
any device. Each Triton kernel promises the same contract as its function here, and the kernel tests
compare the two.

Letters: T tokens, N sequences, H heads, R kv_lora_rank, P qk_rope_head_dim, L = max_blocks *
block_size, K experts per token, E experts, D hidden size, I expert intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fp8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_scale_inv: torch.Tensor | None = None, block_offset: tuple[int, int] = (0, 0), *,
           plain_rows: torch.Tensor | None = None,
           x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T (+ bias), y in x's dtype. Without weight_scale_inv, W is weight (F.linear). With it, W
    is FP8 with one scale per 128 x 128 block (kernels/fp8.py; block_offset: where a tensor-parallel
    part starts inside its first block) and x is quantized per token in groups of 128 on the fly, as
    DeepSeek deploys FP8 (W8A8): both are dequantized and multiplied in fp32, the bias added in fp32.
    plain_rows [N2, K] in x's dtype: x times them too (F.linear, x unquantized), returned beside y as
    (y, y2 [..., N2]): the FP8 query projection and the bf16 kv_a_proj_with_mqa of MLA's input in one
    call. x_fp8: x already quantized, which the kernels' GEMM may read instead of quantizing x; here x is
    quantized again (the same values)."""
    if plain_rows is not None:
        return linear(x, weight, bias, weight_scale_inv, block_offset), F.linear(x, plain_rows)
    if weight_scale_inv is None:
        return F.linear(x, weight, bias)
    q, s = fp8.quantize_activation(x, block_offset[1])
    y = F.linear(fp8.dequantize_activation(q, s, block_offset[1]),
                 fp8.dequantize_weight(weight, weight_scale_inv, block_offset))
    return (y if bias is None else y + bias.float()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, *,
             x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = weight * (v / rms(v)) over the last dim, with v = x, or v = x + residual (rounded to x's
    dtype); returns y, or (y, v) with a residual, so the residual stream is carried beside the layer
    output. Normalised in fp32 and cast back BEFORE the weight multiply (the official rounding order).
    x_fp8: buffers (e4m3 [T', D], fp32 [T', ceil(D / 128)], T' >= T rows) whose first T rows also receive
    y quantized (fp8.quantize_activation), for an FP8 GEMM after the norm."""
    v = x if residual is None else x + residual
    vf = v.float()
    y = weight * (vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + eps)).to(v.dtype)
    if x_fp8 is not None:
        quantize_into(x_fp8, y)
    return y if residual is None else (y, v)


def quantize_into(x_fp8: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> None:
    """The first rows of the buffers x_fp8 (e4m3 [T', W], fp32 [T', ceil(W / 128)]) = fp8.quantize_activation
    of y's T rows, zero columns past y's up to W (an FP8 weight widened with zero columns)."""
    rows = y.reshape(-1, y.shape[-1])
    for out, value in zip(x_fp8, fp8.quantize_activation(F.pad(rows, (0, x_fp8[0].shape[1] - rows.shape[1])))):
        out[:rows.shape[0]] = value


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (2i, 2i+1) of x [..., P] by cos/sin [..., P/2] (broadcast over heads by the
    caller), in fp32, returned in x's dtype. Why pairs: see rope.py."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def mla_prepare(q_pe: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor | None = None,
                slot_mapping: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLA between the projections and attention for T tokens. q_pe [T, H, P] is the rope part of every
    head's query, kv [T, R + P] = [latent | raw k_pe] (kv_a_proj_with_mqa's output), cos/sin [T, P/2].
    Returns (q_pe rotated, c_kv = RMSNorm(latent) [T, R], k_pe = RoPE(raw k_pe) [T, P]: one rope key
    shared by all heads). With kv_cache [num_blocks, block_size, R + P] also writes [c_kv ; k_pe] (in
    the cache's dtype) to the flat slot slot_mapping[t] of every token t.

    The caller must use the returned q_pe and not its input: a kernel may rotate it in place."""
    R = kv.shape[-1] - q_pe.shape[-1]
    c_kv = rms_norm(kv[:, :R], norm_weight, eps)
    k_pe = apply_rotary(kv[:, R:], cos, sin)
    q_pe = apply_rotary(q_pe, cos[:, None], sin[:, None])
    if kv_cache is not None:
        latent = torch.cat([c_kv, k_pe], dim=-1)                                    # [T, R + P]
        if kv_cache.dtype == torch.uint8:
            fp8.write_cache(kv_cache, slot_mapping, latent)
        else:
            kv_cache.view(-1, kv_cache.shape[-1]).index_copy_(0, slot_mapping.long(), latent.to(kv_cache.dtype))
    return q_pe, c_kv, k_pe


def gather_latents(kv_cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cached rows [c_kv ; k_pe] of the flat slots `slots` [L] -> [L, R + P] in dtype (an FP8 cache
    dequantized)."""
    if kv_cache.dtype == torch.uint8:
        return fp8.read_cache(kv_cache, slots // kv_cache.shape[1], slots % kv_cache.shape[1], dtype)
    return kv_cache.view(-1, kv_cache.shape[-1])[slots].to(dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_query: torch.Tensor,
                      cu_key: torch.Tensor, query_lens: list[int], key_lens: list[int], scale: float) -> torch.Tensor:
    """Causal attention of several sequences packed together: q [Tq, H, dq] holds each sequence's new
    tokens, k [Tk, H, dq] and v [Tk, H, dv] each sequence's whole context (its cached prefix, then its
    new tokens), query_lens / key_lens per sequence (cu_query / cu_key: their cumulative sums, for
    the kernels). Query i of a sequence with C = key_len - query_len cached tokens sees keys 0 .. C + i
    (the causal mask aligned to the end). Returns [Tq, H, dv]."""
    outputs, q_start, k_start = [], 0, 0
    for q_len, k_len in zip(query_lens, key_lens):
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[q_start:q_start + q_len], k[k_start:k_start + k_len],
                                                          v[k_start:k_start + k_len]))   # [1, H, len, d]
        mask = None
        if k_len > q_len:  # cached context: the causal mask aligned to the end
            mask = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len) >= torch.arange(k_len, device=q.device)
        out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=mask is None, scale=scale)
        outputs.append(out[0].transpose(0, 1))
        q_start, k_start = q_start + q_len, k_start + k_len
    return torch.cat(outputs)


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """Absorbed decode's query in the latent space: q_lat[n, h] = q_nope[n, h] @ w_uk[h] for q_nope
    [N, H, DN] and w_uk [H, DN, R] (W_UK: kv_b_proj's key rows per head), a batched matmul in q_nope's
    dtype -> [N, H, R]."""
    return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, softmax_scale: float, max_seq_len: int | None = None,
               w_uv: torch.Tensor | None = None) -> torch.Tensor:
    """out[n, h] = sum_t softmax_t(scale * (q_lat[n,h].c_t + q_pe[n,h].pe_t)) c_t over t < seq_lens[n].

    Absorbed decode: with W_UK folded into the query (q_lat [N, H, R]), attention is MQA with one
    shared key [c ; pe] and the latent c itself as the value. kv_cache [num_blocks, block_size, R + P]
    holds per token the latent c (first R) and the rotated k_pe (last P) (an FP8 cache: uint8
    [num_blocks, block_size, R + P + 4] as kernels/fp8.py lays it out, dequantized); token t of
    sequence n sits in block block_tables[n, t // block_size] at row t % block_size. Table entries past a sequence's last
    block are ignored. A sequence of length 0 gets a zero output. Math in fp32, result in q_lat's
    dtype. max_seq_len (a bound on seq_lens) only tunes the kernel; unused here. w_uv [H, dv, R] in
    q_lat's dtype (absorbed decode's next step, W_UV): then the output is projected per head,
    out[n, h] = w_uv[h] @ out[n, h], [N, H, dv] (a batched matmul in that dtype).
    """
    R = q_lat.shape[-1]
    num_blocks, block_size, _ = kv_cache.shape
    blocks = block_tables.long().clamp(0, num_blocks - 1)                 # unused entries may be junk
    if kv_cache.dtype == torch.uint8:
        block = blocks[..., None].expand(-1, -1, block_size)
        offset = torch.arange(block_size, device=blocks.device).expand_as(block)
        kv = fp8.read_cache(kv_cache, block, offset, torch.float32).flatten(1, 2)             # [N, L, R+P]
    else:
        kv = kv_cache[blocks].flatten(1, 2).float()                                           # [N, L, R+P]
    q = torch.cat([q_lat, q_pe], dim=-1).float()                          # [N, H, R+P]
    scores = torch.bmm(q, kv.transpose(1, 2)) * softmax_scale             # [N, H, L]
    positions = torch.arange(kv.shape[1], device=kv.device)
    valid = positions[None, :] < seq_lens[:, None].long()                 # [N, L]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)                     # length 0: all -inf -> 0
    out = torch.bmm(p, kv[..., :R]).to(q_lat.dtype)                       # [N, H, R]
    if w_uv is None:
        return out
    return torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [N, H, dv]


def silu_and_mul(x: torch.Tensor, *, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """SwiGLU's activation: x [..., 2I] = [gate | up] -> silu(gate) * up [..., I], each op rounded to
    x's dtype. x_fp8: buffers (e4m3 [T', W], fp32 [T', ceil(W / 128)], T' >= T, W >= I) whose first T rows
    also receive the output quantized (fp8.quantize_activation; columns past I zeros), for an FP8 GEMM."""
    gate, up = x.chunk(2, dim=-1)
    y = F.silu(gate) * up
    if x_fp8 is not None:
        quantize_into(x_fp8, y)
    return y


def _weigh(weights: torch.Tensor, renormalize: bool, scaling: float) -> torch.Tensor:
    """The picked scores divided by their sum (norm_topk_prob), else times routed_scaling_factor."""
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) if renormalize else weights * scaling


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool, scaling: float = 1.0,
                 num_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy routing: scores = softmax(logits [T, E]) in fp32, the k highest picked. Returns (weights
    [T, k] fp32, ids [T, k] int32), in descending score order; with num_shared, [T, k + num_shared]:
    every token's picks end with the experts E .. E + num_shared - 1 at weight 1 (the shared experts,
    stacked after the routed ones: MoE.fuse_shared_experts)."""
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    return _with_shared(_weigh(weights, renormalize, scaling), ids.int(), logits.shape[-1], num_shared)


def route(x: torch.Tensor, weight: torch.Tensor, k: int, renormalize: bool, scaling: float = 1.0,
          num_shared: int = 0, groups: tuple[int, int] | None = None, *,
          x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router whole: (logits [T, E] = x @ weight^T in fp32, whatever x's dtype and under autocast
    too (the official code routes in fp32), then topk_softmax's weights and ids, or with groups =
    (n_group, topk_group) grouped_topk_softmax's). x_fp8: two tensors (e4m3 [T, D], fp32 [T, ceil(D /
    128)]) that also receive fp8.quantize_activation(x), for FP8 experts (the kernels' router does it in
    its own launch)."""
    if x_fp8 is not None:
        quantize_into(x_fp8, x)
    with torch.autocast(x.device.type, enabled=False):
        logits = F.linear(x.float(), weight.float())
    if groups is None:
        return (logits, *topk_softmax(logits, k, renormalize, scaling, num_shared))
    return (logits, *grouped_topk_softmax(logits, k, *groups, renormalize, scaling, num_shared))


def grouped_topk_softmax(logits: torch.Tensor, k: int, n_group: int, topk_group: int, renormalize: bool,
                         scaling: float = 1.0, num_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited routing (the paper's device-limited routing; official `group_limited_greedy`): the
    E experts form n_group contiguous groups; keep the topk_group groups with the highest best score,
    then pick the k highest scores among their experts. Same outputs as topk_softmax (num_shared too)."""
    scores = torch.softmax(logits.float(), dim=-1)                        # [T, E]
    grouped = scores.unflatten(-1, (n_group, -1))                         # [T, n_group, E / n_group]
    kept = torch.topk(grouped.amax(dim=-1), topk_group, dim=-1).indices   # [T, topk_group]
    group_mask = torch.zeros_like(grouped[..., 0]).scatter_(1, kept, 1.0)  # [T, n_group]
    masked = (grouped * group_mask[..., None]).flatten(1)                 # other groups' scores -> 0
    weights, ids = torch.topk(masked, k, dim=-1)
    return _with_shared(_weigh(weights, renormalize, scaling), ids.int(), logits.shape[-1], num_shared)


def _with_shared(weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                 num_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k picks [T, k], then the shared experts num_experts + j at weight 1: [T, k + num_shared]."""
    if not num_shared:
        return weights, ids
    T = ids.shape[0]
    shared = torch.arange(num_experts, num_experts + num_shared, dtype=ids.dtype, device=ids.device)
    return (torch.cat([weights, weights.new_ones(T, num_shared)], dim=1),
            torch.cat([ids, shared.expand(T, -1)], dim=1))


def moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
        topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
        w2_scale: torch.Tensor | None = None, add: torch.Tensor | None = None, *,
        x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None, num_shared: int = 0) -> torch.Tensor:
    """The routed experts: y[t] = sum_k topk_weights[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)),
    e = topk_ids[t,k], over the picks with e != -1.

    x [T, D]; w13 [E, 2I, D] (rows :I gate_proj, I: up_proj); w2 [E, D, I]; topk_ids [T, K] in
    [0, E) or -1, E = w13.shape[0] (the experts held here). A -1 pick (under expert parallelism, an
    expert on another rank) adds exactly zero. Expert outputs in x's dtype (the autocast dtype in
    training), combined in fp32, cast back to x's dtype. Tokens are grouped by expert and the loop
    runs over experts, never over tokens (the host reads the counts, which a kernel must not do, but
    is fine here).

    FP8 experts (inference only): w13 and w2 in float8_e4m3fn with block scales w13_scale [E, 2 nb, kb]
    (the gate_proj's ceil(I/128) block rows, then the up_proj's) and w2_scale [E, ceil(D/128),
    ceil(I/128)]; each GEMM as `linear` does it (its input quantized per token in groups of 128), the
    intermediate silu(gate) * up computed in fp32 and rounded to x's dtype once, as the fused kernel
    does: its FP8 quantization would turn a different rounding of it into a different e4m3 value.
    add [T, D] (the shared experts' output): added to the result, a plain tensor add. x_fp8: x already
    quantized (route's x_fp8), which the kernels' MoE reads instead of quantizing x; here x is quantized
    again, to the same values. num_shared: each token's last num_shared picks are the stack's last
    experts (the shared ones), which the kernels' MoE may ask L2 for early; nothing here.
    """
    T, D = x.shape
    E, K = w13.shape[0], topk_ids.shape[1]
    flat = topk_ids.flatten().long()                                      # [T*K], row t*K + k
    order = flat.argsort(stable=True)                                     # rows grouped by expert, -1 first
    missing, *counts = torch.bincount(flat + 1, minlength=E + 1).tolist()
    out = x.new_zeros(T * K, D) if missing else x.new_empty(T * K, D)     # the -1 rows stay zero
    start = missing
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start:start + n]
        if w13_scale is None:
            h = silu_and_mul(x[rows // K] @ w13[e].t())                   # [n, I]
            out[rows] = (h @ w2[e].t()).to(out.dtype)                     # [n, D]
        else:  # gate and up: two matrices of blocks (I need not be a multiple of 128), kept in fp32
            I, nb = w2.shape[2], w13_scale.shape[1] // 2
            xe = x[rows // K].float()
            gate = linear(xe, w13[e, :I], weight_scale_inv=w13_scale[e, :nb])
            up = linear(xe, w13[e, I:], weight_scale_inv=w13_scale[e, nb:])
            h = (F.silu(gate) * up).to(x.dtype)                           # [n, I], rounded once
            out[rows] = linear(h, w2[e], weight_scale_inv=w2_scale[e])
        start += n
    y = (out.view(T, K, D).float() * topk_weights.float().unsqueeze(-1)).sum(dim=1).to(x.dtype)
    return y if add is None else y + add
