"""The MoE router in Triton, greedy or group-limited (DeepSeek-V2's device-limited routing).
topk_softmax: its tail in one launch: softmax over the experts, the groups kept, top-k, and the
renormalisation (or scaling) of the k weights, and the shared experts' picks where they run as experts
of the routed stack (MoE.fuse_shared_experts); eager PyTorch: ~10 kernels. route: for a few tokens
(decode steps), the fp32 product x @ W^T and that tail in one launch.

A program holds BLOCK_T rows of logits. The softmax is torch's: exp(l - max) with CUDA's accurate expf
(libdevice) and an IEEE divide by the sum; only the order of the fp32 sum differs, so weights match
to an fp32 ulp or two. The k picks are made on the logits, not on the rounded scores: the scores are
a monotone function of the logits, so whenever torch's k-th and (k+1)-th scores differ the chosen set
is torch.topk's. Picks come out in descending score order, ties to the lowest expert index.

Letters: T tokens, E routed experts, K picks per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import reference
from .fp8 import BLOCK, EPS, FP8_MAX
from .fp8_linear import check_quantized_out, quantize_activation, quantize_rows
from .launch import arrival_counters, pdl_launch, prefetch_l2, prefetch_launch, wait_for_prior_kernels

_MAX_E = 1024
_ELEMENTS_PER_PROGRAM = 2048  # BLOCK_T * BLOCK_E: 16 logits per thread with 4 warps
_COUNTERS = 1024  # route's arrival counters: blocks of tokens of one launch


@triton.jit
def _softmax_topk_store(logits, rows, mask_t, weights_ptr, ids_ptr, E, scaling,
                        K: tl.constexpr, NUM_SHARED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                        RENORMALIZE: tl.constexpr, LIBDEVICE: tl.constexpr,
                        N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr):
    """logits [BLOCK_T, BLOCK_E] (-inf past E and for rows past T) of the rows `rows`: softmax, the K
    picks (with N_GROUP > 1, among the experts of the TOPK_GROUP groups of E / N_GROUP contiguous
    experts with the highest best score), their weights, and the shared experts' picks after them, stored."""
    offs_e = tl.arange(0, BLOCK_E)
    valid = mask_t[:, None] & (offs_e < E)[None, :]
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(mask_t, row_max, 0.0)                            # rows past T: no inf - inf, 0 / 0
    if LIBDEVICE:  # CUDA's expf, what torch's softmax calls; the interpreter has no libdevice
        ex = libdevice.exp(logits - row_max[:, None])
    else:
        ex = tl.exp(logits - row_max[:, None])
    scores = tl.div_rn(ex, tl.where(mask_t, tl.sum(ex, axis=1), 1.0)[:, None])

    offs_k = tl.arange(0, BLOCK_K)
    weights = tl.zeros([logits.shape[0], BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([logits.shape[0], BLOCK_K], dtype=tl.int32)
    free = valid                                                        # experts not picked yet
    if N_GROUP > 1:  # group-limited: only the experts of the TOPK_GROUP best groups stay free
        group = offs_e // (E // N_GROUP)
        group_best = tl.full(logits.shape, float("-inf"), dtype=tl.float32)  # each expert's group's best logit
        for g in tl.static_range(N_GROUP):
            in_group = valid & (group == g)[None, :]
            best_g = tl.max(tl.where(in_group, logits, float("-inf")), axis=1)
            group_best = tl.where(in_group, best_g[:, None], group_best)
        open_groups = valid
        kept = offs_e[None, :] < 0                                      # all False
        for j in tl.static_range(TOPK_GROUP):
            best = tl.max(tl.where(open_groups, group_best, float("-inf")), axis=1)
            pick = tl.min(tl.where(open_groups & (group_best == best[:, None]), group[None, :], N_GROUP), axis=1)
            chosen = group[None, :] == pick[:, None]                    # ties: the lowest group
            kept = kept | chosen
            open_groups = open_groups & ~chosen
        free = valid & kept
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


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, T, E, stride_l, scaling,
                         K: tl.constexpr, NUM_SHARED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr, LIBDEVICE: tl.constexpr,
                         N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                         PDL: tl.constexpr = False):
    wait_for_prior_kernels(PDL)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    mask_t = rows < T
    valid = mask_t[:, None] & (offs_e < E)[None, :]                     # [BLOCK_T, BLOCK_E]
    logits = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_l + offs_e[None, :],
                     mask=valid, other=float("-inf"))
    _softmax_topk_store(logits, rows, mask_t, weights_ptr, ids_ptr, E, scaling, K, NUM_SHARED, BLOCK_K, BLOCK_E,
                        RENORMALIZE, LIBDEVICE, N_GROUP, TOPK_GROUP)


