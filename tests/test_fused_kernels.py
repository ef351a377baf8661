# Run: python -m pytest -q tests/test_fused_kernels.py   (CPU; the Triton kernels run in Triton's interpreter)
"""The fused small-op kernels (rms_norm, mla_prepare, silu_and_mul, topk_softmax) against their PyTorch
references (kernels/reference.py, the model's own math).

These kernels promise torch's rounding order, so the checks count ulps (the distance between two
floats in representable steps) rather than relative error. Triton 3.6's interpreter truncates
fp32 -> bf16 where a GPU rounds to nearest even; a test-only patch (conftest.py) makes it round as the
GPU (and torch) do, so a misplaced rounding step shows up here as a many-element 1-ulp mismatch.
Tolerances (on these inputs bf16 comes out bit-identical, fp32 within 4 ulps, fp16 within 2 ulps on
0.02% of the elements):
- fp32: at most 8 ulps. The RoPE part is exact; RMSNorm sums its squares in another order than torch,
  and numpy's exp (the interpreter's) and torch's vectorised exp differ by an ulp or so (SiLU, softmax).
- bf16/fp16: at most 2 ulps, on at most 1% of the elements. Those fp32 differences flip a rounding
  only when the fp32 value sits within a few fp32 ulps of a half-way point (~2^-14 per element for
  bf16, 8x more often for fp16); a flipped intermediate (the normalised row, the silu) can become two
  ulps after the weight / up multiply. A wrong rounding order moves a large fraction instead.
"""

import importlib.util

import pytest
import torch

from deepseek_v2.kernels import reference
from deepseek_v2.kernels.fp8 import cache_views

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def tk(interpreted_kernels):
    """The Triton kernel modules, run by Triton's interpreter on CPU tensors, with its fp32 -> bf16 cast
    rounding to nearest as a GPU does (conftest.py)."""
    return interpreted_kernels


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of the dtype lie between a and b (0: bit-identical; +0 == -0)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    int_type = {2: torch.int16, 4: torch.int32}[a.element_size()]
    bits = [t.contiguous().view(int_type).long() for t in (a, b)]
    lowest = torch.iinfo(int_type).min
    ordered = [torch.where(x < 0, lowest - x, x) for x in bits]  # monotone in the float value
    return (ordered[0] - ordered[1]).abs()


