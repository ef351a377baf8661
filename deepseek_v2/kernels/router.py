"""The greedy MoE router's tail in one Triton launch: softmax over the experts, top-k, and the
renormalisation (or scaling) of the k weights, and the shared experts' picks where they run as experts
of the routed stack (MoE.fuse_shared_experts). Eager PyTorch: ~10 kernels.

A program holds BLOCK_T rows of logits. The softmax is torch's: exp(l - max) with CUDA's accurate expf
(libdevice) and an IEEE divide by the sum; only the order of the fp32 sum differs, so weights match
to an fp32 ulp or two. The k picks are made on the logits, not on the rounded scores: the scores are
a monotone function of the logits, so whenever torch's k-th and (k+1)-th scores differ the chosen set
is torch.topk's. Picks come out in descending score order, ties to the lowest expert index.

Letters: T tokens, E routed experts, K picks per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_MAX_E = 1024
_ELEMENTS_PER_PROGRAM = 2048  # BLOCK_T * BLOCK_E: 16 logits per thread with 4 warps


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, T, E, stride_l, scaling,
                         K: tl.constexpr, NUM_SHARED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr, LIBDEVICE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    mask_t = rows < T
    valid = mask_t[:, None] & (offs_e < E)[None, :]                     # [BLOCK_T, BLOCK_E]
    logits = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_l + offs_e[None, :],
                     mask=valid, other=float("-inf"))
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(mask_t, row_max, 0.0)                            # rows past T: no inf - inf, 0 / 0
    if LIBDEVICE:  # CUDA's expf, what torch's softmax calls; the interpreter has no libdevice
        ex = libdevice.exp(logits - row_max[:, None])
    else:
        ex = tl.exp(logits - row_max[:, None])
    scores = tl.div_rn(ex, tl.where(mask_t, tl.sum(ex, axis=1), 1.0)[:, None])

    offs_k = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    free = valid                                                        # experts not picked yet
    for j in tl.static_range(K):
        best = tl.max(tl.where(free, logits, float("-inf")), axis=1)
        hit = free & (logits == best[:, None])
        pick = tl.min(tl.where(hit, offs_e[None, :], BLOCK_E), axis=1)  # ties: lowest index
        chosen = offs_e[None, :] == pick[:, None]
        score = tl.sum(tl.where(chosen, scores, 0.0), axis=1)
        weights = tl.where(offs_k[None, :] == j, score[:, None], weights)
        ids = tl.where(offs_k[None, :] == j, pick[:, None], ids)
        free = free & ~chosen
    if RENORMALIZE:
        weights = tl.div_rn(weights, (tl.sum(weights, axis=1) + 1e-20)[:, None])
    else:
        weights = weights * scaling
    shared = (offs_k >= K)[None, :]                                     # the shared experts: E + j, weight 1
    weights = tl.where(shared, 1.0, weights)
    ids = tl.where(shared, E + offs_k[None, :] - K, ids)
    out = rows.to(tl.int64)[:, None] * (K + NUM_SHARED) + offs_k[None, :]
    mask = mask_t[:, None] & (offs_k < K + NUM_SHARED)[None, :]
    tl.store(weights_ptr + out, weights, mask=mask)
    tl.store(ids_ptr + out, ids, mask=mask)


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool, scaling: float = 1.0,
                 num_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy top-k routing; same contract as reference.topk_softmax.

    logits [T, E] fp32 (last dim contiguous, E <= 1024). scores = softmax(logits); returns weights [T, k]
    fp32 (the picked scores / (their sum + 1e-20) if renormalize, else times scaling) and ids [T, k]
    int32, each row in descending score order (ties: lowest expert first); with num_shared, [T, k +
    num_shared], each row ending with the shared experts E .. E + num_shared - 1 at weight 1. No host
    synchronisation.
    """
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"topk_softmax: expected fp32 logits [T, E]; got {tuple(logits.shape)} {logits.dtype}")
    T, E = logits.shape
    if not 1 <= E <= _MAX_E or not 1 <= k <= E:
        raise ValueError(f"topk_softmax: need 1 <= k <= E <= {_MAX_E}; got k={k}, E={E}")
    if logits.stride(1) != 1:
        raise ValueError("topk_softmax: logits need a contiguous last dim")
    weights = torch.empty(T, k + num_shared, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, k + num_shared, dtype=torch.int32, device=logits.device)
    if T > 0:
        block_e = triton.next_power_of_2(E)
        block_t = min(triton.next_power_of_2(T), max(1, _ELEMENTS_PER_PROGRAM // block_e))
        _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
            logits, weights, ids, T, E, logits.stride(0), scaling,
            K=k, NUM_SHARED=num_shared, BLOCK_K=triton.next_power_of_2(k + num_shared), BLOCK_T=block_t,
            BLOCK_E=block_e,
            RENORMALIZE=renormalize, LIBDEVICE=logits.is_cuda,
            num_warps=4, enable_fp_fusion=False, enable_reflect_ftz=False,
        )
    return weights, ids
