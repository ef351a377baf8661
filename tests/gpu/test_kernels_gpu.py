# Run on a CUDA machine: pytest -q tests/gpu/test_kernels_gpu.py  (skipped without a GPU; ~1-2 min on an H200)
"""The MLA decode and fused MoE Triton kernels against the references at the real DeepSeek-V2
and V2-Lite shapes, in bf16, plus CUDA-graph capture. Metric: ||out - ref|| / ||ref|| < 1e-2.

The wrappers allocate their own outputs, so instead of poisoning an out buffer we fill freed
device memory with NaN before each run: an output row a kernel forgets to write then shows up.
"""

import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA GPU and compiled (not interpreted) Triton", allow_module_level=True)
pytest.importorskip("triton")

from deepseek_v2.kernels.mla_decode import mla_decode  # noqa: E402
from deepseek_v2.kernels import reference  # noqa: E402
from deepseek_v2.kernels.moe import fused_moe  # noqa: E402
from deepseek_v2.kernels.moe_align import moe_align  # noqa: E402

from gpu_memory import poison_free_memory  # noqa: E402

DEVICE = "cuda"
R, P, BLOCK_SIZE = 512, 64, 64
SCALE = 0.11472139  # 192^-0.5 * mscale^2 for V2's YaRN settings


def rel_error(out, ref):
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm()).item()


def paged_cache(seq_lens, max_len, generator):
    """A bf16 latent cache with every sequence's blocks at random places; spare table entries junk."""
    max_blocks = -(-max_len // BLOCK_SIZE)
    needed = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(needed) + 8
    kv_cache = torch.randn(num_blocks, BLOCK_SIZE, R + P, device=DEVICE, dtype=torch.bfloat16,
                           generator=generator)
    perm = torch.randperm(num_blocks, device=DEVICE, generator=generator).int()
    block_tables = torch.full((len(seq_lens), max_blocks), 2**30, dtype=torch.int32, device=DEVICE)
    start = 0
    for n, k in enumerate(needed):
        block_tables[n, :k] = perm[start:start + k]
        start += k
    return kv_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)


def mla_inputs(heads, batch, max_len, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=g, device=DEVICE).tolist()
    edges = [max_len, 1, 64, 65, 63, 128, 4097]  # full length, one token, block edges, mid-block
    lens[:len(edges)] = [min(e, max_len) for e in edges][:batch]
    kv_cache, block_tables, seq_lens = paged_cache(lens, max_len, g)
    q_lat = torch.randn(batch, heads, R, device=DEVICE, dtype=torch.bfloat16, generator=g)
    q_pe = torch.randn(batch, heads, P, device=DEVICE, dtype=torch.bfloat16, generator=g)
    return q_lat, q_pe, kv_cache, block_tables, seq_lens


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("batch,max_len", [(1, 32768), (8, 32768), (64, 8192)])
def test_mla_decode(heads, batch, max_len, tma):
    """With the whole tiles read by pointers and through tensor descriptors (mla_decode.TMA)."""
    args = mla_inputs(heads, batch, max_len, seed=heads * 1000 + batch)
    poison_free_memory()
    out = mla_decode(*args, SCALE, tma=tma)
    assert rel_error(out, reference.mla_decode(*args, SCALE)) < 1e-2


@pytest.mark.parametrize("buffers", [2, 3])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("batch,max_len", [(1, 4096), (64, 8192)])
def test_mla_decode_more_tiles_in_flight(batch, max_len, tma, buffers, monkeypatch):
    """Two and three tiles in flight a program (mla_decode.TILE_BUFFERS: a deeper software pipeline)."""
    from deepseek_v2.kernels import mla_decode as module
    monkeypatch.setattr(module, "TILE_BUFFERS", buffers)
    args = mla_inputs(16, batch, max_len, seed=buffers * 100 + batch)
    poison_free_memory()
    out = mla_decode(*args, SCALE, tma=tma)
    assert rel_error(out, reference.mla_decode(*args, SCALE)) < 1e-2


@pytest.mark.parametrize("num_kv_splits", [1, 3, 64])
def test_mla_decode_explicit_splits(num_kv_splits):
    args = mla_inputs(16, 8, 5000, seed=num_kv_splits)
    poison_free_memory()
    out = mla_decode(*args, SCALE, num_kv_splits=num_kv_splits)
    assert rel_error(out, reference.mla_decode(*args, SCALE)) < 1e-2