def assert_ulps(out: torch.Tensor, ref: torch.Tensor, what: str = ""):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (what, out.shape, ref.shape, out.dtype, ref.dtype)
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    d = ulp_distance(out, ref)
    if out.dtype == torch.float32:
        assert d.max() <= 8, f"{what}: {d.max().item()} fp32 ulps"
    else:
        assert d.max() <= 2, f"{what}: {d.max().item()} ulps"
        assert (d > 0).sum() <= max(1, out.numel() // 100), f"{what}: {(d > 0).sum().item()} of {out.numel()} off"


def rows(T, width, dtype, pad=0, scale=1.0):
    """[T, width] random values whose rows are strided when pad > 0 (a slice of a wider tensor)."""
    return (torch.randn(T, width + pad) * scale).to(dtype)[:, :width]


# ---------------------------------------------------------------- rms_norm

@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("T", [0, 1, 3, 37])
def test_rms_norm_matches_ref(tk, T, dtype):
    torch.manual_seed(T)
    for D, pad in [(64, 0), (200, 8), (2048, 0)]:  # power of two, ragged with strided rows, real size
        x = rows(T, D, dtype, pad, scale=3.0)
        weight = (1 + 0.1 * torch.randn(D)).to(dtype)
        y = tk.norm.rms_norm(x, weight, 1e-6)
        assert_ulps(y, reference.rms_norm(x, weight, 1e-6), f"y D={D}")
        residual = rows(T, D, dtype, pad=3 * pad)
        y, s = tk.norm.rms_norm(x, weight, 1e-6, residual=residual)
        y_ref, s_ref = reference.rms_norm(x, weight, 1e-6, residual=residual)
        assert torch.equal(s, s_ref), "x + residual rounds once, as torch does"
        assert_ulps(y, y_ref, f"y with residual D={D}")


@pytest.mark.parametrize("T", [1, 37])
def test_rms_norm_quantizes_its_output_for_fp8(tk, T):
    """x_fp8: the norm's output also quantized in its launch, bit for bit quantize_activation of the
    output it returns (a ragged last group, D under one group, M-major scales in a buffer of more rows:
    those rows untouched); the reference's the same; a buffer of the wrong shape refused."""
    from deepseek_v2.kernels import fp8
    torch.manual_seed(T)
    for D, pad in [(2048, 0), (200, 8), (64, 0)]:
        x, residual = rows(T, D, torch.bfloat16, pad, scale=3.0), rows(T, D, torch.bfloat16)
        weight = (1 + 0.1 * torch.randn(D)).to(torch.bfloat16)
        for kernels in (tk.norm, reference):
            q, scales = fp8.quantized_buffers(T, D, x.device, pad_rows=128)
            q.view(torch.uint8).fill_(0x7F)
            scales.fill_(-1.0)
            y, _ = kernels.rms_norm(x, weight, 1e-6, residual=residual, x_fp8=(q, scales))
            want_q, want_s = fp8.quantize_activation(y)
            assert torch.equal(q[:T].view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scales[:T], want_s)
            assert (q[T:].view(torch.uint8) == 0x7F).all() and (scales[T:] == -1).all()
            assert torch.equal(y, kernels.rms_norm(x, weight, 1e-6, residual=residual)[0])
    with pytest.raises(ValueError, match="rms_norm"):
        tk.norm.rms_norm(x, weight, 1e-6, x_fp8=(q[:, 1:], scales))
    with pytest.raises(ValueError, match="rms_norm"):
        tk.norm.rms_norm(x, weight, 1e-6, x_fp8=(q[:T - 1], scales[:T - 1]))


def test_rms_norm_rejects_bad_inputs(tk):
    x, w = torch.randn(3, 16), torch.randn(16)
    bad = [
        dict(weight=w.bfloat16()),                         # dtype mismatch
        dict(weight=torch.randn(8)),                       # wrong D
        dict(x=torch.randn(3, 16).t().contiguous().t()),   # strided last dim
        dict(x=torch.randn(3, 16).int()),
        dict(x=torch.randn(2, 9000), weight=torch.randn(9000)),  # D > 8192
        dict(residual=torch.randn(3, 16).bfloat16()),
        dict(residual=torch.randn(2, 16)),
    ]
    for change in bad:
        args = dict(x=x, weight=w, eps=1e-6)
        args.update(change)
        with pytest.raises(ValueError, match="rms_norm"):
            tk.norm.rms_norm(**args)


# ---------------------------------------------------------------- mla_prepare

def mla_inputs(T, H, R, P, dn, dtype, cache_dtype=None, block_size=16, seed=0):
    """The query as the model holds it ([T, H*(dn+P)], q_pe a strided slice of it), kv with strided
    rows, real cos/sin, and a cache with scattered slots (or None)."""
    torch.manual_seed(seed)
    q = torch.randn(T, H * (dn + P)).to(dtype)
    kv = rows(T, R + P, dtype, pad=5, scale=2.0)
    angles = torch.randint(0, 4096, (T, 1)).float() * 10000.0 ** (-torch.arange(0, P, 2).float() / P)
    weight = (1 + 0.1 * torch.randn(R)).to(dtype)
    cache = slots = None
    if cache_dtype is not None:
        num_blocks = T // block_size + 3
        cache = torch.randn(num_blocks, block_size, R + P).to(cache_dtype)
        slots = torch.randperm(num_blocks * block_size)[:T]
    return q, kv, torch.cos(angles), torch.sin(angles), weight, cache, slots


def q_pe_view(q, H, dn, P):
    return q.unflatten(-1, (H, dn + P)).split([dn, P], -1)[1]  # [T, H, P], as model.MLA.forward takes it


MLA_CASES = [  # (H, R, P, dn, cache dtype, slot dtype)
    (2, 32, 16, 24, None, None),
    (20, 32, 16, 8, "same", torch.int64),      # a ragged head block (20 = 16 + 4... of 32)
    (3, 40, 8, 16, "same", torch.int32),       # R not a power of two
    (16, 512, 64, 128, "same", torch.int64),   # V2-Lite's real sizes
    (40, 32, 16, 16, torch.float32, torch.int64),  # two head programs; the cache in another dtype
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 3, 37])
@pytest.mark.parametrize("case", range(len(MLA_CASES)))
def test_mla_prepare_matches_ref(tk, case, T, dtype):
    H, R, P, dn, cache_dtype, slot_dtype = MLA_CASES[case]
    cache_dtype = dtype if cache_dtype == "same" else cache_dtype
    q, kv, cos, sin, weight, cache, slots = mla_inputs(T, H, R, P, dn, dtype, cache_dtype, seed=case * 100 + T)
    if slots is not None:
        slots = slots.to(slot_dtype)
    q_ref, cache_ref = q.clone(), cache.clone() if cache is not None else None

    q_pe = q_pe_view(q, H, dn, P)
    q_pe_out, c_kv, k_pe = tk.mla_prepare.mla_prepare(q_pe, kv, cos, sin, weight, 1e-6, cache, slots)
    q_pe_ref, c_ref, k_pe_ref = reference.mla_prepare(q_pe_view(q_ref, H, dn, P), kv, cos, sin, weight, 1e-6,
                                                      cache_ref, slots)
    assert c_kv.is_contiguous() and k_pe.is_contiguous()
    assert_ulps(c_kv, c_ref, "c_kv")
    assert torch.equal(k_pe, k_pe_ref), "RoPE does torch's fp32 ops in torch's order: bit-identical"
    assert q_pe_out is q_pe and torch.equal(q_pe_out, q_pe_ref), "q_pe rotated in place, bit-identical"
    q_nope, q_nope_before = (t.unflatten(-1, (H, dn + P))[..., :dn] for t in (q, q_ref))
    assert torch.equal(q_nope, q_nope_before), "q_nope untouched"
    if cache is not None:
        assert_ulps(cache, cache_ref, "cache")  # every other slot must be left as it was
        assert torch.equal(cache.view(-1, R + P)[slots.long(), R:], k_pe_ref.to(cache.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [1, 3])
def test_mla_prepare_writes_the_fp8_cache(tk, case, dtype):
    """An FP8 cache gets each row in e4m3 scaled by its max / 448 and the fp32 scale after its block's
    values, the reference's bytes: bit-identical in bf16; in fp32, where the normed latent may differ by an ulp or
    two, a scale may move by an ulp and a value by one e4m3 step on a rare tie."""
    H, R, P, dn, _, slot_dtype = MLA_CASES[case]
    q, kv, cos, sin, weight, cache, slots = mla_inputs(37, H, R, P, dn, dtype, torch.float32, seed=case)
    cache = torch.randint(0, 255, (*cache.shape[:2], R + P + 4), dtype=torch.uint8)  # junk in untouched slots
    cache_ref, q_ref = cache.clone(), q.clone()
    tk.mla_prepare.mla_prepare(q_pe_view(q, H, dn, P), kv, cos, sin, weight, 1e-6, cache, slots.to(slot_dtype))
    reference.mla_prepare(q_pe_view(q_ref, H, dn, P), kv, cos, sin, weight, 1e-6, cache_ref, slots)
    if dtype == torch.bfloat16:
        assert torch.equal(cache, cache_ref)
        return
    (values, scale), (values_ref, scale_ref) = cache_views(cache), cache_views(cache_ref)
    written = torch.zeros(values.shape[:2], dtype=torch.bool)
    written.view(-1)[slots] = True
    assert torch.equal(values[~written], values_ref[~written])
    assert torch.equal(scale[~written].view(torch.int32), scale_ref[~written].view(torch.int32))  # junk: bitwise
    assert (values != values_ref).sum() <= 2
    torch.testing.assert_close(scale[written], scale_ref[written], rtol=2**-21, atol=0)


def test_mla_prepare_skips_negative_slots(tk):
    q, kv, cos, sin, weight, cache, slots = mla_inputs(4, 2, 32, 16, 8, torch.float32, torch.float32)
    before = cache.clone()
    slots[1] = -1
    tk.mla_prepare.mla_prepare(q_pe_view(q, 2, 8, 16), kv, cos, sin, weight, 1e-6, cache, slots)
    flat, old = cache.view(-1, 48), before.view(-1, 48)
    changed = (flat != old).any(-1).nonzero().flatten()
    assert sorted(changed.tolist()) == sorted(slots[[0, 2, 3]].tolist())


def test_mla_prepare_rejects_bad_inputs(tk):
    q, kv, cos, sin, weight, cache, slots = mla_inputs(3, 2, 32, 16, 8, torch.float32, torch.float32)
    q_pe = q_pe_view(q, 2, 8, 16)
    bad = [
        dict(kv=kv.bfloat16()),                            # dtype mismatch
        dict(kv=kv[:, :40]),                               # R + P disagrees with the weight
        dict(cos=cos.double()),                            # cos/sin must be fp32
        dict(sin=sin[:2]),                                 # wrong T
        dict(q_pe=torch.randn(3, 2, 16).transpose(1, 2).contiguous().transpose(1, 2)),  # strided last dim
        dict(kv_cache=None),                               # slot_mapping without a cache
        dict(slot_mapping=slots.float()),
        dict(kv_cache=cache[..., :40]),                    # cache width != R + P
    ]
    for change in bad:
        args = dict(q_pe=q_pe, kv=kv, cos=cos, sin=sin, norm_weight=weight, eps=1e-6, kv_cache=cache,
                    slot_mapping=slots)
        args.update(change)
        with pytest.raises(ValueError, match="mla_prepare"):
            tk.mla_prepare.mla_prepare(**args)


# ---------------------------------------------------------------- silu_and_mul

@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("T", [0, 1, 3, 37])
def test_silu_and_mul_matches_ref(tk, T, dtype):
    torch.manual_seed(T)
    for I, pad in [(16, 0), (100, 6), (1408, 0)]:  # 1408 (V2-Lite's expert size): two column blocks
        x = rows(T, 2 * I, dtype, pad, scale=4.0)
        assert_ulps(tk.activation.silu_and_mul(x), reference.silu_and_mul(x), f"I={I}")


@pytest.mark.parametrize("T", [1, 9])
def test_silu_and_mul_quantizes_its_output_for_fp8(tk, T):
    """x_fp8: the product also quantized in its launch, bit for bit quantize_activation of the output it
    returns at the buffer's width (I, or a multiple of 128 past it whose columns are zeros: an FP8 weight
    widened with zero columns), into a buffer of more rows with M-major scales (those rows untouched);
    the reference's the same; a buffer of a width other than those refused."""
    from deepseek_v2.kernels import fp8
    torch.manual_seed(T)
    for I, width in [(1408, 1408), (1408, 1536), (100, 256), (100, 100)]:
        x = rows(T, 2 * I, torch.bfloat16, scale=4.0)
        for kernels in (tk.activation, reference):
            q, scales = fp8.quantized_buffers(T, width, x.device, pad_rows=128)
            q.view(torch.uint8).fill_(0x7F)
            scales.fill_(-1.0)
            y = kernels.silu_and_mul(x, x_fp8=(q, scales))
            assert torch.equal(y, kernels.silu_and_mul(x))
            want_q, want_s = fp8.quantize_activation(torch.nn.functional.pad(y, (0, width - I)))
            assert torch.equal(q[:T].view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scales[:T], want_s)
            assert (q[T:].view(torch.uint8) == 0x7F).all() and (scales[T:] == -1).all()
    q, scales = fp8.quantized_buffers(T, 1500, x.device)
    with pytest.raises(ValueError, match="silu_and_mul"):
        tk.activation.silu_and_mul(rows(T, 2 * 1408, torch.bfloat16), x_fp8=(q, scales))


def test_leading_dims_are_flattened(tk):
    """The wrappers take [..., D] as the model holds activations ([B, S, D] outside the engine)."""
    x, residual, weight = torch.randn(2, 5, 32), torch.randn(2, 5, 32), 1 + 0.1 * torch.randn(32)
    y, s = tk.norm.rms_norm(x, weight, 1e-6, residual=residual)
    y_ref, s_ref = reference.rms_norm(x, weight, 1e-6, residual=residual)
    assert y.shape == (2, 5, 32) and torch.equal(s, s_ref)
    assert_ulps(y, y_ref, "rms_norm [B, S, D]")
    gate_up = torch.randn(2, 5, 48)
    assert_ulps(tk.activation.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), "silu_and_mul [B, S, 2I]")


