# Run: python -m pytest -q tests/test_kernels.py   (CPU; the Triton kernels run in Triton's interpreter)
"""Triton kernels versus the PyTorch references on small shapes, and the references versus naive formulas.

Tolerances: fp32 kernels and references do the same fp32 math in another order (rtol 1e-4). bf16
has 8 significant bits (unit roundoff 2^-9) and the two sides round at different points (the
reference rounds each expert's intermediate to bf16, the kernels keep fp32 until the store); on
top of that the interpreter's numpy arithmetic is not the GPU's. So: a few ulps of the output scale
(2^-6) elementwise and 1% in relative norm.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from deepseek_v2.kernels import reference
from deepseek_v2.kernels.fp8 import quantize_activation, quantize_cache, quantize_weight

HAVE_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def tk(interpreted_kernels):
    """The Triton kernel modules, run by Triton's interpreter on CPU tensors (conftest.py)."""
    return interpreted_kernels


def assert_close(out, ref, dtype):
    out, ref = out.float(), ref.float()
    scale = ref.abs().max().item() + 1e-6
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * scale)
    else:
        torch.testing.assert_close(out, ref, rtol=2**-6, atol=2**-6 * scale)
        assert (out - ref).norm() <= 1e-2 * ref.norm() + 1e-6


def paged_cache(seq_lens, block_size, width, dtype, max_blocks=None, spare_blocks=3):
    """A cache with each sequence's blocks scattered at random; unused table entries hold junk."""
    needed = [-(-n // block_size) for n in seq_lens]
    max_blocks = max_blocks or max(max(needed), 1)
    num_blocks = sum(needed) + spare_blocks
    kv_cache = torch.randn(num_blocks, block_size, width).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    block_tables = torch.full((len(seq_lens), max_blocks), 10**6, dtype=torch.int32)
    for n, k in enumerate(needed):
        block_tables[n, :k] = torch.tensor(perm[:k], dtype=torch.int32)
        perm = perm[k:]
    return kv_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32)


# ---------------------------------------------------------------- references versus naive formulas

def test_mla_decode_ref_equals_naive_expanded_attention():
    """Absorbed decode (q_lat = W_UK^T q_nope; o = W_UV o_lat) equals attention with expanded K and V."""
    torch.manual_seed(0)
    H, R, P, d_nope, d_v, block_size = 3, 32, 8, 16, 12, 4
    seq_lens = [1, 4, 11]
    kv_cache, block_tables, lens = paged_cache(seq_lens, block_size, R + P, torch.float64)
    w_kv_b = torch.randn(H, d_nope + d_v, R, dtype=torch.float64) / R**0.5
    w_uk, w_uv = w_kv_b[:, :d_nope], w_kv_b[:, d_nope:]                   # [H, d_nope, R], [H, d_v, R]
    q_nope = torch.randn(len(seq_lens), H, d_nope, dtype=torch.float64)
    q_pe = torch.randn(len(seq_lens), H, P, dtype=torch.float64)
    scale = (d_nope + P) ** -0.5

    q_lat = torch.einsum("nhd,hdr->nhr", q_nope, w_uk)
    out = torch.einsum("nhr,hvr->nhv", reference.mla_decode(q_lat, q_pe, kv_cache, block_tables, lens, scale), w_uv)

    for n, length in enumerate(seq_lens):
        tokens = torch.stack([kv_cache[block_tables[n, t // block_size], t % block_size]
                              for t in range(length)])
        c, pe = tokens[:, :R], tokens[:, R:]                                # [t, R], [t, P]
        for h in range(H):
            k_nope, v = c @ w_uk[h].T, c @ w_uv[h].T                        # [t, d_nope], [t, d_v]
            p = torch.softmax(scale * (k_nope @ q_nope[n, h] + pe @ q_pe[n, h]), dim=0)
            torch.testing.assert_close(out[n, h], p @ v, rtol=1e-5, atol=1e-6)


def test_mla_decode_ref_zero_length_gives_zeros():
    kv_cache, block_tables, lens = paged_cache([0, 3], 16, 24, torch.float32)
    out = reference.mla_decode(torch.randn(2, 2, 16), torch.randn(2, 2, 8), kv_cache, block_tables, lens, 0.1)
    assert out[0].abs().max() == 0 and out[1].abs().max() > 0


def drop_picks(topk_ids, fraction, seed):
    """topk_ids with about `fraction` of the picks set to -1 (an expert on another rank); with
    0 < fraction < 1 the first token loses every pick and the last keeps its first."""
    torch.manual_seed(seed)
    drop = torch.rand(topk_ids.shape) < fraction
    if 0 < fraction < 1:
        drop[0] = True
        drop[-1, 0] = False
    return topk_ids.masked_fill(drop, -1)


@pytest.mark.parametrize("missing", [0.0, 0.4, 1.0])
def test_moe_ref_equals_per_token_loop(missing):
    """Values and gradients; a -1 pick is skipped."""
    torch.manual_seed(1)
    T, E, K, D, I = 7, 5, 2, 12, 6
    x, w13, w2 = torch.randn(T, D), torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    topk_weights, topk_ids = torch.rand(T, E).topk(K)
    topk_ids = drop_picks(topk_ids, missing, seed=2)
    inputs = [t.requires_grad_() for t in (x, w13, w2, topk_weights)]

    def per_token_loop(x, w13, w2, topk_weights):
        rows = []
        for t in range(T):
            y = torch.zeros(D)
            for k in range(K):
                e = topk_ids[t, k]
                if e == -1:
                    continue
                hidden = F.silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])
                y = y + topk_weights[t, k] * (w2[e] @ hidden)
            rows.append(y)
        return torch.stack(rows)

    y = reference.moe(x, w13, w2, topk_weights, topk_ids)
    expected = per_token_loop(*inputs)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert (y[(topk_ids == -1).all(dim=1)] == 0).all()
    probe = torch.randn(T, D)

    def grads(out):  # an input that out does not depend on gets a zero gradient
        if not out.requires_grad:
            return [torch.zeros_like(t) for t in inputs]
        found = torch.autograd.grad((out * probe).sum(), inputs, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(found, inputs)]

    for grad, want in zip(grads(y), grads(expected)):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- MLA decode kernel

MLA_CASES = [  # (heads, R, P, block_size, seq_lens, num_kv_splits, block_n, dtype)
    (2, 32, 16, 16, [1], None, 16, torch.float32),                       # a single token
    (4, 32, 16, 16, [16, 32], 1, 16, torch.float32),                     # exact block ends, one split
    (4, 32, 16, 16, [17, 50, 5], 3, 16, torch.float32),                  # mid-block ends, splits
    (16, 32, 16, 32, [70, 1, 33, 64], None, 16, torch.bfloat16),         # mixed lengths
    (16, 32, 16, 16, [3, 40], 8, 16, torch.float32),                     # more splits than tiles
    (2, 32, 16, 64, [0, 20], 2, 16, torch.float32),                      # an empty sequence
    (16, 512, 64, 64, [100, 129], None, 32, torch.bfloat16),             # real R and P
    (4, 512, 64, 16, [48, 7], 2, 32, torch.float16),
    (20, 32, 16, 16, [30, 45], 2, 16, torch.bfloat16),                   # two head groups, ragged
    (4, 32, 16, 128, [128, 129, 255, 256, 1], None, 32, torch.float32),  # big blocks, tile > block edge
    (16, 64, 16, 16, [97, 3, 64, 33, 1, 150, 16, 80], 4, 16, torch.float16),  # eight sequences
]


@pytest.mark.parametrize("case", range(len(MLA_CASES)))
def test_mla_decode_matches_ref(tk, case):
    H, R, P, block_size, seq_lens, splits, block_n, dtype = MLA_CASES[case]
    torch.manual_seed(100 + case)
    kv_cache, block_tables, lens = paged_cache(seq_lens, block_size, R + P, dtype)
    q_lat = torch.randn(len(seq_lens), H, R).to(dtype)
    q_pe = torch.randn(len(seq_lens), H, P).to(dtype)
    scale = 192**-0.5
    out = tk.mla_decode.mla_decode(q_lat, q_pe, kv_cache, block_tables, lens, scale, num_kv_splits=splits,
                                   block_n=block_n)
    assert out.shape == q_lat.shape and out.dtype == dtype
    assert_close(out, reference.mla_decode(q_lat, q_pe, kv_cache, block_tables, lens, scale), dtype)


@pytest.mark.parametrize("splits", [None, 66])
@pytest.mark.parametrize("w_uv", [False, True])
def test_mla_decode_empty_splits_store_nothing(tk, w_uv, splits, monkeypatch):
    """The split count is set for the longest context (max_seq_len), so short sequences leave splits empty:
    those store nothing and the merge reads only a sequence's pieces. The partials' buffers start as NaN,
    and the output is still the reference's."""
    H, R, P, dv = 4, 32, 16, 8
    seq_lens = [2048, 40, 0, 300]
    monkeypatch.setattr(tk.mla_decode, "PROJECT_IN_MERGE_MAX_SEQS", 4 if w_uv else 0)  # W_UV: the merge's launch
    monkeypatch.setattr(tk.mla_decode, "num_sms", lambda device: 132)  # the host's count: 2 x 132 / 4 = 66 splits
    torch.manual_seed(5)
    kv_cache, block_tables, lens = paged_cache(seq_lens, 64, R + P, torch.float32)
    q_lat, q_pe = torch.randn(4, H, R), torch.randn(4, H, P)
    w = torch.randn(H, dv, R) if w_uv else None
    partials = []
    empty = torch.empty

    def nan_empty(*shape, **kwargs):
        t = empty(*shape, **kwargs)
        if kwargs.get("dtype") == torch.float32 and t.dim() == 3:  # mid_lse [N, H, S]
            partials.append(t)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    want = reference.mla_decode(q_lat, q_pe, kv_cache, block_tables, lens, 0.1)
    if w_uv:
        want = torch.einsum("nhr,hvr->nhv", want, w)
    out = tk.mla_decode.mla_decode(q_lat, q_pe, kv_cache, block_tables, lens, 0.1, num_kv_splits=splits,
                                   max_seq_len=32768, block_n=32, w_uv=w)
    assert_close(out, want, torch.float32)
    (mid_lse,) = partials
    assert mid_lse.shape == (4, H, 66)
    pieces = [64, 2, 0, 10]  # 32-token tiles: 2048 / 66 -> 32 tokens a piece, 40 -> 32, 300 -> 32
    assert (~mid_lse.isnan()).sum(dim=2).tolist() == [[p] * H for p in pieces]


TMA_CASES = [c for c, (H, R, P, bs, lens, splits, bn, dtype) in enumerate(MLA_CASES)
             if bs % bn == 0 and R & (R - 1) == 0 and P & (P - 1) == 0]


@pytest.mark.parametrize("case", TMA_CASES)
def test_mla_decode_through_tensor_descriptors(tk, case):
    """The whole tiles read through TMA descriptors, the last partial one with pointers: the reference's
    output, and tokens past a sequence's end never count, though their rows of its last page hold NaN."""
    H, R, P, block_size, seq_lens, splits, block_n, dtype = MLA_CASES[case]
    torch.manual_seed(200 + case)
    kv_cache, block_tables, lens = paged_cache(seq_lens, block_size, R + P, dtype)
    for n, length in enumerate(seq_lens):  # the unused rows of each sequence's last block
        if length % block_size:
            kv_cache[block_tables[n, length // block_size], length % block_size:] = float("nan")
    q_lat = torch.randn(len(seq_lens), H, R).to(dtype)
    q_pe = torch.randn(len(seq_lens), H, P).to(dtype)
    out = tk.mla_decode.mla_decode(q_lat, q_pe, kv_cache, block_tables, lens, 0.1, num_kv_splits=splits,
                                   block_n=block_n, tma=True)
    assert_close(out, reference.mla_decode(q_lat, q_pe, kv_cache.nan_to_num(), block_tables, lens, 0.1), dtype)


def test_mla_decode_tma_choice(tk, monkeypatch):
    """By default the whole tiles go through TMA on a Hopper-class GPU from TMA_MIN_SEQS sequences, for
    bf16 / fp16 queries over a cache it can read, FP8 included (an fp32 cache spills registers through TMA);
    the launch records it."""
    module = tk.mla_decode
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs["TMA"])

    monkeypatch.setattr(module, "_mla_decode_split_kernel", Recorder())
    monkeypatch.setattr(tk.mla_merge, "_mla_decode_merge_kernel", Recorder())
    monkeypatch.setattr(module, "hopper_class", lambda device: True)
    seqs = module.TMA_MIN_SEQS
    cases = [(seqs, torch.bfloat16, False, True), (seqs - 1, torch.bfloat16, False, False),
             (seqs, torch.float32, False, False), (seqs, torch.bfloat16, True, True)]
    for N, dtype, fp8, expected in cases:
        kv_cache, block_tables, lens = paged_cache([40] * N, 64, 576, torch.float32 if fp8 else dtype)
        if fp8:
            kv_cache = quantize_cache(kv_cache)
        launches.clear()
        module.mla_decode(torch.randn(N, 16, 512).to(dtype), torch.randn(N, 16, 64).to(dtype), kv_cache, block_tables,
                          lens, 0.1, num_kv_splits=1)
        assert launches == [expected], (N, dtype, fp8)
    monkeypatch.setattr(module, "TMA", False)
    launches.clear()
    module.mla_decode(torch.randn(N, 16, 512).to(torch.bfloat16), torch.randn(N, 16, 64).to(torch.bfloat16),
                      *paged_cache([40] * N, 64, 576, torch.bfloat16), 0.1, num_kv_splits=1)
    assert launches == [False]


def test_mla_decode_tma_needs_whole_tiles_in_a_page(tk):
    kv_cache, block_tables, lens = paged_cache([20], 16, 48, torch.float32)
    q_lat, q_pe = torch.randn(1, 2, 32), torch.randn(1, 2, 16)
    with pytest.raises(ValueError, match="tma needs"):  # a 32-token tile over 16-token pages
        tk.mla_decode.mla_decode(q_lat, q_pe, kv_cache, block_tables, lens, 0.1, block_n=32, tma=True)
    with pytest.raises(ValueError, match="tma needs"):  # R + P = 40 + 8: R not a power of two
        tk.mla_decode.mla_decode(torch.randn(1, 2, 40), torch.randn(1, 2, 8), kv_cache, block_tables, lens, 0.1,
                                 block_n=16, tma=True)


@pytest.mark.parametrize("in_merge", [False, True])
@pytest.mark.parametrize("case", [0, 1, 4, 5, 7])
def test_mla_decode_projects_by_w_uv(tk, case, in_merge, monkeypatch):
    """With w_uv (W_UV, a strided view as the model slices it from kv_b_proj) the output is projected per
    head: by a batched matmul after the merge, or (PROJECT_IN_MERGE_MAX_SEQS) inside the merge's launch,
    one split included; an empty sequence still gives zeros."""
    H, R, P, block_size, seq_lens, splits, block_n, dtype = MLA_CASES[case]
    torch.manual_seed(800 + case)
    kv_cache, block_tables, lens = paged_cache(seq_lens, block_size, R + P, dtype)
    q_lat = torch.randn(len(seq_lens), H, R).to(dtype)
    q_pe = torch.randn(len(seq_lens), H, P).to(dtype)
    w_uv = (torch.randn(H, 16 + 24, R) / R**0.5).to(dtype)[:, 16:]        # [H, dv = 24, R], rows strided
    monkeypatch.setattr(tk.mla_decode, "PROJECT_IN_MERGE_MAX_SEQS", 64 if in_merge else 0)
    out = tk.mla_decode.mla_decode(q_lat, q_pe, kv_cache, block_tables, lens, 0.1, num_kv_splits=splits,
                                   block_n=block_n, w_uv=w_uv)
    assert out.shape == (len(seq_lens), H, 24) and out.dtype == dtype
    assert_close(out, reference.mla_decode(q_lat, q_pe, kv_cache, block_tables, lens, 0.1, w_uv=w_uv), dtype)
    assert (out[lens == 0] == 0).all()


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("case", [0, 2, 3, 6, 8])
def test_mla_decode_reads_the_fp8_cache(tk, case, tma):
    """An FP8 cache (each block's e4m3 rows, then their scales, as mla_prepare writes them) against the
    reference, which dequantizes it: the scale applied to the scores and the weights matches to bf16
    tolerance; with tma, its values' whole tiles read through tensor descriptors over the blocks' values
    (the scales between blocks left out)."""
    H, R, P, block_size, seq_lens, splits, block_n, dtype = MLA_CASES[case]
    torch.manual_seed(400 + case)
    kv_cache, block_tables, lens = paged_cache(seq_lens, block_size, R + P, torch.float32)
    scales = torch.logspace(-2, 2, kv_cache.shape[0] * block_size).view(kv_cache.shape[0], block_size, 1)
    fp8_cache = quantize_cache(kv_cache * scales)
    q_lat, q_pe = torch.randn(len(seq_lens), H, R).to(dtype), torch.randn(len(seq_lens), H, P).to(dtype)
    out = tk.mla_decode.mla_decode(q_lat, q_pe, fp8_cache, block_tables, lens, 0.05, num_kv_splits=splits,
                                   block_n=block_n, tma=tma)
    assert out.shape == q_lat.shape and out.dtype == dtype
    assert_close(out, reference.mla_decode(q_lat, q_pe, fp8_cache, block_tables, lens, 0.05), dtype)


@pytest.mark.parametrize("case, q_magnitude", [(3, 1.0), (6, 1e6), (7, 1e-3), (8, 3e4)])
def test_mla_decode_fp8_cache_with_fp16_dots(tk, case, q_magnitude):
    """The FP8 cache's dots in fp16 (fp16_dots): the queries are scaled into fp16's range by a power of
    two and the scores scaled back, so queries far beyond it (1e6: fp16 overflows at 65504) or small
    give the reference's output to bf16 tolerance, as the default path does."""
    H, R, P, block_size, seq_lens, splits, block_n, dtype = MLA_CASES[case]
    torch.manual_seed(500 + case)
    kv_cache, block_tables, lens = paged_cache(seq_lens, block_size, R + P, torch.float32)
    fp8_cache = quantize_cache(kv_cache * torch.logspace(-1, 1, R + P))
    q_lat = (torch.randn(len(seq_lens), H, R) * q_magnitude).to(dtype)
    q_pe = (torch.randn(len(seq_lens), H, P) * q_magnitude).to(dtype)
    scale = 0.05 / q_magnitude  # the softmax stays soft whatever the queries' magnitude
    out = tk.mla_decode.mla_decode(q_lat, q_pe, fp8_cache, block_tables, lens, scale, num_kv_splits=splits,
                                   block_n=block_n, fp16_dots=True)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert_close(out, reference.mla_decode(q_lat, q_pe, fp8_cache, block_tables, lens, scale), dtype)
    with pytest.raises(ValueError, match="fp16_dots"):
        tk.mla_decode.mla_decode(q_lat, q_pe, kv_cache.to(dtype), block_tables, lens, scale, fp16_dots=True)


def test_mla_decode_strided_views(tk):
    """q_lat as a transposed bmm output and kv_cache as one layer of a bigger cache."""
    torch.manual_seed(7)
    H, R, P, block_size = 4, 32, 16, 16
    layers, block_tables, lens = paged_cache([21, 40], block_size, R + P, torch.float32)
    layers = torch.stack([torch.randn_like(layers), layers])                 # [2, blocks, bs, R+P]
    q_lat = torch.randn(H, 2, R).transpose(0, 1)                              # [N, H, R], stride(1) != R
    q_pe = torch.randn(2, H, P)
    out = tk.mla_decode.mla_decode(q_lat, q_pe, layers[1], block_tables, lens, 0.2, block_n=16)
    assert_close(out, reference.mla_decode(q_lat, q_pe, layers[1], block_tables, lens, 0.2), torch.float32)


def test_mla_decode_rejects_bad_inputs(tk):
    kv_cache, block_tables, lens = paged_cache([5], 16, 48, torch.float32)
    q_lat, q_pe = torch.randn(1, 2, 32), torch.randn(1, 2, 16)
    bad = [
        dict(q_lat=q_lat.bfloat16()),                                       # dtype mismatch
        dict(q_pe=torch.randn(1, 2, 8)),                                    # R + P != cache width
        dict(block_tables=block_tables.long()),                             # not int32
        dict(seq_lens=torch.tensor([5, 5], dtype=torch.int32)),             # wrong N
        dict(kv_cache=kv_cache.transpose(1, 2).contiguous().transpose(1, 2)),  # strided last dim
        dict(q_lat=q_lat.int()),
        dict(q_pe=torch.randn(1, 2, 15), kv_cache=torch.zeros(2, 16, 32 + 15 + 4, dtype=torch.uint8)),  # FP8, odd P
        dict(q_lat=torch.randn(1, 2, 31), q_pe=torch.randn(1, 2, 17),                           # FP8, odd R
             kv_cache=torch.zeros(2, 16, 31 + 17 + 4, dtype=torch.uint8)),
    ]
    for change in bad:
        args = dict(q_lat=q_lat, q_pe=q_pe, kv_cache=kv_cache, block_tables=block_tables, seq_lens=lens)
        args.update(change)
        with pytest.raises(ValueError, match="mla_decode"):
            tk.mla_decode.mla_decode(softmax_scale=0.1, **args)


# ---------------------------------------------------------------- W_UK's product (absorbed decode's query)

class _Spy:
    """Stands in for a jit kernel: records each launch's grid, then launches it."""
    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,DN,R", [(16, 128, 512), (3, 24, 80)])  # V2-Lite's heads; ragged dims
def test_absorb_query_matches_the_batched_matmul(tk, monkeypatch, H, DN, R, dtype):
    """Our launch for few sequences gives the batched matmul's product (fp32 sums, one rounding), on
    strided views as the model passes them (q_nope a slice of q, w_uk a slice of kv_b_proj's rows);
    past ABSORB_MAX_SEQS sequences the product is torch.bmm's, bit for bit."""
    monkeypatch.setattr(tk.absorb, "ABSORB_MAX_SEQS", 4)
    launches = []
    kernel = tk.absorb._absorb_query_kernel
    monkeypatch.setattr(tk.absorb, "_absorb_query_kernel", _Spy(kernel, launches))
    g = torch.Generator().manual_seed(H + DN)
    w_uk = torch.randn(H, DN + 16, R, generator=g)[:, :DN].to(dtype)
    for N in (1, 4, 5):
        q_nope = torch.randn(N, H, DN + 8, generator=g)[..., :DN].to(dtype)
        out = tk.absorb.absorb_query(q_nope, w_uk)
        want = reference.absorb_query(q_nope.float(), w_uk.float())
        assert out.shape == (N, H, R) and out.dtype == dtype
        if N > 4:
            assert torch.equal(out, reference.absorb_query(q_nope, w_uk))
        else:
            assert_close(out, want.to(dtype), dtype)
            if dtype == torch.bfloat16:  # the fp32 sums rounded once: within half an ulp (+ the sums' order)
                assert ((out.float() - want).abs() <= want.abs() * torch.finfo(dtype).eps / 2 + 1e-4).all()
    assert launches == [(H, -(-R // 64))] * 2


def test_absorb_query_rejects_a_mismatched_weight(tk):
    with pytest.raises(ValueError, match="w_uk"):
        tk.absorb.absorb_query(torch.randn(1, 4, 8), torch.randn(4, 16, 32))


# ---------------------------------------------------------------- MoE kernels

@pytest.mark.parametrize("missing", [0.0, 0.3, 1.0])
def test_moe_align_groups_and_pads_rows(tk, missing):
    """Each expert's run holds exactly its rows; the -1 rows form bucket E's run after them all."""
    torch.manual_seed(3)
    T, K, E, block_m = 9, 3, 6, 4
    topk_ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    topk_ids[:, 0] = 2                                                      # a crowded expert
    topk_ids = drop_picks(topk_ids, missing, seed=4)
    a = tk.moe_align.moe_align(topk_ids, E, block_m)
    flat = topk_ids.flatten()
    bucket = flat.where(flat >= 0, E)
    counts = torch.bincount(bucket, minlength=E + 1)
    padded = (counts + block_m - 1) // block_m * block_m
    assert a.num_padded.item() == padded.sum().item()
    start = 0
    for e in range(E + 1):
        run = a.sorted_ids[start:start + padded[e]]
        real = run[:counts[e]]
        assert torch.equal(real.long(), (bucket == e).nonzero().flatten())  # row order kept
        assert (run[counts[e]:] == T * K).all()                             # padding sentinel
        assert (a.expert_ids[start // block_m:(start + padded[e]) // block_m] == e).all()
        start += padded[e].item()


SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)
MOE_CASES = [  # (T, E, K, D, I, config, dtype)
    (1, 8, 2, 32, 48, None, torch.float32),                              # decode: 2 touched experts
    (5, 8, 3, 64, 32, SMALL, torch.float32),                             # several N and K tiles
    (33, 4, 2, 40, 24, SMALL, torch.float32),                            # ragged K (40 % 16), ragged N
    (40, 16, 6, 32, 32, None, torch.bfloat16),                           # many rows per expert
    (3, 8, 1, 32, 16, SMALL, torch.bfloat16),                            # top-1
    (70, 4, 2, 32, 16, dict(SMALL, BLOCK_M=64), torch.float16),          # > 16 rows per expert
    (17, 32, 6, 48, 40, None, torch.bfloat16),                           # V2-like top-6, D < BLOCK_K
    (64, 8, 2, 64, 32, None, torch.float32),                             # default 64-row tier
]


def moe_inputs(T, E, K, D, I, dtype, seed):
    torch.manual_seed(seed)
    x = torch.randn(T, D).to(dtype)
    w13 = (torch.randn(E, 2 * I, D) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, I) / I**0.5).to(dtype)
    topk_weights, topk_ids = torch.randn(T, E).softmax(-1).topk(K)
    return x, w13, w2, topk_weights, topk_ids


@pytest.mark.parametrize("case", range(len(MOE_CASES)))
def test_fused_moe_matches_ref(tk, case):
    T, E, K, D, I, config, dtype = MOE_CASES[case]
    x, w13, w2, topk_weights, topk_ids = moe_inputs(T, E, K, D, I, dtype, seed=200 + case)
    if case % 2:
        topk_ids = topk_ids.int()
    y = tk.moe.fused_moe(x, w13, w2, topk_weights, topk_ids, config=config)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, reference.moe(x, w13, w2, topk_weights, topk_ids), dtype)


@pytest.mark.parametrize("case", [0, 1, 2, 3, 5])  # 0: one token, no alignment launch
@pytest.mark.parametrize("missing", [0.3, 1.0])
def test_fused_moe_skips_missing_picks(tk, case, missing):
    """-1 picks (experts on another rank) add nothing; a token (or a batch) with no pick here gets
    exactly zero although the wrapper does not zero its buffers."""
    T, E, K, D, I, config, dtype = MOE_CASES[case]
    x, w13, w2, topk_weights, topk_ids = moe_inputs(T, E, K, D, I, dtype, seed=300 + case)
    topk_ids = drop_picks(topk_ids, missing, seed=case)
    if case % 2:
        topk_ids = topk_ids.int()
    for size in (I, D):  # freed NaN blocks of the buffers' sizes, likely handed out again by malloc
        torch.full((T * K, size), float("nan"), dtype=dtype)
    y = tk.moe.fused_moe(x, w13, w2, topk_weights, topk_ids, config=config)
    assert (y[(topk_ids == -1).all(dim=1)] == 0).all()
    assert_close(y, reference.moe(x, w13, w2, topk_weights, topk_ids), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_moe_adds_the_shared_output_as_a_tensor_add_would(tk, dtype):
    """add (the shared experts' output) joins the K picks' sum in the last launch, rounded as a
    separate add of a tensor of x's dtype would round it: bit for bit fused_moe(...) + add."""
    T, E, K, D, I = 5, 8, 3, 48, 32
    x, w13, w2, topk_weights, topk_ids = moe_inputs(T, E, K, D, I, dtype, seed=11)
    add = torch.randn(T, D).to(dtype)
    y = tk.moe.fused_moe(x, w13, w2, topk_weights, topk_ids, add=add, config=SMALL)
    assert torch.equal(y, tk.moe.fused_moe(x, w13, w2, topk_weights, topk_ids, config=SMALL) + add)
    assert_close(y, reference.moe(x, w13, w2, topk_weights, topk_ids, add=add), dtype)
    for bad in (add[:4], add.double(), torch.randn(D, T).to(dtype).t()):
        with pytest.raises(ValueError, match="fused_moe: add"):
            tk.moe.fused_moe(x, w13, w2, topk_weights, topk_ids, add=bad)


@pytest.mark.parametrize("case", [0, 1, 2, 3, 5, 6])  # 0: one token (a block a pick)
@pytest.mark.parametrize("missing", [0.0, 0.4])
@pytest.mark.parametrize("with_add", [False, True])
def test_fused_moe_sums_the_picks_in_the_down_gemm_bit_for_bit(tk, case, missing, with_add, monkeypatch):
    """The down GEMM's last program to store a token's row of a column block sums the token's picks
    (COMBINE_IN_GEMM_MAX_TOKENS): bit for bit what _combine_kernel's launch gives, with -1 picks (zero
    rows from bucket E, several of one token in one block) and the shared output added; every arrival
    counter is zero again after the launch, so the next launch (a graph replay) starts clean."""
    T, E, K, D, I, config, dtype = MOE_CASES[case]
    x, w13, w2, topk_weights, topk_ids = moe_inputs(T, E, K, D, I, dtype, seed=700 + case)
    topk_ids = drop_picks(topk_ids, missing, seed=case)
    add = torch.randn(T, D).to(dtype) if with_add else None
    apart = tk.moe.fused_moe(x, w13, w2, topk_weights, topk_ids, add=add, config=config)
    monkeypatch.setattr(tk.moe, "COMBINE_IN_GEMM_MAX_TOKENS", 128)
    launches = []
    spy = type("Spy", (), {"__getitem__": lambda self, grid: lambda *args, **kwargs: launches.append(grid)})()
    monkeypatch.setattr(tk.moe, "_combine_kernel", spy)
    inside = tk.moe.fused_moe(x, w13, w2, topk_weights, topk_ids, add=add, config=config)
    assert launches == [] and torch.equal(inside, apart)
    assert not tk.launch.arrival_counters(x.device, "moe combine", tk.moe._ARRIVALS).any()
    again = tk.moe.fused_moe(x, w13, w2, topk_weights, topk_ids, add=add, config=config)
    assert torch.equal(again, apart)


def test_fused_moe_fp8_sums_the_picks_in_the_down_gemm(tk, monkeypatch):
    T, E, K, D, I, config, dtype = MOE_CASES[6]
    x, w13, w2, topk_weights, topk_ids = moe_inputs(T, E, K, D, I, torch.bfloat16, seed=71)
    q13, q2, s13, s2 = fp8_experts(w13.float(), w2.float())
    apart = tk.moe.fused_moe(x, q13, q2, topk_weights, topk_ids, s13, s2)
    monkeypatch.setattr(tk.moe, "COMBINE_IN_GEMM_MAX_TOKENS", 64)
    assert torch.equal(tk.moe.fused_moe(x, q13, q2, topk_weights, topk_ids, s13, s2), apart)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("shape", [(1, 8, 6, 256, 136), (3, 8, 2, 200, 256), (17, 32, 6, 48, 40)])
def test_fused_moe_fp8_gate_up_quantizes_the_intermediate_bit_for_bit(tk, shape, swap, monkeypatch):
    """QUANTIZE_INTER_MAX_TOKENS: the gate/up GEMM stores the intermediate in e4m3 with its scales (a program
    a 128-wide group), so no quantize_activation launch comes between the GEMMs: bit for bit the output of
    the separate launch, over several groups, a ragged last one (136 = 128 + 8), -1 picks and swapped
    operands; one quantize_activation launch (x's) instead of two."""
    T, E, K, D, I = shape
    x, w13, w2, topk_weights, topk_ids = moe_inputs(T, E, K, D, I, torch.bfloat16, seed=T + I)
    topk_ids = drop_picks(topk_ids, 0.3, seed=T)
    q13, q2, s13, s2 = fp8_experts(w13.float(), w2.float())
    launch = dict(tk.moe.default_config(T * K / E, True), SWAP_AB=swap)
    apart = tk.moe.fused_moe(x, q13, q2, topk_weights, topk_ids, s13, s2, config=launch)
    quantized = []
    real = tk.moe.quantize_activation
    monkeypatch.setattr(tk.moe, "quantize_activation", lambda a, *args: quantized.append(a.shape) or real(a, *args))
    monkeypatch.setattr(tk.moe, "QUANTIZE_INTER_MAX_TOKENS", T)
    inside = tk.moe.fused_moe(x, q13, q2, topk_weights, topk_ids, s13, s2, config=launch)
    assert quantized == [x.shape] and torch.equal(inside, apart)
    monkeypatch.setattr(tk.moe, "QUANTIZE_INTER_MAX_TOKENS", T - 1)  # a token more than the setting: apart
    assert torch.equal(tk.moe.fused_moe(x, q13, q2, topk_weights, topk_ids, s13, s2, config=launch), apart)
    assert quantized == [x.shape, x.shape, (T * K, I)]


@pytest.mark.parametrize("shape", [(1, 8, 6, 256, 128), (3, 8, 2, 200, 256)])
def test_fused_moe_fp8_reads_x_quantized_by_the_router(tk, shape, monkeypatch):
    """x_fp8 (x quantized by the router's launch): bit for bit the output of quantizing x in fused_moe,
    with no quantize_activation launch of x's, its scales row-major or M-major; refused for bf16 experts
    or a buffer of the wrong shape."""
    from deepseek_v2.kernels.fp8 import quantize_activation, quantized_buffers
    T, E, K, D, I = shape
    x, w13, w2, topk_weights, topk_ids = moe_inputs(T, E, K, D, I, torch.bfloat16, seed=T + D)
    q13, q2, s13, s2 = fp8_experts(w13.float(), w2.float())
    apart = tk.moe.fused_moe(x, q13, q2, topk_weights, topk_ids, s13, s2)
    quantized = []
    real = tk.moe.quantize_activation
    monkeypatch.setattr(tk.moe, "quantize_activation", lambda a, *args: quantized.append(a.shape) or real(a, *args))
    x_fp8 = quantize_activation(x)
    assert torch.equal(tk.moe.fused_moe(x, q13, q2, topk_weights, topk_ids, s13, s2, x_fp8=x_fp8), apart)
    assert quantized == [(T * K, I)]  # the intermediate's only
    q, scales = quantized_buffers(T, D, x.device, pad_rows=128)  # M-major scales (the shared experts' layout)
    q[:T], scales[:T] = x_fp8
    assert torch.equal(tk.moe.fused_moe(x, q13, q2, topk_weights, topk_ids, s13, s2, x_fp8=(q[:T], scales[:T])),
                       apart)
    with pytest.raises(ValueError, match="x_fp8 is for FP8 experts"):
        tk.moe.fused_moe(x, w13, w2, topk_weights, topk_ids, x_fp8=x_fp8)
    with pytest.raises(ValueError, match="fused_moe x_fp8: out must be"):
        tk.moe.fused_moe(x, q13, q2, topk_weights, topk_ids, s13, s2, x_fp8=(x_fp8[0][:, 1:], x_fp8[1]))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", [0, 1, 2, 3, 5, 6])
def test_fused_moe_with_swapped_operands(tk, case, fp8):
    """SWAP_AB: each block's products as (weight columns) x (rows), the accumulators transposed back for
    the epilogue: the same results, with -1 picks, ragged K and N, FP8 block scales on both sides."""
    T, E, K, D, I, config, dtype = MOE_CASES[case]
    x, w13, w2, topk_weights, topk_ids = moe_inputs(T, E, K, D, I, torch.bfloat16 if fp8 else dtype, seed=900 + case)
    topk_ids = drop_picks(topk_ids, 0.3, seed=case)
    weights = fp8_experts(w13.float(), w2.float()) if fp8 else (w13, w2, None, None)
    launch = dict(config or tk.moe.default_config(T * K / E, fp8), SWAP_AB=True)
    y = tk.moe.fused_moe(x, weights[0], weights[1], topk_weights, topk_ids, weights[2], weights[3], config=launch)
    assert (y[(topk_ids == -1).all(dim=1)] == 0).all()
    assert_close(y, reference.moe(x, weights[0], weights[1], topk_weights, topk_ids, weights[2], weights[3]), x.dtype)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", [0, 1, 2, 3, 5, 6])
def test_fused_moe_weights_through_tensor_descriptors(tk, case, fp8):
    """TMA: the weights' tiles read through descriptors over [E * rows, K] (a ragged last column block
    reading the next expert's rows, K past the end as zeros): the reference's results, with -1 picks, FP8
    block scales and swapped operands too."""
    T, E, K, D, I, config, dtype = MOE_CASES[case]
    if fp8:  # e4m3 rows of a multiple of 16 bytes, as descriptors need (still ragged against 128-wide blocks)
        D, I = -(-D // 16) * 16, -(-I // 16) * 16
    x, w13, w2, topk_weights, topk_ids = moe_inputs(T, E, K, D, I, torch.bfloat16 if fp8 else dtype, seed=950 + case)
    topk_ids = drop_picks(topk_ids, 0.3, seed=case)
    weights = fp8_experts(w13.float(), w2.float()) if fp8 else (w13, w2, None, None)
    launch = dict(config or tk.moe.default_config(T * K / E, fp8), TMA=True, SWAP_AB=case % 2 == 1)
    y = tk.moe.fused_moe(x, weights[0], weights[1], topk_weights, topk_ids, weights[2], weights[3], config=launch)
    assert (y[(topk_ids == -1).all(dim=1)] == 0).all()
    assert_close(y, reference.moe(x, weights[0], weights[1], topk_weights, topk_ids, weights[2], weights[3]), x.dtype)
    width = 24 // x.element_size()  # rows of 24 bytes
    with pytest.raises(ValueError, match="TMA needs"):
        tk.moe.fused_moe(x[:, :width].contiguous(), w13[:, :, :width].contiguous(), w2[:, :width].contiguous(),
                         topk_weights, topk_ids, config=launch)


def test_fused_moe_expert_parallel_split(tk):
    """Experts split over 3 "ranks" in contiguous ranges, each rank's picks mapped to its local ids
    (-1 elsewhere): the ranks' outputs add up to the output with every expert in one place."""
    T, E, K, D, I = 12, 8, 3, 32, 16
    x, w13, w2, topk_weights, topk_ids = moe_inputs(T, E, K, D, I, torch.float32, seed=9)
    y = torch.zeros(T, D)
    for first, last in [(0, 3), (3, 6), (6, 8)]:
        here = (topk_ids >= first) & (topk_ids < last)
        local_ids = torch.where(here, topk_ids - first, -1)
        y += tk.moe.fused_moe(x, w13[first:last], w2[first:last], topk_weights, local_ids, config=SMALL)
    assert_close(y, reference.moe(x, w13, w2, topk_weights, topk_ids), torch.float32)


def test_fused_moe_rejects_bad_inputs(tk):
    x, w13, w2, topk_weights, topk_ids = moe_inputs(4, 4, 2, 16, 16, torch.float32, seed=5)
    bad = [
        dict(w13=w13.bfloat16()),                       # dtype mismatch
        dict(w2=w2[:, :8]),                             # D mismatch
        dict(topk_weights=topk_weights.bfloat16()),     # weights must be fp32
        dict(topk_ids=topk_ids.float()),
        dict(topk_ids=topk_ids[:3]),                    # wrong T
        dict(x=x.t().contiguous().t()),                 # strided last dim
    ]
    for change in bad:
        args = dict(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
        args.update(change)
        with pytest.raises(ValueError, match="fused_moe"):
            tk.moe.fused_moe(**args)


# ---------------------------------------------------------------- prefill attention kernel

def packed_prefill(H, d, dv, query_lens, context_lens, dtype, seed):
    """q, k, v of several sequences packed (each one's keys: its cached context, then its new tokens)."""
    g = torch.Generator().manual_seed(seed)
    key_lens = [q + c for q, c in zip(query_lens, context_lens)]
    q = torch.randn(sum(query_lens), H, d, generator=g).to(dtype)
    k = torch.randn(sum(key_lens), H, d, generator=g).to(dtype)
    v = torch.randn(sum(key_lens), H, dv, generator=g).to(dtype)
    cumsum = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cumsum(query_lens), cumsum(key_lens), query_lens, key_lens


PREFILL_CASES = [  # H, d (q/k), dv, query lens, cached context lens, dtype, BLOCK_M, BLOCK_N
    (2, 24, 16, [5, 40, 1], [0, 0, 0], torch.float32, 16, 16),            # new prompts; d = 16 + 8, masked widths
    (2, 48, 32, [33, 16, 7], [20, 0, 50], torch.float32, 16, 16),         # chunks after cached context
    (3, 32, 32, [64, 17], [31, 0], torch.bfloat16, 32, 16),               # one tile (d a power of two)
    (2, 96, 64, [50, 1, 130], [0, 77, 14], torch.bfloat16, 16, 32),       # the demo model's dims
    (1, 192, 128, [40], [100], torch.bfloat16, 32, 32),                   # V2's dims: 128 + 64, v 128
    (2, 24, 16, [1, 1, 1], [0, 3, 64], torch.float16, 16, 16),            # one query each
    (1, 192, 128, [130, 5], [70, 0], torch.bfloat16, None, None),         # the default launch (128 x 64 tiles)
    (2, 40, 24, [40, 3], [9, 0], torch.float32, None, None),               # fp32's default launch (32 x 16)
]


@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_prefill_attention_kernel_matches_ref(tk, case):
    """Causal attention aligned to the end over packed sequences, against the reference's per-sequence
    SDPA: query blocks across the unmasked/masked boundary, ragged tails, head dims that are not a
    power of two split into two tiles, V narrower than q/k."""
    H, d, dv, query_lens, context_lens, dtype, block_m, block_n = PREFILL_CASES[case]
    q, k, v, cu_q, cu_k, ql, kl = packed_prefill(H, d, dv, query_lens, context_lens, dtype, seed=case)
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n) if block_m else None
    out = tk.prefill_triton.prefill_attention(q, k, v, cu_q, cu_k, ql, kl, d**-0.5, config=config)
    assert out.shape == (sum(ql), H, dv) and out.dtype == dtype
    ref = reference.prefill_attention(q.float(), k.float(), v.float(), cu_q, cu_k, ql, kl, d**-0.5)
    assert_close(out, ref, dtype)
    # K and V through tensor descriptors (TMA): a tile's rows past its sequence are the next one's, masked
    tma = dict(config or tk.prefill_triton.default_config(d), TMA=True)
    assert_close(tk.prefill_triton.prefill_attention(q, k, v, cu_q, cu_k, ql, kl, d**-0.5, config=tma), ref, dtype)


def test_prefill_attention_kernel_reads_views(tk):
    """q, k and v as the model hands them: views with a contiguous last dim only (k and v split from one
    projection's output), out contiguous."""
    q, k, v, cu_q, cu_k, ql, kl = packed_prefill(2, 48, 32, [9, 20], [4, 0], torch.float32, seed=7)
    kv = torch.cat([k, v], dim=-1)                  # [Tk, H, 48 + 32]: k and v are strided views of it
    q_wide = torch.cat([q, torch.randn_like(q)], dim=-1)[..., :48]
    ref = reference.prefill_attention(q, k, v, cu_q, cu_k, ql, kl, 0.2)
    for tma in (False, True):
        out = tk.prefill_triton.prefill_attention(q_wide, kv[..., :48], kv[..., 48:], cu_q, cu_k, ql, kl, 0.2,
                                                 config=dict(BLOCK_M=16, BLOCK_N=16, TMA=tma))
        assert_close(out, ref, torch.float32)


def test_prefill_attention_kernel_rejects_bad_inputs(tk):
    q, k, v, cu_q, cu_k, ql, kl = packed_prefill(2, 24, 16, [3, 4], [0, 2], torch.float32, seed=0)
    f = tk.prefill_triton.prefill_attention
    with pytest.raises(ValueError, match="at least as many keys"):
        f(q, k, v, cu_q, cu_k, ql, [3, 3], 0.1)
    with pytest.raises(ValueError, match="sum to"):
        f(q, k, v, cu_q, cu_k, [3, 3], [3, 5], 0.1)
    with pytest.raises(ValueError, match="share a float dtype"):
        f(q, k.half(), v, cu_q, cu_k, ql, kl, 0.1)
    with pytest.raises(ValueError, match="int32"):
        f(q, k, v, cu_q.long(), cu_k, ql, kl, 0.1)
    with pytest.raises(ValueError, match="shapes disagree"):
        f(q, k[..., :16], v, cu_q, cu_k, ql, kl, 0.1)


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_prefill_launch_choice(monkeypatch):
    """Our prefill kernel runs on Hopper-class GPUs only (its launch needs ~227 KB of shared memory and
    TMA); K and V go through TMA from TMA_FROM_KEYS keys, and only for tensors TMA can read (on a GPU)."""
    from deepseek_v2.kernels import launch, prefill_triton
    bf16 = torch.bfloat16
    assert not prefill_triton.default_config(192, bf16, prefill_triton.TMA_FROM_KEYS - 1)["TMA"]
    assert prefill_triton.default_config(192, bf16, prefill_triton.TMA_FROM_KEYS)["TMA"]
    assert "TMA" not in prefill_triton.default_config(192, torch.float32, 1 << 17)
    assert not prefill_triton._tma_fits(torch.empty(64, 16, 192, dtype=bf16))  # a CPU tensor
    for capability, expected in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True), ((12, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        launch.hopper_class.cache_clear()
        assert launch.hopper_class(torch.device("cuda", 3)) is expected
    assert launch.hopper_class(torch.device("cpu")) is False
    launch.hopper_class.cache_clear()


# ---------------------------------------------------------------- FP8 GEMMs

def fp8_matrix(N, K, offset=(0, 0), seed=0):
    torch.manual_seed(seed)
    return quantize_weight(torch.randn(N, K) * torch.logspace(-1, 1, K) / K**0.5, offset)


FP8_LINEAR_CASES = [  # (M, N, K, block_offset, bias, dtype, config)
    (1, 96, 64, (0, 0), False, torch.float32, None),                        # one partial block, decode tier
    (5, 300, 260, (0, 0), True, torch.bfloat16, SMALL),                     # ragged blocks both ways, bias
    (37, 256, 384, (0, 0), False, torch.bfloat16, dict(SMALL, BLOCK_M=64, BLOCK_N=64)),
    (3, 150, 200, (100, 0), False, torch.float32, SMALL),                  # a row part starting inside a block
    (4, 64, 190, (0, 70), True, torch.float16, SMALL),                     # a column part: groups start at -70
    (130, 64, 128, (0, 0), False, torch.float32, None),                    # x quantized first (quantize_activation)
    (6, 150, 190, (0, 70), True, torch.bfloat16, dict(SMALL, FUSED=False)),  # that, in a part inside a block
    (2, 96, 600, (0, 70), True, torch.float32, dict(SMALL, PIECES=3)),     # K in pieces (partials summed), bias
    (3, 64, 384, (0, 0), False, torch.bfloat16, dict(SMALL, PIECES=8)),    # more pieces asked than groups
    (40, 256, 384, (0, 0), True, torch.bfloat16,                           # pieces of wide row blocks, x quantized first
     dict(SMALL, BLOCK_M=32, BLOCK_N=64, PIECES=2, FUSED=False)),
]


@pytest.mark.parametrize("case", range(len(FP8_LINEAR_CASES)))
def test_fp8_linear_matches_ref(tk, case):
    """The fused activation quantization gives the reference's e4m3 values bit for bit, so what is left
    is fp32 summation order: fp32 tolerance in fp32, one rounding of the output otherwise."""
    M, N, K, offset, bias, dtype, config = FP8_LINEAR_CASES[case]
    w, s = fp8_matrix(N, K, offset, seed=case)
    x = (torch.randn(M, K + 3) * 4).to(dtype)[:, 3:]  # strided rows
    b = torch.randn(N).to(dtype) if bias else None
    y = tk.fp8_linear.linear(x, w, b, s, offset, config=config)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close(y, reference.linear(x, w, b, s, offset), dtype)


@pytest.mark.parametrize("case", [7, 8, 9])  # K in pieces: with bias, more pieces asked than groups, 32-row blocks
def test_fp8_linear_sums_its_pieces_bit_for_bit(tk, case, monkeypatch):
    """SUM_PIECES_IN_GEMM: the last piece of a tile to arrive sums the pieces' fp32 partials (+ bias) itself,
    sum_pieces' arithmetic bit for bit, and leaves every counter at zero for the next launch."""
    M, N, K, offset, bias, dtype, config = FP8_LINEAR_CASES[case]
    w, s = fp8_matrix(N, K, offset, seed=case)
    x = (torch.randn(M, K) * 4).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    monkeypatch.setattr(tk.fp8_linear, "SUM_PIECES_IN_GEMM", False)
    apart = tk.fp8_linear.linear(x, w, b, s, offset, config=config)
    monkeypatch.setattr(tk.fp8_linear, "SUM_PIECES_IN_GEMM", True)
    launches = []
    monkeypatch.setattr(tk.fp8_linear, "sum_pieces", lambda *args: launches.append(args))
    for _ in range(2):
        assert torch.equal(tk.fp8_linear.linear(x, w, b, s, offset, config=config), apart)
        assert not tk.launch.arrival_counters(x.device, "fp8 pieces", tk.fp8_linear._COUNTERS).any()
    assert launches == []


@pytest.mark.parametrize("case", [
    (1, 256, 200, 96, torch.bfloat16, None),                     # V2-Lite's shape in small: one row, ragged K
    (3, 128, 384, 40, torch.float32, dict(SMALL, PIECES=3)),     # K in pieces: the plain columns' partials too
    (2, 64, 256, 70, torch.float16, dict(SMALL, PIECES=2, SUM=True)),  # the pieces summed in the GEMM
    (20, 256, 128, 64, torch.bfloat16, None),                    # past FUSED_MAX_M: two products side by side
    (20, 256, 128, 64, torch.bfloat16, dict(MAX_M=512)),         # ... or in one launch, x quantized first
    (70, 128, 384, 40, torch.float32, dict(MAX_M=512)),          # that, with K in pieces (129-512 rows' tier)
    (1, 96, 128, 32, torch.bfloat16, None),                      # N not whole column blocks: side by side
])
def test_fp8_linear_with_plain_rows(tk, case, monkeypatch):
    """plain_rows: a second output, x times a weight in its own dtype, unquantized (MLA's bf16
    kv_a_proj_with_mqa beside its FP8 query projection): the reference's values, in the FP8 GEMM's launch
    where it can take them (one launch, no F.linear: the two outputs views of one) and beside it where not
    (two tensors, no copy into one)."""
    M, N, K, N2, dtype, config = case
    config = dict(config) if config else None
    if config and config.pop("SUM", False):
        monkeypatch.setattr(tk.fp8_linear, "SUM_PIECES_IN_GEMM", True)
    if config and "MAX_M" in config:  # PLAIN_ROWS_IN_LAUNCH_MAX_M: the default launch config
        monkeypatch.setattr(tk.fp8_linear, "PLAIN_ROWS_IN_LAUNCH_MAX_M", config.pop("MAX_M"))
        config = None
    w, s = fp8_matrix(N, K, seed=N2)
    plain = (torch.randn(N2, K) / K**0.5).to(dtype)
    x = (torch.randn(2, M, K) * 3).to(dtype)
    dense = []
    real_linear = F.linear
    monkeypatch.setattr(tk.fp8_linear.F, "linear", lambda *a: dense.append(1) or real_linear(*a))
    y, y2 = tk.fp8_linear.linear(x, w, None, s, plain_rows=plain, config=config)
    monkeypatch.setattr(tk.fp8_linear.F, "linear", real_linear)
    want, want2 = reference.linear(x, w, None, s, plain_rows=plain)
    assert y.shape == (2, M, N) and y2.shape == (2, M, N2) and y.dtype == y2.dtype == dtype
    assert_close(y, want, dtype)
    assert_close(y2, F.linear(x.float(), plain.float()), dtype)
    assert torch.equal(want2, F.linear(x, plain))
    one_launch = 2 * M <= max(tk.fp8_linear.FUSED_MAX_M, tk.fp8_linear.PLAIN_ROWS_IN_LAUNCH_MAX_M) and N % 64 == 0
    assert dense == ([] if one_launch else [1])
    assert (y2.data_ptr() == y.data_ptr() + N * y.element_size()) == one_launch  # views of one output
    if config and config.get("PIECES") and tk.fp8_linear.SUM_PIECES_IN_GEMM:
        assert not tk.launch.arrival_counters(x.device, "fp8 pieces", tk.fp8_linear._COUNTERS).any()
    with pytest.raises(ValueError, match="plain_rows"):
        tk.fp8_linear.linear(x, w, None, s, plain_rows=plain[:, 1:])


@pytest.mark.parametrize("case", [5, 6, 9])  # x quantized first: past FUSED_MAX_M rows, or FUSED=False
def test_fp8_linear_reads_x_quantized_already(tk, case, monkeypatch):
    """x_fp8 (x quantized once for several GEMMs, by the router's launch): bit for bit the output of
    quantizing x in linear, with no quantize_activation launch, from buffers of 128 rows (x's first, the
    rest never read: NaN here) with M-major scales, torch._scaled_mm's layout; a part whose groups start
    inside a block quantizes x itself (its groups are not x_fp8's); a buffer of the wrong shape refused."""
    from deepseek_v2.kernels.fp8 import quantized_buffers
    M, N, K, offset, bias, dtype, config = FP8_LINEAR_CASES[case]
    w, s = fp8_matrix(N, K, offset, seed=case)
    x = (torch.randn(M, K) * 4).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    apart = tk.fp8_linear.linear(x, w, b, s, offset, config=config)
    q, scales = quantized_buffers(M, K, x.device, pad_rows=128)
    q.view(torch.uint8).fill_(0x7F)  # e4m3 NaN
    scales.fill_(float("nan"))
    tk.fp8_linear.quantize_activation(x, out=(q[:M], scales[:M]))
    quantized = []
    real = tk.fp8_linear.quantize_activation
    monkeypatch.setattr(tk.fp8_linear, "quantize_activation", lambda *a, **kw: quantized.append(1) or real(*a, **kw))
    assert torch.equal(tk.fp8_linear.linear(x, w, b, s, offset, config=config, x_fp8=(q, scales)), apart)
    assert quantized == ([1] if offset[1] else [])
    with pytest.raises(ValueError, match="x_fp8"):
        tk.fp8_linear.linear(x, w, b, s, offset, config=config, x_fp8=(q[:, 1:], scales))
    with pytest.raises(ValueError, match="x_fp8 holds"):
        tk.fp8_linear.linear(x, w, b, s, offset, config=config, x_fp8=(q[:M - 1], scales[:M - 1]))


def test_fp8_linear_reads_x_quantized_at_the_zero_columns_width(tk):
    """A weight widened with zero columns (fp8.pad_columns: 200 -> 512) reads x_fp8 at that width (the
    activation's launch quantizes at it, zeros past K), the same output as quantizing x itself."""
    from deepseek_v2.kernels.fp8 import pad_columns, quantize_activation, quantized_buffers
    w, s = pad_columns(*fp8_matrix(64, 200, seed=3))
    x = torch.randn(40, 200).to(torch.bfloat16)
    q, scales = quantized_buffers(40, 512, x.device, pad_rows=128)
    q[:40], scales[:40] = quantize_activation(torch.nn.functional.pad(x, (0, 312)))
    assert torch.equal(tk.fp8_linear.linear(x, w, None, s, x_fp8=(q, scales)), tk.fp8_linear.linear(x, w, None, s))
    with pytest.raises(ValueError, match="columns wide"):
        tk.fp8_linear.linear(x, w, None, s, x_fp8=quantized_buffers(40, 384, x.device))


@pytest.mark.parametrize("case", [0, 1, 2, 5, 7, 8, 9])  # cases with tiles inside one weight block row
def test_fp8_linear_with_swapped_operands(tk, case, monkeypatch):
    """SWAP_AB (the products as w^T x^T, so that Hopper's warpgroup MMA takes a few rows in e4m3): the
    reference's product, as the unswapped kernel gives it; the default up to SWAP_AB_MAX_M rows, with plain
    rows in the launch too; refused for a part whose tiles straddle two weight block rows."""
    M, N, K, offset, bias, dtype, config = FP8_LINEAR_CASES[case]
    w, s = fp8_matrix(N, K, offset, seed=case)
    x = (torch.randn(M, K) * 4).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    config = dict(config or tk.fp8_linear.default_config(M, N, -(-K // 128)))
    straight = tk.fp8_linear.linear(x, w, b, s, offset, config=dict(config, SWAP_AB=False))
    swapped = tk.fp8_linear.linear(x, w, b, s, offset, config=dict(config, SWAP_AB=True))
    assert_close(swapped, reference.linear(x, w, b, s, offset), dtype)
    assert_close(swapped, straight, dtype)
    launches = []
    kernel = tk.fp8_linear._fp8_linear_kernel
    monkeypatch.setattr(tk.fp8_linear, "_fp8_linear_kernel", type("Spy", (), {"__getitem__": lambda self, grid: (
        lambda *args, **kwargs: launches.append(kwargs["SWAP_AB"]) or kernel[grid](*args, **kwargs))})())
    monkeypatch.setattr(tk.fp8_linear, "SWAP_AB_MAX_M", 16)
    w, s = fp8_matrix(128, K, seed=case)
    plain = torch.randn(64, K).to(dtype) / K**0.5
    for got, want in zip(tk.fp8_linear.linear(x[:1], w, None, s, plain_rows=plain),
                         reference.linear(x[:1], w, None, s, plain_rows=plain)):
        assert_close(got, want, dtype)
    assert launches == [True]
    w_part, s_part = fp8_matrix(N, K, (64, 0))
    with pytest.raises(ValueError, match="SWAP_AB"):
        tk.fp8_linear.linear(x, w_part, None, s_part, (64, 0), config=dict(config, SWAP_AB=True))


def test_fp8_linear_views_and_leading_dims(tk):
    """The weight as a row view of a fused matrix (fuse_rows), x [B, S, K]; without scales: F.linear."""
    w, s = fp8_matrix(256, 128, seed=9)
    x = torch.randn(2, 3, 128)
    y = tk.fp8_linear.linear(x, w[128:], None, s[1:], config=SMALL)
    assert y.shape == (2, 3, 128)
    assert_close(y, reference.linear(x, w[128:], None, s[1:]), torch.float32)
    dense = torch.randn(8, 128)
    assert torch.equal(tk.fp8_linear.linear(x, dense), F.linear(x, dense))


def test_fp8_linear_zero_padded_weight(tk):
    """fp8.pad_columns: the layer's parameters keep their shapes and values (views of storage padded to
    512 columns, zeros after K); quantize_activation at the padded width gives the unpadded e4m3 values bit
    for bit and zeros after them, and the layer's output is unchanged (here by the Triton kernel; on a GPU,
    from 128 rows, cuBLAS's at the padded width: tests/gpu/test_fp8_gpu.py)."""
    from deepseek_v2.kernels.fp8 import pad_columns, zero_padded
    w, s = fp8_matrix(256, 704, seed=11)  # K = 5.5 blocks, not a multiple of 512
    pw, ps = pad_columns(w, s)
    assert pw.shape == w.shape and ps.shape == s.shape and pw.zero_columns_to == 1024
    assert torch.equal(pw.view(torch.uint8), w.view(torch.uint8)) and torch.equal(ps, s)
    wide, wide_scale = zero_padded(pw, ps)
    assert wide.shape == (256, 1024) and wide_scale.shape == (2, 8)
    assert not wide[:, 704:].float().any() and zero_padded(w, s)[0] is w
    x = (torch.randn(130, 704) * 3).to(torch.bfloat16)
    q, xs = tk.fp8_linear.quantize_activation(x, pad_rows=128, scales_column_major=True, width=1024)
    q_ref, xs_ref = quantize_activation(x)
    assert q.shape == (256, 1024) and xs.shape == (256, 8)
    assert torch.equal(q[:130, :704].view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(xs[:130, :6], xs_ref)
    assert not q[:, 704:].float().any() and not q[130:].float().any()
    assert_close(tk.fp8_linear.linear(x, pw, None, ps), reference.linear(x, w, None, s), torch.bfloat16)
    with pytest.raises(ValueError, match="width"):
        tk.fp8_linear.quantize_activation(x, width=1000)


def test_fp8_linear_rejects_bad_inputs(tk):
    w, s = fp8_matrix(64, 160)
    x = torch.randn(2, 160)
    bad = [dict(weight=w.float()), dict(weight_scale_inv=s[:, :1]), dict(weight_scale_inv=s.double()),
           dict(x=torch.randn(2, 150)), dict(x=x.int()), dict(bias=torch.randn(63)), dict(block_offset=(0, 128)),
           dict(x=torch.randn(160, 2).t())]
    for change in bad:
        args = dict(x=x, weight=w, bias=None, weight_scale_inv=s)
        args.update(change)
        with pytest.raises(ValueError, match="fp8 linear"):
            tk.fp8_linear.linear(**args)


def fp8_experts(w13, w2):
    """Routed experts in FP8 as RoutedExperts.to_fp8 stores them."""
    I = w2.shape[2]
    (g, gs), (u, us), (d, ds) = (quantize_weight(w) for w in (w13[:, :I], w13[:, I:], w2))
    return torch.cat([g, u], 1), d, torch.cat([gs, us], 1), ds


FP8_MOE_CASES = [0, 1, 2, 3, 6, 7]  # MOE_CASES rows: one token, decode, ragged K and N, bf16 64-row tier, top-6


@pytest.mark.parametrize("missing", [0.0, 0.4])
@pytest.mark.parametrize("case", FP8_MOE_CASES)
def test_fused_moe_fp8_matches_ref(tk, case, missing):
    """FP8 experts (e4m3 with block scales, every block partial here): the kernel's in-register
    quantization of x and of the intermediate against the reference's; -1 picks still add zero."""
    T, E, K, D, I, config, dtype = MOE_CASES[case]
    x, w13, w2, topk_weights, topk_ids = moe_inputs(T, E, K, D, I, dtype, seed=500 + case)
    topk_ids = drop_picks(topk_ids, missing, seed=case)
    q13, q2, s13, s2 = fp8_experts(w13.float(), w2.float())
    y = tk.moe.fused_moe(x, q13, q2, topk_weights, topk_ids, s13, s2, config=config)
    assert y.shape == x.shape and y.dtype == dtype
    assert (y[(topk_ids == -1).all(dim=1)] == 0).all()
    assert_close(y, reference.moe(x, q13, q2, topk_weights, topk_ids, s13, s2), dtype)


def test_fused_moe_fp8_blocks_at_real_sizes(tk):
    """I = 2 x 128 + 64 and D = 3 x 128 + 32: several block rows and columns, the up_proj's scales after
    the gate_proj's, ragged last blocks."""
    T, E, K, D, I = 6, 4, 2, 416, 320
    x, w13, w2, topk_weights, topk_ids = moe_inputs(T, E, K, D, I, torch.bfloat16, seed=77)
    q13, q2, s13, s2 = fp8_experts(w13.float(), w2.float())
    y = tk.moe.fused_moe(x, q13, q2, topk_weights, topk_ids, s13, s2)
    assert_close(y, reference.moe(x, q13, q2, topk_weights, topk_ids, s13, s2), torch.bfloat16)


def test_fused_moe_fp8_rejects_bad_scales(tk):
    x, w13, w2, topk_weights, topk_ids = moe_inputs(4, 4, 2, 160, 96, torch.bfloat16, seed=6)
    q13, q2, s13, s2 = fp8_experts(w13.float(), w2.float())
    for args in [(q13, q2, s13, None), (q13, q2, s13[:, :1], s2), (w13, w2, s13, s2), (q13, q2, s13.double(), s2)]:
        with pytest.raises(ValueError, match="fused_moe"):
            tk.moe.fused_moe(x, args[0], args[1], topk_weights, topk_ids, args[2], args[3])


# ---------------------------------------------------------------- an sm_90 (H100/H200) build, no GPU needed

@pytest.mark.skipif(not HAVE_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="needs triton with its NVIDIA backend")
def test_kernels_build_for_sm90():
    """Every kernel variant the wrappers launch at the V2 / V2-Lite shapes compiles for sm_90 (with
    the bundled ptxas, no GPU), fits in shared memory and spills no registers: the FP8 ones (FP8
    linear layers and their activation quantization, FP8 experts, decode over the FP8 cache), the
    second launch that sums the FP8 GEMM's pieces of K at one row, and prefill attention included;
    prefill attention and the MoE's thin row blocks with swapped operands use Hopper's warpgroup MMA."""
    from sm90_build import run_in_subprocess
    results = run_in_subprocess("decode")
    assert {r["kernel"] for r in results} == {"_mla_decode_split_kernel", "_mla_decode_merge_kernel",
                                              "_merge_project_kernel",
                                              "_moe_align_kernel", "_moe_gemm_kernel", "_combine_kernel",
                                              "_fp8_linear_kernel",
                                              "_quantize_kernel", "_sum_pieces_kernel", "_prefill_attention_kernel"}
    assert {(r["kernel"], r["config"].get("FP8_W", r["config"].get("FP8_CACHE"))) for r in results} >= {
        ("_moe_gemm_kernel", "True"), ("_mla_decode_split_kernel", "True")}
    assert any(r["config"].get("SUM_ARRIVED") == "True" for r in results)
    assert {r["config"]["FP8_CACHE"] for r in results if r["config"].get("PREFETCH_CACHE") == "True"} == {"True",
                                                                                                        "False"}
    assert {(r["config"]["TMA"], r["num_warps"]) for r in results  # an FP8 cache: 4 warps past one program an SM
            if r["kernel"] == "_mla_decode_split_kernel" and r["config"]["FP8_CACHE"] == "True"
            and r["config"]["FP16_DOTS"] == "True"} == {("False", 8), ("False", 4), ("True", 4), ("True", 8)}
    # MLA decode's tiles in flight (mla_decode.TILE_BUFFERS): a tile's page comes from a load in the same loop, and
    # Triton's pipeliner shares num_stages between the two loads, so (num_stages - 1) // 2 buffers (one at least);
    # an FP8 cache's latent comes as 16-bit pairs of e4m3 values, [32 tokens, 256 pairs]
    depths = set()
    for r in results:
        if r["kernel"] == "_mla_decode_split_kernel" and r["num_stages"] >= 2 and r["config"]["BLOCK_N"] == "32":
            latent = "32x256" if r["config"]["FP8_CACHE"] == "True" else "32x512"
            depths.add((r["tile_buffers"].get(latent), r["config"]["TMA"], r["config"]["FP8_CACHE"]))
            assert r["tile_buffers"][latent] == max(1, (r["num_stages"] - 1) // 2), r
            assert r["tile_buffers"]["32x64"] == max(1, (r["num_stages"] - 1) // 2), r
            if r["config"]["FP8_CACHE"] == "False" and r["config"]["TMA"] == "True":  # two programs an SM, one at 3
                assert r["resident"] == (1 if r["num_stages"] >= 7 else 2), r
    assert depths >= {(n, tma, fp8) for n in (1, 2, 3) for tma in ("True", "False") for fp8 in ("True", "False")}
    # an FP8 cache's tiles with fp16 dots: the latent's pairs through ldmatrix, no one-byte shared loads
    fp16_dots = [r for r in results if r["config"].get("FP16_DOTS") == "True" and r["main_loop"]]
    assert fp16_dots and all(r["main_loop"]["byte shared loads"] == 0 for r in fp16_dots), fp16_dots
    assert {(r["kernel"], r["config"].get("HAS_PLAIN")) for r in results if r["config"].get("PREFETCH") == "True"} == {
        ("_fp8_linear_kernel", "True"), ("_fp8_linear_kernel", "False"), ("_merge_project_kernel", None),
        ("_moe_gemm_kernel", None)}
    assert any(r["config"].get("QUANTIZE_OUT") == "True" and r["config"]["SWAP_AB"] == "True" for r in results)
    assert {(r["config"]["FP8_W"], r["config"]["BLOCK_M"]) for r in results
            if r["kernel"] == "_moe_gemm_kernel" and r["config"]["SWAP_AB"] == "True"} >= {
        ("True", "16"), ("False", "16"), ("True", "32")}
    assert any(r["kernel"] == "_fp8_linear_kernel" and r["config"]["SWAP_AB"] == "True" for r in results)
    # FP8 GEMMs whose tiles lie in one weight block row scale each K block's product by one value a row (the
    # rows' scales times the block's): about one fp32 multiply-add an accumulator value a step, where scales
    # taken an element (an fp32 multiply for the scale, another for the product) cost two
    scaled_once = 0
    for r in results:
        c = r["config"]
        fp8_gemm = c.get("FP8_W") == "True" or (c.get("ONE_SCALE_ROW") == "True" and c["A_FP8"] == "True")
        if r["main_loop"] and fp8_gemm:
            values = int(c["BLOCK_M"]) * int(c["BLOCK_N"]) * (2 if c.get("GATE_UP") == "True" else 1)
            assert r["main_loop"]["fp32 math"] <= 1.5 * values // (32 * r["num_warps"]), r
            scaled_once += 1
    assert scaled_once >= 10
    # programmatic dependent launch at few rows: every kernel but the one built here for many tokens only
    assert {r["kernel"] for r in results if r["launch_pdl"]} == {r["kernel"] for r in results} - {"_combine_kernel"}
    for r in results:
        assert r["shared"] <= 227 * 1024, r        # the H100/H200 limit per block
        # (MLA decode over an FP8 cache with its dots in bf16, not the default, in 4 warps: a few spilled bytes)
        bf16_dots_4_warps = r["kernel"] == "_mla_decode_split_kernel" and r["config"]["FP8_CACHE"] == "True" \
            and r["config"]["FP16_DOTS"] == "False" and r["num_warps"] == 4
        assert r["spill_bytes"] in (0, None) or (bf16_dots_4_warps and r["spill_bytes"] <= 64), r
        if r["kernel"] == "_prefill_attention_kernel":
            assert r["wgmma"] and r["async_copies"] and r["tma"] == (r["config"]["TMA"] == "True"), r
        # programmatic dependent launch (few rows): launched so, and waiting for the kernel before it first
        pdl = r["config"].get("PDL") == "True"
        prefetch_cache = r["config"].get("PREFETCH_CACHE") == "True"  # reads the block table before the wait
        assert r["launch_pdl"] == pdl and r["waits_for_prior_kernels"] == (pdl and not prefetch_cache), r
        # launch.PREFETCH_WEIGHTS: the weights asked of L2 ahead of that wait, no load or store before it
        assert r["prefetches_before_waiting"] == (r["config"].get("PREFETCH") == "True" or prefetch_cache), r
        if r["config"].get("SWAP_AB") == "True":  # on wgmma
            assert r["wgmma"], r
