# Run on a CUDA machine: pytest -q tests/gpu/test_fused_kernels_gpu.py  (skipped without a GPU; ~1 min on an H200)
"""The fused small-op kernels against their eager references at DeepSeek-V2 / V2-Lite shapes in bf16, and
under CUDA-graph capture and replay.

The kernels round as torch does, op by op (fp32 math, same casts, IEEE divides, CUDA's expf, no fused
multiply-adds), so the checks count ulps. What can still differ: the ORDER of fp32 sums (RMSNorm's
sum of squares, the softmax denominator). That moves an fp32 result by an ulp or so, which flips a bf16
rounding only near a half-way point (~1e-5 of the elements); a flipped normalised value can become two
ulps after the weight multiply. So: RoPE (q_pe, k_pe) bit-identical; SiLU-and-mul at most 1 ulp;
RMSNorm outputs (y, c_kv, the cache) at most 2 ulps, on at most 0.1% of the elements; router weights
within 8 fp32 ulps and the expert sets equal wherever torch's k-th and (k+1)-th scores differ.

Freed device memory is filled with NaN before each run, so an output a kernel forgets to write shows.
"""

import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA GPU and compiled (not interpreted) Triton", allow_module_level=True)
pytest.importorskip("triton")

from deepseek_v2.kernels.activation import silu_and_mul  # noqa: E402
from deepseek_v2.kernels.fp8_linear import quantize_activation  # noqa: E402
from deepseek_v2.kernels.mla_prepare import mla_prepare  # noqa: E402
from deepseek_v2.kernels.norm import rms_norm  # noqa: E402
from deepseek_v2.kernels import reference  # noqa: E402
from deepseek_v2.kernels import router  # noqa: E402
from deepseek_v2.kernels.router import route, topk_softmax  # noqa: E402

from gpu_memory import poison_free_memory  # noqa: E402

DEVICE = "cuda"
BF16 = torch.bfloat16
R, P, DN, BLOCK_SIZE = 512, 64, 128, 64
TOKENS = [1, 7, 256, 16384]


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of the dtype lie between a and b (0: bit-identical; +0 == -0)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    int_type = {2: torch.int16, 4: torch.int32}[a.element_size()]
    bits = [t.contiguous().view(int_type).long() for t in (a, b)]
    lowest = torch.iinfo(int_type).min
    ordered = [torch.where(x < 0, lowest - x, x) for x in bits]
    return (ordered[0] - ordered[1]).abs()


def assert_ulps(out, ref, max_ulps, max_fraction=1e-3, what=""):
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    assert not torch.isnan(out).any(), f"{what}: NaN (an unwritten output?)"
    d = ulp_distance(out, ref)
    worst, off = d.max().item(), (d > 0).sum().item()
    assert worst <= max_ulps, f"{what}: {worst} ulps ({off} of {d.numel()} elements differ)"
    assert off <= max(1, max_fraction * d.numel()), f"{what}: {off} of {d.numel()} elements differ"


def generator(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


# ---------------------------------------------------------------- rms_norm

@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("D", [2048, 5120])
def test_rms_norm(D, T):
    g = generator(D + T)
    x = torch.randn(T, D, device=DEVICE, generator=g).mul_(3).to(BF16)
    residual = torch.randn(T, D, device=DEVICE, generator=g).to(BF16)
    weight = torch.randn(D, device=DEVICE, generator=g).mul_(0.1).add_(1).to(BF16)
    poison_free_memory()
    assert_ulps(rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), 2, what="y")
    y, s = rms_norm(x, weight, 1e-6, residual=residual)
    y_ref, s_ref = reference.rms_norm(x, weight, 1e-6, residual=residual)
    assert torch.equal(s, s_ref), "x + residual: one bf16 rounding, as torch"
    assert_ulps(y, y_ref, 2, what="y with residual")