def test_silu_and_mul_rejects_bad_inputs(tk):
    for x in [torch.randn(3, 15), torch.randn(3, 16).int(), torch.randn(16, 3).t()]:
        with pytest.raises(ValueError, match="silu_and_mul"):
            tk.activation.silu_and_mul(x)


# ---------------------------------------------------------------- topk_softmax

def assert_same_routing(weights, ids, ref_weights, ref_ids, logits, k, require_decided=True):
    """Same expert sets where torch's k-th and (k+1)-th scores differ (every row with require_decided
    False: group-limited routing, whose k-th and (k+1)-th of all scores say nothing); the weights of equal
    sets, matched by expert id, within 8 fp32 ulps."""
    assert weights.shape == ref_weights.shape and ids.dtype == torch.int32 and weights.dtype == torch.float32
    scores = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True).values
    decided = scores[:, k - 1] > scores[:, k] if k < logits.shape[1] else torch.ones(len(logits), dtype=torch.bool)
    decided |= not require_decided
    for t in range(len(logits)):
        if not decided[t]:
            continue
        assert sorted(ids[t].tolist()) == sorted(ref_ids[t].tolist()), t
        order, ref_order = ids[t].argsort(), ref_ids[t].argsort()
        assert ulp_distance(weights[t, order], ref_weights[t, ref_order]).max() <= 8, t
    assert (weights[:, :-1] >= weights[:, 1:]).all(), "picks in descending score order"


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T", [0, 1, 3, 37])
def test_topk_softmax_matches_ref(tk, T, renormalize):
    torch.manual_seed(T + renormalize)
    for E, k in [(8, 2), (64, 6), (160, 6), (64, 2)]:
        logits = rows(T, E, torch.float32, pad=E % 3, scale=2.0)
        weights, ids = tk.router.topk_softmax(logits, k, renormalize, 16.0)
        assert_same_routing(weights, ids, *reference.topk_softmax(logits, k, renormalize, 16.0), logits, k)