@pytest.mark.parametrize("in_merge,block_v", [(False, None), (True, 16), (True, 32)])
@pytest.mark.parametrize("heads,batch", [(16, 1), (128, 1), (16, 8)])
def test_mla_decode_projects_by_w_uv(heads, batch, in_merge, block_v, monkeypatch):
    """W_UV's product after the merge (a batched matmul) or in the merge's launch
    (PROJECT_IN_MERGE_MAX_SEQS, its programs writing 16 or 32 value columns), against the reference; W_UV
    a strided view as the model slices it."""
    from deepseek_v2.kernels import mla_decode as module
    monkeypatch.setattr(module, "PROJECT_IN_MERGE_MAX_SEQS", 8 if in_merge else 0)
    if block_v:
        monkeypatch.setattr(module, "_PROJECT_BLOCK_V", block_v)
    args = mla_inputs(heads, batch, 4096, seed=heads + batch)
    g = torch.Generator(device=DEVICE).manual_seed(5)
    w_kv_b = torch.randn(heads, 256, R, device=DEVICE, dtype=torch.bfloat16, generator=g).mul_(R**-0.5)
    poison_free_memory()
    out = mla_decode(*args, SCALE, w_uv=w_kv_b[:, 128:])
    assert out.shape == (batch, heads, 128)
    assert rel_error(out, reference.mla_decode(*args, SCALE, w_uv=w_kv_b[:, 128:])) < 1e-2


@pytest.mark.parametrize("heads,batch", [(16, 1), (128, 1), (16, 16)])
def test_absorb_query_in_our_launch(heads, batch, monkeypatch):
    """W_UK's product in our launch (ABSORB_MAX_SEQS) against the batched matmul, in a CUDA graph too (its
    launch asks for programmatic dependent launch at these rows); q_nope and w_uk strided as the model
    slices them. Both round fp32 sums once, in different orders: a bf16 ulp apart at most."""
    from deepseek_v2.kernels import absorb
    monkeypatch.setattr(absorb, "ABSORB_MAX_SEQS", 16)
    g = torch.Generator(device=DEVICE).manual_seed(heads + batch)
    w_uk = torch.randn(heads, 256, R, device=DEVICE, dtype=torch.bfloat16, generator=g).mul_(R**-0.5)[:, :128]
    q = torch.randn(batch, heads, 192, device=DEVICE, dtype=torch.bfloat16, generator=g)
    want = reference.absorb_query(q[..., :128].float(), w_uk.float())
    poison_free_memory()
    out = absorb.absorb_query(q[..., :128], w_uk)
    assert ((out.float() - want).abs() <= want.abs() * 2**-8 + 1e-4).all()
    graph, replayed = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        replayed = absorb.absorb_query(q[..., :128], w_uk)
    q.normal_(generator=g)
    graph.replay()
    assert torch.equal(replayed, absorb.absorb_query(q[..., :128], w_uk))


@pytest.mark.parametrize("tma", [False, True])
def test_mla_decode_cuda_graph(tma):
    """Captured once, replayed on new queries and new lengths in the same buffers."""
    q_lat, q_pe, kv_cache, block_tables, seq_lens = mla_inputs(16, 8, 4096, seed=7)
    mla_decode(q_lat, q_pe, kv_cache, block_tables, seq_lens, SCALE, tma=tma)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode(q_lat, q_pe, kv_cache, block_tables, seq_lens, SCALE, tma=tma)
    q_lat.normal_()
    shorter = torch.tensor([4096, 1, 100, 2000, 64, 65, 3000, 17], dtype=torch.int32, device=DEVICE)
    seq_lens.copy_(torch.minimum(seq_lens, shorter))  # the block tables only cover the old lengths
    graph.replay()
    assert rel_error(out, reference.mla_decode(q_lat, q_pe, kv_cache, block_tables, seq_lens, SCALE)) < 1e-2


MOE_SHAPES = {"v2-lite": (64, 2048, 1408, 6), "v2": (160, 5120, 1536, 6)}  # E, D, I, K


@pytest.fixture(scope="module", params=list(MOE_SHAPES))
def moe_weights(request):
    E, D, I, K = MOE_SHAPES[request.param]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    w13 = torch.randn(E, 2 * I, D, device=DEVICE, dtype=torch.bfloat16, generator=g).mul_(D**-0.5)
    w2 = torch.randn(E, D, I, device=DEVICE, dtype=torch.bfloat16, generator=g).mul_(I**-0.5)
    yield w13, w2, K
    del w13, w2
    torch.cuda.empty_cache()