@pytest.mark.parametrize("T", [7, 256, 300])
@pytest.mark.parametrize("D", [2048, 5120])
def test_rms_norm_quantizes_for_fp8(D, T):
    """x_fp8 (fp8.QUANTIZE_ONCE_FROM): the norm's output quantized in the same launch, bit for bit what
    the quantize launch gives for the output it returns, into torch._scaled_mm's layout (rows padded to
    128, M-major scales; the padding rows untouched)."""
    from deepseek_v2.kernels.fp8 import quantized_buffers
    g = generator(D + T + 1)
    x = torch.randn(T, D, device=DEVICE, generator=g).mul_(3).to(BF16)
    residual = torch.randn(T, D, device=DEVICE, generator=g).to(BF16)
    weight = torch.randn(D, device=DEVICE, generator=g).mul_(0.1).add_(1).to(BF16)
    q, scales = quantized_buffers(T, D, x.device, pad_rows=128)
    q.view(torch.uint8).fill_(0x7F)
    scales.fill_(-1.0)
    y, s = rms_norm(x, weight, 1e-6, residual=residual, x_fp8=(q, scales))
    want_q, want_s = quantize_activation(y)
    assert torch.equal(q[:T].view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scales[:T], want_s)
    assert (q[T:].view(torch.uint8) == 0x7F).all() and (scales[T:] == -1).all()
    assert torch.equal(y, rms_norm(x, weight, 1e-6, residual=residual)[0]) and s is not None


# ---------------------------------------------------------------- mla_prepare

def mla_inputs(T, H, seed):
    """The query as the model holds it (q_pe a strided slice), cos/sin of real positions, a paged
    cache with scattered slots."""
    g = generator(seed)
    q = torch.randn(T, H * (DN + P), device=DEVICE, generator=g).to(BF16)
    kv = torch.randn(T, R + P, device=DEVICE, generator=g).mul_(2).to(BF16)
    positions = torch.randint(0, 32768, (T, 1), device=DEVICE, generator=g).float()
    angles = positions * 10000.0 ** (-torch.arange(0, P, 2, device=DEVICE).float() / P)
    weight = torch.randn(R, device=DEVICE, generator=g).mul_(0.1).add_(1).to(BF16)
    num_blocks = T // BLOCK_SIZE + 8
    cache = torch.randn(num_blocks, BLOCK_SIZE, R + P, device=DEVICE, generator=g).to(BF16)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=DEVICE, generator=g)[:T]
    return q, kv, torch.cos(angles), torch.sin(angles), weight, cache, slots


def q_pe_view(q, H):
    return q.unflatten(-1, (H, DN + P)).split([DN, P], -1)[1]


def q_nope_view(q, H):
    return q.unflatten(-1, (H, DN + P)).split([DN, P], -1)[0]


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("H", [16, 128])
def test_mla_prepare(H, T):
    q, kv, cos, sin, weight, cache, slots = mla_inputs(T, H, seed=H * 100000 + T)
    q_ref, cache_ref = q.clone(), cache.clone()
    poison_free_memory()
    q_pe, c_kv, k_pe = mla_prepare(q_pe_view(q, H), kv, cos, sin, weight, 1e-6, cache, slots)
    q_pe_ref, c_ref, k_pe_ref = reference.mla_prepare(q_pe_view(q_ref, H), kv, cos, sin, weight, 1e-6,
                                                      cache_ref, slots)
    assert torch.equal(k_pe, k_pe_ref) and torch.equal(q_pe, q_pe_ref), "RoPE: bit-identical"
    assert torch.equal(q_nope_view(q, H), q_nope_view(q_ref, H)), "q_nope untouched"
    assert_ulps(c_kv, c_ref, 2, what="c_kv")
    assert_ulps(cache, cache_ref, 2, what="cache")


# ---------------------------------------------------------------- silu_and_mul

@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("I", [1408, 2816, 10944])  # an expert, V2-Lite's shared experts, its dense MLP
def test_silu_and_mul(I, T):
    x = torch.randn(T, 2 * I, device=DEVICE, generator=generator(I + T)).mul_(4).to(BF16)
    poison_free_memory()
    assert_ulps(silu_and_mul(x), reference.silu_and_mul(x), 1)