@pytest.mark.parametrize("grouped", [False, True])
def test_topk_softmax_appends_the_shared_experts(tk, grouped):
    """num_shared: every token's routed picks (the same as without it), then the shared experts E, E + 1,
    ... at weight 1, as the MoE's stack holds them after the routed experts."""
    torch.manual_seed(3)
    logits = rows(37, 64, torch.float32, pad=1, scale=2.0)
    groups = (8, 3) if grouped else None
    weights, ids = tk.router.topk_softmax(logits, 6, True, 1.0, num_shared=2, groups=groups)
    plain_w, plain_ids = tk.router.topk_softmax(logits, 6, True, 1.0, groups=groups)
    assert weights.shape == ids.shape == (37, 8) and ids.dtype == torch.int32
    assert torch.equal(ids[:, :6], plain_ids) and torch.equal(weights[:, :6], plain_w)
    assert (ids[:, 6:] == torch.tensor([64, 65], dtype=torch.int32)).all() and (weights[:, 6:] == 1).all()
    ref_w, ref_ids = reference.topk_softmax(logits, 6, True, 1.0, num_shared=2)
    assert torch.equal(ref_ids[:, 6:], ids[:, 6:]) and torch.equal(ref_w[:, 6:], weights[:, 6:])


@pytest.mark.parametrize("T", [1, 5, 37])
def test_group_limited_topk_softmax_matches_ref(tk, T, monkeypatch):
    """Group-limited routing (V2's: 160 experts in 8 groups, the best 3 kept, 6 picks; and 64 in 4, 2
    kept): the same experts as reference.grouped_topk_softmax, weights within 8 fp32 ulps, in the
    kernel alone and in route's one launch."""
    torch.manual_seed(40 + T)
    monkeypatch.setattr(tk.router, "GROUPED_IN_KERNEL", True)  # route's kernel, not its fallback
    for E, n_group, topk_group, k in [(160, 8, 3, 6), (64, 4, 2, 6)]:
        logits = rows(T, E, torch.float32, scale=2.0)
        want_w, want_ids = reference.grouped_topk_softmax(logits, k, n_group, topk_group, False, 16.0)
        weights, ids = tk.router.topk_softmax(logits, k, False, 16.0, groups=(n_group, topk_group))
        assert_same_routing(weights, ids, want_w, want_ids, logits, k, require_decided=False)
        # the picks lie in the kept groups only: not the greedy top k (else the test would not tell)
        greedy_ids = reference.topk_softmax(logits, k, False, 16.0)[1]
        if T == 37:
            assert not torch.equal(ids.sort(dim=1).values, greedy_ids.sort(dim=1).values)
        x, weight = rows(T, 256, torch.bfloat16), torch.randn(E, 256) * 0.05
        logits, weights, ids = tk.router.route(x, weight, k, True, 1.0, groups=(n_group, topk_group))
        want_w, want_ids = reference.grouped_topk_softmax(logits, k, n_group, topk_group, True, 1.0)
        assert_same_routing(weights, ids, want_w, want_ids, logits, k, require_decided=False)
    with pytest.raises(ValueError, match="n_group"):
        tk.router.topk_softmax(torch.randn(3, 160), 6, True, groups=(7, 3))  # 160 is not 7 whole groups