def routed_tokens(T, E, D, K, seed, missing=0.0):
    """x, topk_weights, topk_ids; with missing > 0, about that fraction of the picks is -1 (an expert
    on another rank), the first token of several has none left here, the last keeps its first pick."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
    logits = torch.randn(T, E, device=DEVICE, generator=g)
    topk_weights, topk_ids = logits.softmax(dim=-1).topk(K)
    if missing:
        drop = torch.rand(T, K, device=DEVICE, generator=g) < missing
        if T > 1:
            drop[0] = True
        drop[-1, 0] = False
        topk_ids = topk_ids.masked_fill(drop, -1)
    return x, topk_weights, topk_ids


@pytest.mark.parametrize("tma", [False, True])  # the weights' tiles through tensor descriptors (moe.TMA)
@pytest.mark.parametrize("swap", [False, True])  # thin row blocks with swapped operands (moe.SWAP_AB_MAX_BLOCK_M)
@pytest.mark.parametrize("missing", [0.0, 0.5])
@pytest.mark.parametrize("T", [1, 8, 256, 4096])
def test_moe(moe_weights, T, missing, swap, tma, monkeypatch):
    from deepseek_v2.kernels import moe
    monkeypatch.setattr(moe, "SWAP_AB_MAX_BLOCK_M", 32 if swap else 0)
    monkeypatch.setattr(moe, "TMA", tma)
    w13, w2, K = moe_weights
    x, topk_weights, topk_ids = routed_tokens(T, w13.shape[0], w13.shape[2], K, seed=T, missing=missing)
    poison_free_memory()
    y = fused_moe(x, w13, w2, topk_weights, topk_ids)
    assert rel_error(y, reference.moe(x, w13, w2, topk_weights, topk_ids)) < 1e-2
    assert (y[(topk_ids == -1).all(dim=1)] == 0).all()  # no pick here: exactly zero, not poison


@pytest.mark.parametrize("T", [1, 7, 64])
def test_moe_picks_summed_in_the_down_gemm(moe_weights, T, monkeypatch):
    """Each token's picks summed by the down GEMM's last program to store one (COMBINE_IN_GEMM_MAX_TOKENS):
    bit for bit the separate combine launch, with -1 picks; then captured in a CUDA graph and replayed on
    new routing twice (the arrival counters are zero again after every launch)."""
    from deepseek_v2.kernels import moe
    w13, w2, K = moe_weights
    x, topk_weights, topk_ids = routed_tokens(T, w13.shape[0], w13.shape[2], K, seed=T, missing=0.3)
    add = torch.randn_like(x)
    apart = fused_moe(x, w13, w2, topk_weights, topk_ids, add=add)
    monkeypatch.setattr(moe, "COMBINE_IN_GEMM_MAX_TOKENS", 64)
    assert torch.equal(fused_moe(x, w13, w2, topk_weights, topk_ids, add=add), apart)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_moe(x, w13, w2, topk_weights, topk_ids, add=add)
    for seed in (T + 1, T + 2):
        monkeypatch.setattr(moe, "COMBINE_IN_GEMM_MAX_TOKENS", 0)
        new = routed_tokens(T, w13.shape[0], w13.shape[2], K, seed=seed, missing=0.3)
        for buffer, value in zip((x, topk_weights, topk_ids), new):
            buffer.copy_(value)
        graph.replay()
        assert torch.equal(y, fused_moe(x, w13, w2, topk_weights, topk_ids, add=add))


@pytest.mark.parametrize("T", [1, 256])
def test_moe_every_pick_elsewhere(moe_weights, T):
    """Every expert picked lives on another rank: exactly zero (the poisoned buffers are written)."""
    w13, w2, K = moe_weights
    x, topk_weights, topk_ids = routed_tokens(T, w13.shape[0], w13.shape[2], K, seed=T)
    topk_ids.fill_(-1)
    poison_free_memory()
    y = fused_moe(x, w13, w2, topk_weights, topk_ids)
    assert (y == 0).all() and (reference.moe(x, w13, w2, topk_weights, topk_ids) == 0).all()


@pytest.mark.parametrize("missing", [0.0, 0.3])
@pytest.mark.parametrize("T,E,block_m", [(4096, 160, 128), (3, 64, 16), (256, 64, 64)])
def test_moe_align(T, E, block_m, missing):
    g = torch.Generator(device=DEVICE).manual_seed(T)
    topk_ids = torch.randn(T, E, device=DEVICE, generator=g).topk(6).indices
    topk_ids[: T // 2, 0] = 5  # one crowded expert
    topk_ids[torch.rand(T, 6, device=DEVICE, generator=g) < missing] = -1
    a = moe_align(topk_ids, E, block_m)
    flat = topk_ids.flatten()
    bucket = torch.where(flat >= 0, flat, E)  # the -1 rows: bucket E
    counts = torch.bincount(bucket, minlength=E + 1)
    padded = (counts + block_m - 1) // block_m * block_m
    assert a.num_padded.item() == padded.sum().item()
    used = a.sorted_ids[: a.num_padded.item()].long()
    real = used < flat.numel()
    assert real.sum().item() == flat.numel()
    block_expert = a.expert_ids[: a.num_padded.item() // block_m].long()
    assert (block_expert.diff() >= 0).all()  # runs in expert order, the -1 rows' last
    block_expert = block_expert.repeat_interleave(block_m)
    assert torch.equal(bucket[used[real]], block_expert[real])  # every row sits in its bucket's blocks


@pytest.mark.parametrize("captured_missing,replayed_missing", [(0.0, 0.0), (0.0, 0.5), (0.5, 0.0)])
def test_fused_moe_cuda_graph(captured_missing, replayed_missing):
    """Replayed on new routing, with -1 picks (experts on another rank) appearing or vanishing."""
    E, D, I, K = MOE_SHAPES["v2-lite"]
    g = torch.Generator(device=DEVICE).manual_seed(1)
    w13 = torch.randn(E, 2 * I, D, device=DEVICE, dtype=torch.bfloat16, generator=g).mul_(D**-0.5)
    w2 = torch.randn(E, D, I, device=DEVICE, dtype=torch.bfloat16, generator=g).mul_(I**-0.5)
    x, topk_weights, topk_ids = routed_tokens(8, E, D, K, seed=2, missing=captured_missing)
    fused_moe(x, w13, w2, topk_weights, topk_ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_moe(x, w13, w2, topk_weights, topk_ids)
    x2, topk_weights2, topk_ids2 = routed_tokens(8, E, D, K, seed=3, missing=replayed_missing)
    x.copy_(x2), topk_weights.copy_(topk_weights2), topk_ids.copy_(topk_ids2)
    graph.replay()
    assert rel_error(y, reference.moe(x, w13, w2, topk_weights, topk_ids)) < 1e-2
    assert (y[(topk_ids == -1).all(dim=1)] == 0).all()


@pytest.mark.parametrize("kernel", ["flash", "triton", "triton-tma"])
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("query_lens, context_lens", [
    ([7, 300, 1, 64, 129], [0, 0, 0, 0, 0]),          # new prompts of mixed lengths
    ([2048, 33, 500], [4096, 1000, 0]),               # chunks after cached context, and a new prompt
    ([1], [5000]),                                    # a one-token chunk after a long context
])
def test_prefill_attention_varlen(kernel, heads, query_lens, context_lens, monkeypatch):
    """All prefill sequences in one call, causal aligned to the end, against the reference's
    per-sequence attention in fp32: flash attention (V padded to 192), and our Triton kernel as the
    dispatch in kernels/prefill.py hands a step to it (TRITON_FROM_KEYS)."""
    from deepseek_v2.kernels import prefill
    monkeypatch.setattr(prefill, "TRITON_FROM_KEYS", 1 if kernel == "triton" else None)
    prefill_attention = prefill.prefill_attention
    if kernel == "triton-tma":  # K and V through tensor descriptors
        config = dict(prefill.prefill_triton.default_config(192), TMA=True)
        prefill_attention = lambda *args: prefill.prefill_triton.prefill_attention(*args, config=config)
    g = torch.Generator(device=DEVICE).manual_seed(sum(query_lens) + heads)
    key_lens = [q + c for q, c in zip(query_lens, context_lens)]
    q = torch.randn(sum(query_lens), heads, 192, device=DEVICE, dtype=torch.bfloat16, generator=g)
    k = torch.randn(sum(key_lens), heads, 192, device=DEVICE, dtype=torch.bfloat16, generator=g)
    v = torch.randn(sum(key_lens), heads, 128, device=DEVICE, dtype=torch.bfloat16, generator=g)
    cu_q = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(key_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    poison_free_memory()
    out = prefill_attention(q, k, v, cu_q, cu_k, query_lens, key_lens, SCALE)
    assert out.shape == (sum(query_lens), heads, 128) and out.dtype == torch.bfloat16
    ref = reference.prefill_attention(q.float(), k.float(), v.float(), cu_q, cu_k, query_lens, key_lens, SCALE)
    assert rel_error(out, ref) < 1e-2


@pytest.mark.parametrize("T", [1, 256])
def test_fused_moe_adds_the_shared_output_as_a_tensor_add_would(T):
    """The shared experts' output added in the combine launch: bit for bit fused_moe(...) + add."""
    E, D, I, K = 64, 2048, 1408, 6
    g = torch.Generator(device=DEVICE).manual_seed(T)
    x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
    w13 = torch.randn(E, 2 * I, D, device=DEVICE, dtype=torch.bfloat16, generator=g) * D**-0.5
    w2 = torch.randn(E, D, I, device=DEVICE, dtype=torch.bfloat16, generator=g) * I**-0.5
    topk_weights, topk_ids = torch.randn(T, E, device=DEVICE, generator=g).softmax(-1).topk(K)
    add = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
    y = fused_moe(x, w13, w2, topk_weights, topk_ids, add=add)
    assert torch.equal(y, fused_moe(x, w13, w2, topk_weights, topk_ids) + add)
    assert rel_error(y, reference.moe(x, w13, w2, topk_weights, topk_ids, add=add)) < 1e-2