@pytest.mark.parametrize("T", [7, 256, 300])
@pytest.mark.parametrize("I, width", [(2816, 3072), (1408, 1408)])  # V2-Lite's shared experts (zero columns)
def test_silu_and_mul_quantizes_for_fp8(I, width, T):
    """x_fp8 (fp8.QUANTIZE_ONCE_FROM): the product quantized in the same launch at the down projection's
    width (zeros past I), bit for bit what the quantize launch gives, into torch._scaled_mm's layout (the
    padding rows untouched)."""
    from deepseek_v2.kernels.fp8 import quantized_buffers
    x = torch.randn(T, 2 * I, device=DEVICE, generator=generator(I + T + 1)).mul_(4).to(BF16)
    q, scales = quantized_buffers(T, width, x.device, pad_rows=128)
    q.view(torch.uint8).fill_(0x7F)
    scales.fill_(-1.0)
    y = silu_and_mul(x, x_fp8=(q, scales))
    assert torch.equal(y, silu_and_mul(x))
    want_q, want_s = quantize_activation(y, width=width)
    assert torch.equal(q[:T].view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scales[:T], want_s)
    assert (q[T:].view(torch.uint8) == 0x7F).all() and (scales[T:] == -1).all()


# ---------------------------------------------------------------- topk_softmax

def assert_same_routing(weights, ids, logits, k, renormalize, scaling):
    ref_weights, ref_ids = reference.topk_softmax(logits, k, renormalize, scaling)
    assert ids.dtype == torch.int32 and weights.shape == ref_weights.shape
    scores = torch.softmax(logits, -1).topk(k + 1, dim=-1).values
    decided = scores[:, k - 1] > scores[:, k]                      # torch's set is unambiguous
    assert decided.float().mean() > 0.99
    ids_sorted, order = ids.sort(dim=-1)
    ref_sorted, ref_order = ref_ids.sort(dim=-1)
    assert torch.equal(ids_sorted[decided], ref_sorted[decided])
    w, w_ref = weights.gather(1, order)[decided], ref_weights.gather(1, ref_order)[decided]
    assert ulp_distance(w, w_ref).max() <= 8
    assert (weights[:, :-1] >= weights[:, 1:]).all(), "picks in descending score order"


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("E,renormalize,scaling", [(64, False, 1.0), (160, False, 16.0), (64, True, 1.0)])
def test_topk_softmax(E, renormalize, scaling, T):
    logits = torch.randn(T, E, device=DEVICE, generator=generator(E + T)).mul_(2)
    poison_free_memory()
    weights, ids = topk_softmax(logits, 6, renormalize, scaling)
    assert_same_routing(weights, ids, logits, 6, renormalize, scaling)


@pytest.mark.parametrize("T", TOKENS)
def test_topk_softmax_with_the_shared_experts(T):
    logits = torch.randn(T, 64, device=DEVICE, generator=generator(T)).mul_(2)
    weights, ids = topk_softmax(logits, 6, False, 1.0, num_shared=2)
    assert_same_routing(weights[:, :6], ids[:, :6], logits, 6, False, 1.0)
    assert (ids[:, 6:] == torch.tensor([64, 65], dtype=torch.int32, device=DEVICE)).all()
    assert (weights[:, 6:] == 1).all()


@pytest.mark.parametrize("T", [1, 7, 256])
def test_group_limited_topk_softmax(T):
    """V2's routing (160 experts, the best 3 of 8 groups kept, 6 picks) against the reference."""
    logits = torch.randn(T, 160, device=DEVICE, generator=generator(T)).mul_(2)
    weights, ids = topk_softmax(logits, 6, False, 16.0, groups=(8, 3))
    want_w, want_ids = reference.grouped_topk_softmax(logits, 6, 8, 3, False, 16.0)
    ids_sorted, order = ids.sort(dim=-1)
    want_sorted, want_order = want_ids.sort(dim=-1)
    assert torch.equal(ids_sorted, want_sorted)
    assert ulp_distance(weights.gather(1, order), want_w.gather(1, want_order)).max() <= 16