@pytest.mark.parametrize("T", [1, 5, 64, 65, 513])
def test_route_multiplies_in_fp32_and_routes(tk, T, monkeypatch):
    """route: the fp32 logits of bf16 x (up to 64 tokens in one launch whose last program per token
    routes it; with ROUTE_BLOCKS_MAX_TOKENS up to 512 in blocks of 16 tokens, a ragged last block; more
    through a GEMM and topk_softmax) within fp32 rounding of the reference's, and the routing topk_softmax
    gives for them, shared experts' picks included; the arrival counts are zero after."""
    monkeypatch.setattr(tk.router, "ROUTE_BLOCKS_MAX_TOKENS", 512)
    torch.manual_seed(T)
    for E, D, k in [(64, 2048, 6), (20, 320, 3)]:  # 320: the last program's columns partly past D
        x = rows(T, D, torch.bfloat16, pad=3)
        weight = torch.randn(E, D) * 0.02
        logits, weights, ids = tk.router.route(x, weight, k, True, 1.0, num_shared=2)
        ref_logits, *_ = reference.route(x, weight, k, True, 1.0, num_shared=2)
        assert logits.dtype == torch.float32 and logits.shape == (T, E)
        assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
        want_w, want_ids = reference.topk_softmax(logits, k, True, 1.0, num_shared=2)
        assert torch.equal(ids, want_ids) and torch.allclose(weights, want_w, rtol=1e-6, atol=0)
    assert not tk.launch.arrival_counters(x.device, "route", tk.router._COUNTERS).any()


