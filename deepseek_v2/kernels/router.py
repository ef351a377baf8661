"""The MoE router's tail in one Triton launch: softmax over the experts, top-k (greedy, or limited to
the best groups of experts: DeepSeek-V2's device-limited routing), and the renormalisation (or
scaling) of the k weights. Eager PyTorch: ~10 kernels, ~15 with the groups.

A program holds BLOCK_T rows of logits. The softmax is torch's: exp(l - max) with CUDA's accurate expf
(libdevice) and an IEEE divide by the sum; only the order of the fp32 sum differs, so weights match
to an fp32 ulp or two. The k picks are made on the logits, not on the rounded scores: the scores are
a monotone function of the logits, so whenever torch's k-th and (k+1)-th scores differ the chosen set
is torch.topk's. Picks come out in descending score order, ties to the lowest expert index.

Group-limited routing keeps the topk_group groups (contiguous runs of E / n_group experts) whose best
score is highest, then picks among their experts. The next group to keep is the one that holds the
best expert outside the groups kept so far (a group's best score is its best expert's), so the groups
are chosen by the same max-and-lowest-index steps as the experts, on the logits; ties between groups
go to the lower group.

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
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, T, E, stride_l, scaling, group_size,
                         K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr, LIBDEVICE: tl.constexpr,
                         TOPK_GROUP: tl.constexpr):  # 0: greedy; else keep this many groups of group_size
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
    if TOPK_GROUP > 0:  # only the experts of the kept groups may be picked
        group = offs_e // group_size                                    # [BLOCK_E]
        kept = valid & (offs_e < 0)[None, :]                            # none yet
        for j in tl.static_range(TOPK_GROUP):
            best = tl.max(tl.where(valid & ~kept, logits, float("-inf")), axis=1)
            hit = valid & ~kept & (logits == best[:, None])
            leader = tl.min(tl.where(hit, offs_e[None, :], BLOCK_E), axis=1)  # ties: lowest index, lowest group
            kept = kept | (valid & (group[None, :] == (leader // group_size)[:, None]))
        free = kept
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
    out = rows.to(tl.int64)[:, None] * K + offs_k[None, :]
    mask = mask_t[:, None] & (offs_k < K)[None, :]
    tl.store(weights_ptr + out, weights, mask=mask)
    tl.store(ids_ptr + out, ids, mask=mask)


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool,
                 scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy top-k routing; same contract as reference.topk_softmax.

    logits [T, E] fp32 (last dim contiguous, E <= 1024). scores = softmax(logits); returns weights [T, k]
    fp32 (the picked scores / (their sum + 1e-20) if renormalize, else times scaling) and ids [T, k]
    int32, each row in descending score order (ties: lowest expert first). No host synchronisation.
    """
    return _route("topk_softmax", logits, k, renormalize, scaling, 1, 0)


def grouped_topk_softmax(logits: torch.Tensor, k: int, n_group: int, topk_group: int, renormalize: bool,
                         scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited routing; same contract as reference.grouped_topk_softmax: the E experts form n_group
    contiguous groups (E divisible by n_group), the topk_group groups with the highest best score are
    kept and the k highest scores among their experts picked (k <= topk_group * E / n_group). Returns
    what topk_softmax returns. No host synchronisation."""
    name = "grouped_topk_softmax"
    E = logits.shape[-1]
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group or k > topk_group * (E // n_group):
        raise ValueError(f"{name}: need E % n_group == 0, 1 <= topk_group <= n_group and k <= topk_group * E / "
                         f"n_group; got E={E}, n_group={n_group}, topk_group={topk_group}, k={k}")
    return _route(name, logits, k, renormalize, scaling, E // n_group, topk_group)


def _route(name: str, logits: torch.Tensor, k: int, renormalize: bool, scaling: float, group_size: int,
           topk_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"{name}: expected fp32 logits [T, E]; got {tuple(logits.shape)} {logits.dtype}")
    T, E = logits.shape
    if not 1 <= E <= _MAX_E or not 1 <= k <= E:
        raise ValueError(f"{name}: need 1 <= k <= E <= {_MAX_E}; got k={k}, E={E}")
    if logits.stride(1) != 1:
        raise ValueError(f"{name}: logits need a contiguous last dim")
    weights = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, k, dtype=torch.int32, device=logits.device)
    if T > 0:
        block_e = triton.next_power_of_2(E)
        block_t = min(triton.next_power_of_2(T), max(1, _ELEMENTS_PER_PROGRAM // block_e))
        _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
            logits, weights, ids, T, E, logits.stride(0), scaling, group_size,
            K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK_T=block_t, BLOCK_E=block_e,
            RENORMALIZE=renormalize, LIBDEVICE=logits.is_cuda, TOPK_GROUP=topk_group,
            num_warps=4, enable_fp_fusion=False, enable_reflect_ftz=False,
        )
    return weights, ids