@pytest.mark.parametrize("T", [1, 7, 64, 65, 256, 513])
@pytest.mark.parametrize("E,D", [(64, 2048), (160, 5120)])
def test_route(E, D, T, monkeypatch):
    """The router in one launch (up to 64 tokens a program a token; with ROUTE_BLOCKS_MAX_TOKENS, to 512
    tokens in blocks of 16 multiplied with tl.dot in IEEE fp32; 513: cuBLAS and topk_softmax): fp32
    logits within fp32 rounding of cuBLAS's, and topk_softmax's routing of those logits (its weights to 8
    ulps: the sum of the exponentials in another order where topk_softmax holds several rows a program),
    replayed from a CUDA graph 50 times on new tokens (each replay's last program per block must see the
    other programs' parts, and leave the arrival counts at zero). topk_softmax against torch's softmax:
    test_topk_softmax."""
    g = generator(E + T)
    x = torch.randn(T, D, device=DEVICE, generator=g).to(BF16)
    weight = torch.randn(E, D, device=DEVICE, generator=g) * 0.02
    groups = (8, 3) if E == 160 else None  # V2's group-limited routing; V2-Lite's greedy
    monkeypatch.setattr(router, "GROUPED_IN_KERNEL", True)  # the kernel, not the reference's fallback
    monkeypatch.setattr(router, "ROUTE_BLOCKS_MAX_TOKENS", 512)  # blocks of tokens, whatever the default
    x_fp8 = (torch.empty(T, D, dtype=torch.float8_e4m3fn, device=DEVICE),
             torch.empty(T, D // 128, dtype=torch.float32, device=DEVICE))  # x quantized for FP8 experts too
    graph, (logits, weights, ids) = capture(lambda: route(x, weight, 6, False, 1.0, num_shared=2, groups=groups,
                                                          x_fp8=x_fp8))
    for _ in range(50):
        x.normal_(generator=g)
        graph.replay()
        ref_logits = torch.nn.functional.linear(x.float(), weight)
        assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
        want_w, want_ids = topk_softmax(logits, 6, False, 1.0, num_shared=2, groups=groups)
        assert torch.equal(ids, want_ids) and ulp_distance(weights, want_w).max() <= 8
        want_q, want_s = quantize_activation(x)  # the GPU's quantize launch (bit for bit the reference's)
        assert torch.equal(x_fp8[0].view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(x_fp8[1], want_s)


# ---------------------------------------------------------------- CUDA graphs: capture once, replay on new inputs

def capture(fn):
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("T", [1, 7])
def test_cuda_graphs(T):
    g = generator(T)
    # rms_norm with a residual
    x = torch.randn(T, 2048, device=DEVICE, generator=g).to(BF16)
    residual, weight = torch.randn_like(x), torch.randn(2048, device=DEVICE, generator=g).to(BF16)
    graph, (y, s) = capture(lambda: rms_norm(x, weight, 1e-6, residual=residual))
    x.normal_(generator=g), residual.normal_(generator=g)
    graph.replay()
    y_ref, s_ref = reference.rms_norm(x, weight, 1e-6, residual=residual)
    assert torch.equal(s, s_ref)
    assert_ulps(y, y_ref, 2, max_fraction=1e-2)

    # silu_and_mul
    h = torch.randn(T, 2 * 1408, device=DEVICE, generator=g).to(BF16)
    graph, y = capture(lambda: silu_and_mul(h))
    h.normal_(generator=g)
    graph.replay()
    assert_ulps(y, reference.silu_and_mul(h), 1, max_fraction=1e-2)

    # topk_softmax
    logits = torch.randn(T, 64, device=DEVICE, generator=g)
    graph, (weights, ids) = capture(lambda: topk_softmax(logits, 6, False, 1.0))
    logits.normal_(generator=g)
    graph.replay()
    assert_same_routing(weights, ids, logits, 6, False, 1.0)

    # mla_prepare: new query, latent, positions and slots in the same buffers
    H = 16
    q, kv, cos, sin, norm_weight, cache, slots = mla_inputs(T, H, seed=T)
    graph, (q_pe, c_kv, k_pe) = capture(lambda: mla_prepare(q_pe_view(q, H), kv, cos, sin, norm_weight, 1e-6,
                                                            cache, slots))
    q2, kv2, cos2, sin2, _, _, slots2 = mla_inputs(T, H, seed=T + 1)
    for dst, src in [(q, q2), (kv, kv2), (cos, cos2), (sin, sin2), (slots, slots2)]:
        dst.copy_(src)
    q_ref, cache_ref = q.clone(), cache.clone()
    graph.replay()
    q_pe_ref, c_ref, k_pe_ref = reference.mla_prepare(q_pe_view(q_ref, H), kv, cos, sin, norm_weight, 1e-6,
                                                      cache_ref, slots)
    assert torch.equal(q_pe_view(q, H), q_pe_ref) and torch.equal(k_pe, k_pe_ref)
    assert_ulps(c_kv, c_ref, 2, max_fraction=1e-2)
    assert_ulps(cache, cache_ref, 2, max_fraction=1e-2)