@pytest.mark.parametrize("in_kernel", [False, True])
@pytest.mark.parametrize("T", [1, 5, 65, 513])
def test_route_quantizes_x_for_fp8_experts(tk, T, in_kernel, monkeypatch):
    """route's x_fp8: x quantized as fp8.quantize_activation does it, bit for bit (a ragged last group
    too), by the router's own launch (QUANTIZE_X_IN_KERNEL: a token a program, or with
    ROUTE_BLOCKS_MAX_TOKENS blocks of tokens from 65) or a quantize launch beside it (513 tokens, or with
    the setting off); the routing the same as without x_fp8, and a buffer of the wrong shape refused."""
    from deepseek_v2.kernels import fp8
    monkeypatch.setattr(tk.router, "QUANTIZE_X_IN_KERNEL", in_kernel)
    monkeypatch.setattr(tk.router, "ROUTE_BLOCKS_MAX_TOKENS", 512)
    torch.manual_seed(T)
    for E, D, k in [(64, 2048, 6), (20, 320, 3)]:  # 320: the last group 64 wide
        x = rows(T, D, torch.bfloat16, pad=3)
        weight = torch.randn(E, D) * 0.02
        x_fp8 = (torch.empty(T, D, dtype=fp8.FP8), torch.full((T, fp8.cdiv(D, fp8.BLOCK)), float("nan")))
        routed = tk.router.route(x, weight, k, True, 1.0, num_shared=2, x_fp8=x_fp8)
        for got, want in zip(routed, tk.router.route(x, weight, k, True, 1.0, num_shared=2)):
            assert torch.equal(got, want)
        q, scales = fp8.quantize_activation(x)
        assert torch.equal(x_fp8[0].view(torch.uint8), q.view(torch.uint8)) and torch.equal(x_fp8[1], scales)
        ref_fp8 = tuple(torch.empty_like(t) for t in x_fp8)
        reference.route(x, weight, k, True, 1.0, num_shared=2, x_fp8=ref_fp8)
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(ref_fp8[:1], x_fp8[:1]))
    with pytest.raises(ValueError, match="route: out must be"):
        tk.router.route(x, weight, k, True, x_fp8=(x_fp8[0][:, 1:], x_fp8[1]))