@triton.jit
def _route_kernel(x_ptr, w_ptr, partial_ptr, arrived_ptr, logits_ptr, weights_ptr, ids_ptr, xq_ptr, xs_ptr, T, E, D,
                  stride_x, stride_xq, stride_xs, stride_xsg, scaling,
                  SPLITS: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                  K: tl.constexpr, NUM_SHARED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                  RENORMALIZE: tl.constexpr, LIBDEVICE: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                  QUANTIZE_X: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr,
                  PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    """Program (b, s): the fp32 logits of tokens [b BLOCK_T, (b + 1) BLOCK_T) over the hidden columns
    [s SPLIT_D, (s + 1) SPLIT_D), into partial; the last of a block's SPLITS programs to arrive sums the
    parts in split order (the same sum whichever arrives last), stores the logits and routes the tokens.
    One token a program (BLOCK_T 1, decode's few tokens): the products on the CUDA cores, a row at a time;
    a block of tokens: tl.dot in IEEE fp32. QUANTIZE_X (SPLIT_D = 128): each program also stores its
    columns of x as one activation group a row, e4m3 into xq and the scale into xs, quantize_activation's
    arithmetic. PREFETCH: its columns of the fp32 weight asked of L2 before the wait
    (launch.PREFETCH_WEIGHTS)."""
    b = tl.program_id(0)
    s = tl.program_id(1)
    rows = b * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = rows < T
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    if PREFETCH:  # an expert's SPLIT_D columns, 32 at a time (a line)
        lines = s * SPLIT_D + tl.arange(0, SPLIT_D // 32) * 32
        prefetch_l2(w_ptr + offs_e[:, None] * D + lines[None, :], mask_e[:, None] & (lines < D)[None, :])
    wait_for_prior_kernels(PDL)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    if BLOCK_T == 1:
        acc_row = tl.zeros([BLOCK_E], dtype=tl.float32)
        for d in tl.static_range(0, SPLIT_D, BLOCK_D):
            offs_d = s * SPLIT_D + d + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            x = tl.load(x_ptr + b * stride_x + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_e[:, None] * D + offs_d[None, :], mask=mask_e[:, None] & mask_d[None, :],
                        other=0.0)
            acc_row += tl.sum(w * x[None, :], axis=1)
        acc = acc_row[None, :]
    else:
        acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for d in tl.static_range(0, SPLIT_D, BLOCK_D):
            offs_d = s * SPLIT_D + d + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            x = tl.load(x_rows + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_e[None, :] * D + offs_d[:, None], mask=mask_d[:, None] & mask_e[None, :],
                        other=0.0)
            acc = tl.dot(x, w, acc, input_precision="ieee")
    if QUANTIZE_X:  # the same columns as one group a row (from L1: just read)
        offs_g = s * SPLIT_D + tl.arange(0, SPLIT_D)
        mask_g = mask_t[:, None] & (offs_g < D)[None, :]
        q, scale = quantize_rows(tl.load(x_rows + offs_g[None, :], mask=mask_g, other=0.0), FP8_MAX, EPS)
        tl.store(xq_ptr + rows.to(tl.int64)[:, None] * stride_xq + offs_g[None, :], q, mask=mask_g)
        tl.store(xs_ptr + rows.to(tl.int64) * stride_xs + s * stride_xsg, scale, mask=mask_t)
    part_ptrs = partial_ptr + rows.to(tl.int64)[:, None] * (SPLITS * BLOCK_E) + offs_e[None, :]
    tl.store(part_ptrs + s * BLOCK_E, acc, mask=mask_t[:, None])
    tl.debug_barrier()  # all of this program's stores issued before its arrival is counted (release)
    if tl.atomic_add(arrived_ptr + b, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
        logits = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for j in tl.static_range(SPLITS):  # .cg: from L2, where the other programs' parts are
            logits += tl.load(part_ptrs + j * BLOCK_E, mask=mask_t[:, None], other=0.0, cache_modifier=".cg")
        tl.store(arrived_ptr + b, 0)  # zero again for the next launch
        valid = mask_t[:, None] & mask_e[None, :]
        tl.store(logits_ptr + rows.to(tl.int64)[:, None] * E + offs_e[None, :], logits, mask=valid)
        _softmax_topk_store(tl.where(valid, logits, float("-inf")), rows, mask_t, weights_ptr, ids_ptr,
                            E, scaling, K, NUM_SHARED, BLOCK_K, BLOCK_E, RENORMALIZE, LIBDEVICE, N_GROUP, TOPK_GROUP)


def _check_groups(name: str, E: int, k: int, groups: tuple[int, int] | None) -> tuple[int, int]:
    """(n_group, topk_group): (1, 1) for greedy routing; group-limited needs E in whole groups and k
    experts in the kept groups."""
    if groups is None:
        return 1, 1
    n_group, topk_group = groups
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group or k > topk_group * (E // n_group):
        raise ValueError(f"{name}: need E = {E} in n_group whole groups and k = {k} <= topk_group x E / n_group; "
                         f"got n_group={n_group}, topk_group={topk_group}")
    return n_group, topk_group


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool, scaling: float = 1.0,
                 num_shared: int = 0, groups: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing; same contract as reference.topk_softmax (with groups, reference.grouped_topk_softmax).

    logits [T, E] fp32 (last dim contiguous, E <= 1024). scores = softmax(logits); returns weights [T, k]
    fp32 (the picked scores / (their sum + 1e-20) if renormalize, else times scaling) and ids [T, k]
    int32, each row in descending score order (ties: lowest expert first); with num_shared, [T, k +
    num_shared], each row ending with the shared experts E .. E + num_shared - 1 at weight 1. groups
    (n_group, topk_group): group-limited routing, as reference.grouped_topk_softmax (ties between
    groups: the lowest). No host synchronisation.
    """
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"topk_softmax: expected fp32 logits [T, E]; got {tuple(logits.shape)} {logits.dtype}")
    T, E = logits.shape
    if not 1 <= E <= _MAX_E or not 1 <= k <= E:
        raise ValueError(f"topk_softmax: need 1 <= k <= E <= {_MAX_E}; got k={k}, E={E}")
    if logits.stride(1) != 1:
        raise ValueError("topk_softmax: logits need a contiguous last dim")
    n_group, topk_group = _check_groups("topk_softmax", E, k, groups)
    weights = torch.empty(T, k + num_shared, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, k + num_shared, dtype=torch.int32, device=logits.device)
    if T > 0:
        block_e = triton.next_power_of_2(E)
        block_t = min(triton.next_power_of_2(T), max(1, _ELEMENTS_PER_PROGRAM // block_e))
        _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
            logits, weights, ids, T, E, logits.stride(0), scaling,
            K=k, NUM_SHARED=num_shared, BLOCK_K=triton.next_power_of_2(k + num_shared), BLOCK_T=block_t,
            BLOCK_E=block_e,
            RENORMALIZE=renormalize, LIBDEVICE=logits.is_cuda, N_GROUP=n_group, TOPK_GROUP=topk_group,
            num_warps=4, enable_fp_fusion=False, enable_reflect_ftz=False, **pdl_launch(logits.device, T),
        )
    return weights, ids


# Steps of up to this many tokens route in one launch (_route_kernel), a program a token and column split;
# more multiply by cuBLAS, then route with topk_softmax.
ROUTE_MAX_TOKENS = 64
# Steps of more tokens, up to this many, route in one launch too, in blocks of ROW_BLOCK tokens multiplied
# with tl.dot in IEEE fp32 (0: never). A 256-sequence decode step's router is four launches: a cast of x to
# fp32, cuBLAS's fp32 GEMM and its split-K reduce, and topk_softmax (with FP8 experts a fifth, x quantized
# for them): 14-17 us a MoE layer in the profile on an H200 (docs/fp8.md). Built, passes the interpreter's
# tests and builds for sm_90 without spills; off until it has run and been timed on a GPU
# (`bash scripts/gpu_check.sh router256`).
ROUTE_BLOCKS_MAX_TOKENS = 0
ROW_BLOCK = 16
# Group-limited routing (DeepSeek-V2's router) in the kernels above; False gives it to the reference
# (cuBLAS and PyTorch). On since tests/gpu passed with it on an H200 (test_route, the engine's greedy
# outputs at V2's router shape).
GROUPED_IN_KERNEL = True
# hidden columns a program of _route_kernel multiplies (V2-Lite's 2048 in 16 programs a token): one
# activation group, which the program quantizes for FP8 experts
_SPLIT_D = BLOCK
# x quantized for FP8 experts (route's x_fp8) by the router's launch, not by a launch of its own after it
# (MoE.forward asks for it when the FP8 experts run in one kernel): a launch fewer a MoE layer in decode.
# On an H200, batch-1 decode with FP8 weights 1.97 against 1.99 ms/token (twice each; docs/benchmarks.md,
# "The weights asked of L2 before the wait").
QUANTIZE_X_IN_KERNEL = True


def route(x: torch.Tensor, weight: torch.Tensor, k: int, renormalize: bool, scaling: float = 1.0,
          num_shared: int = 0, groups: tuple[int, int] | None = None, *,
          x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router (greedy, or group-limited with groups); same contract as reference.route: (logits
    [T, E] fp32 = x @ weight^T in fp32, weights, ids as topk_softmax gives them). Up to ROUTE_MAX_TOKENS
    tokens in one launch (the product in fp32 split over the hidden size, each token routed by its last
    program: a decode step's router was a cast, cuBLAS's fp32 GEMM and the top-k), and up to
    ROUTE_BLOCKS_MAX_TOKENS in blocks of ROW_BLOCK tokens; more in cuBLAS's GEMM and topk_softmax.
    x [T, D] bf16 / fp16 / fp32 with a contiguous last dim; weight [E, D] fp32 contiguous. x_fp8 (FP8
    experts): buffers e4m3 [T, D] and fp32 [T, ceil(D / 128)] that also receive x quantized for the
    experts (quantize_activation, bit for bit), by the router's own launch where it has one
    (QUANTIZE_X_IN_KERNEL)."""
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.dtype != torch.float32 \
            or not weight.is_contiguous() or x.stride(1) != 1:
        raise ValueError(f"route: expected x [T, D] with a contiguous last dim and weight [E, D] fp32 contiguous; got "
                         f"{tuple(x.shape)} {x.dtype}, {tuple(weight.shape)} {weight.dtype}")
    T, D = x.shape
    E = weight.shape[0]
    if x_fp8 is not None:
        check_quantized_out("route", *x_fp8, T, D, triton.cdiv(D, BLOCK))
    one_launch = (groups is None or GROUPED_IN_KERNEL) and 0 < T <= max(ROUTE_MAX_TOKENS, ROUTE_BLOCKS_MAX_TOKENS)
    if x_fp8 is not None and not (one_launch and QUANTIZE_X_IN_KERNEL):
        quantize_activation(x, out=x_fp8)
    if groups is not None and not GROUPED_IN_KERNEL:
        return reference.route(x, weight, k, renormalize, scaling, num_shared, groups)
    if not one_launch:
        logits = F.linear(x.float(), weight)
        return (logits, *topk_softmax(logits, k, renormalize, scaling, num_shared, groups))
    if not 1 <= k <= E <= _MAX_E:
        raise ValueError(f"route: need 1 <= k <= E <= {_MAX_E}; got k={k}, E={E}")
    n_group, topk_group = _check_groups("route", E, k, groups)
    block_t = 1 if T <= ROUTE_MAX_TOKENS else ROW_BLOCK
    blocks = triton.cdiv(T, block_t)
    arrived = arrival_counters(x.device, "route", _COUNTERS)  # programs arrived, by block of tokens
    if blocks > _COUNTERS:
        raise ValueError(f"route: {T} tokens in blocks of {block_t} need more than {_COUNTERS} arrival counters")
    block_e = triton.next_power_of_2(E) if block_t == 1 else max(16, triton.next_power_of_2(E))  # tl.dot: 16+
    splits = triton.cdiv(D, _SPLIT_D)
    partial = torch.empty(T, splits, block_e, dtype=torch.float32, device=x.device)
    logits = torch.empty(T, E, dtype=torch.float32, device=x.device)
    weights = torch.empty(T, k + num_shared, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, k + num_shared, dtype=torch.int32, device=x.device)
    quantize_x = x_fp8 is not None and QUANTIZE_X_IN_KERNEL
    xq, xs = x_fp8 if quantize_x else (x, logits)  # (unused without QUANTIZE_X)
    _route_kernel[(blocks, splits)](
        x, weight, partial, arrived, logits, weights, ids, xq, xs, T, E, D, x.stride(0), xq.stride(0), xs.stride(0),
        xs.stride(-1), scaling, SPLITS=splits, SPLIT_D=_SPLIT_D,
        BLOCK_D=min(_SPLIT_D, max(16, (8192 if block_t == 1 else 2048) // block_e)),  # tl.dot's tiles: no spills
        BLOCK_T=block_t, K=k, NUM_SHARED=num_shared, BLOCK_K=triton.next_power_of_2(k + num_shared),
        BLOCK_E=block_e, RENORMALIZE=renormalize, LIBDEVICE=x.is_cuda, N_GROUP=n_group, TOPK_GROUP=topk_group,
        QUANTIZE_X=quantize_x, FP8_MAX=FP8_MAX, EPS=EPS,
        num_warps=4, enable_fp_fusion=False, enable_reflect_ftz=False, **pdl_launch(x.device, T),
        **prefetch_launch(x.device, T),
    )
    return logits, weights, ids