def test_route_rejects_bad_inputs(tk):
    x, w = torch.randn(3, 32), torch.randn(8, 32)
    for args in [(x, w.bfloat16()), (x, w[:, :16]), (x.t(), w), (x, w.t().contiguous().t()[:, :32])]:
        with pytest.raises(ValueError, match="route"):
            tk.router.route(*args, 2, renormalize=True)


def test_topk_softmax_ties_and_infinities(tk):
    """Equal logits: the lowest expert index first; -inf logits (a masked expert) are never preferred."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, -1.0],
                           [float("-inf"), 0.0, 0.0, float("-inf"), 2.0, 0.0]])
    weights, ids = tk.router.topk_softmax(logits, 3, renormalize=False)
    assert ids.tolist() == [[1, 2, 4], [4, 1, 2]]
    torch.testing.assert_close(weights, torch.softmax(logits, -1).gather(1, ids.long()), rtol=1e-6, atol=0)
    weights, ids = tk.router.topk_softmax(logits[:1], 2, renormalize=True)
    assert ids.tolist() == [[1, 2]] and weights.tolist() == [[0.5, 0.5]]


def test_topk_softmax_rejects_bad_inputs(tk):
    logits = torch.randn(3, 8)
    for args in [(logits.bfloat16(), 2), (logits, 9), (logits, 0), (torch.randn(8, 3).t(), 2),
                 (torch.randn(3, 2000), 2)]:
        with pytest.raises(ValueError, match="topk_softmax"):
            tk.router.topk_softmax(*args, renormalize=True)


# ---------------------------------------------------------------- an sm_90 (H100/H200) build, no GPU needed

@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="needs triton with its NVIDIA backend")
def test_fused_kernels_build_for_sm90():
    """Every variant the wrappers launch at the V2 / V2-Lite shapes compiles for sm_90 (bundled ptxas, no
    GPU), spills no registers, divides with IEEE division (div.rn, not div.full) and, where no libdevice
    function is called, has no fused multiply-add: the properties the bit-exactness rests on."""
    from sm90_build import run_in_subprocess
    results = run_in_subprocess("fused")
    assert {r["kernel"] for r in results} == {"_rms_norm_kernel", "_mla_prepare_kernel", "_silu_and_mul_kernel",
                                              "_topk_softmax_kernel", "_route_kernel", "_absorb_query_kernel"}
    assert {r["config"].get("FP8_CACHE") for r in results if r["kernel"] == "_mla_prepare_kernel"} == {"True", "False"}
    assert {r["kernel"] for r in results if r["config"].get("PREFETCH") == "True"} == {"_route_kernel",
                                                                                      "_absorb_query_kernel"}
    # programmatic dependent launch at few rows: every kernel but the one built here for many tokens only
    assert {r["kernel"] for r in results if r["launch_pdl"]} == {r["kernel"] for r in results} - {"_topk_softmax_kernel"}
    for r in results:
        assert r["shared"] <= 227 * 1024 and r["spill_bytes"] in (0, None), r
        assert not r["approx_div"], r
        # programmatic dependent launch (few rows): launched so, and waiting for the kernel before it first
        pdl = r["config"].get("PDL") == "True"
        assert r["launch_pdl"] == pdl and r["waits_for_prior_kernels"] == pdl, r
        # launch.PREFETCH_WEIGHTS: the weights asked of L2 ahead of that wait, no load or store before it
        assert r["prefetches_before_waiting"] == (r["config"].get("PREFETCH") == "True"), r
        if r["kernel"] in ("_rms_norm_kernel", "_mla_prepare_kernel"):
            assert not r["fma"] and r["vector_loads"], r
