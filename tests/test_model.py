# Run: python -m pytest -q tests/test_model.py
"""The model against Hugging Face transformers' DeepseekV2ForCausalLM (same random weights), the
two MLA paths against each other, and the options the transformers port ignores against values
computed from the official code (modeling_deepseek.py of the DeepSeek-V2 checkpoints)."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import HF_CONFIGS
from deepseek_v2 import DeepseekV2ForCausalLM, ModelArgs
from deepseek_v2.config import RopeScaling
from deepseek_v2.engine.llm_engine import LLMEngine
from deepseek_v2.model import AttentionMetadata
from deepseek_v2.sampling_params import SamplingParams
from deepseek_v2.tokenizer import Tokenizer

DEFAULT_TOKENIZER = "deepseek_v2/default_model"


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers(hf_checkpoint, name):
    hf, path = hf_checkpoint(name)
    ours = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 72))  # yarn configs: positions run past original_max (32)
    with torch.no_grad():
        expected = hf(ids).logits.float()
        got = ours(ids)
    assert got.shape == (2, 72, 96) and got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_greedy_generation_matches_transformers(hf_checkpoint, name):
    hf, path = hf_checkpoint(name)
    ours = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    engine = LLMEngine(ours, Tokenizer.from_pretrained(DEFAULT_TOKENIZER))
    torch.manual_seed(1)
    prompt = torch.randint(2, 96, (12,)).tolist()
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    out = None
    while engine.has_unfinished_requests():
        out = engine.step() or out
    assert out[0].outputs[0].token_ids == expected


def absorbed_logits(model: DeepseekV2ForCausalLM, ids: torch.Tensor, block_size: int = 4) -> torch.Tensor:
    """Logits of every position of one sequence computed through the absorbed (decode) path: all
    tokens are written to a paged cache and each attends as a decode query to its own prefix."""
    a = model.args
    S = ids.numel()
    num_blocks = -(-S // block_size) + 2
    perm = torch.randperm(num_blocks)[: -(-S // block_size)]  # scattered, non-contiguous blocks
    caches = [torch.zeros(num_blocks, block_size, a.kv_cache_dim, dtype=model.dtype) for _ in range(a.num_hidden_layers)]
    pos = torch.arange(S)
    slots = perm[pos // block_size] * block_size + pos % block_size
    attn = AttentionMetadata(slot_mapping=slots, prefill_query_lens=[], prefill_key_lens=[], prefill_key_slots=None,
                             prefill_cu_query=None, prefill_cu_key=None,
                             decode_block_tables=perm.to(torch.int32)[None].expand(S, -1).contiguous(),
                             decode_seq_lens=(pos + 1).to(torch.int32), max_decode_seq_len=S)
    with torch.no_grad():
        return model.compute_logits(model.forward_step(ids, pos, attn, caches))


@pytest.mark.parametrize("name", ["lite-yarn-greedy", "qlora-yarn-scaled"])
def test_expanded_and_absorbed_paths_agree(hf_checkpoint, name):
    _, path = hf_checkpoint(name)
    model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(2)
    ids = torch.randint(0, 96, (45,))
    with torch.no_grad():
        expanded = model(ids[None])[0]
    absorbed = absorbed_logits(model, ids)
    assert rel_err(absorbed, expanded) < 1e-5
    # In bf16 they round differently but must stay close.
    model16 = model.to(torch.bfloat16)
    with torch.no_grad():
        expanded16 = model16(ids[None])[0]
    assert rel_err(absorbed_logits(model16, ids), expanded16) < 3e-2


def test_cache_holds_only_the_latent():
    args = ModelArgs(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                     num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                     v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    assert args.kv_cache_dim == 16 + 4
    assert args.mha_cache_dim == 4 * (12 + 8)
    from deepseek_v2.engine.model_runner import cache_bytes_per_token
    model = DeepseekV2ForCausalLM(args).init_weights(0)
    assert cache_bytes_per_token(model, torch.bfloat16) == 2 * 20 * 2
    # DeepSeek-V2: 576 values per token per layer against 128 heads x (192 + 128)
    from deepseek_v2.config import PRESETS
    assert PRESETS["v2"].kv_cache_dim == 576 and PRESETS["v2"].mha_cache_dim == 40960


def small_args(**changes) -> ModelArgs:
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, intermediate_size=48,
                num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                n_routed_experts=6, num_experts_per_tok=3, n_shared_experts=1, moe_intermediate_size=16,
                first_k_dense_replace=1, max_position_embeddings=256,
                rope_scaling=RopeScaling(4.0, 64, 32.0, 1.0, 0.707, 0.707))
    return ModelArgs(**{**base, **changes})


def test_norm_topk_prob_renormalises_without_scaling():
    """Official MoEGate: with norm_topk_prob the K weights are divided by their sum and the routed
    scaling is not applied (the transformers port ignores this option)."""
    torch.manual_seed(3)
    model = DeepseekV2ForCausalLM(small_args(norm_topk_prob=True, routed_scaling_factor=16.0)).init_weights(3)
    moe = model.model.layers[1].mlp
    x = torch.randn(10, 32)
    routing = moe.gate(x)
    scores = F.softmax(x @ moe.gate.weight.t(), dim=-1)
    top_w, top_i = scores.topk(3, dim=-1)
    assert torch.allclose(routing.topk_weights.sum(-1), torch.ones(10), atol=1e-6)
    for i in range(10):
        expected = (top_w[i] / top_w[i].sum()).sort().values
        assert torch.allclose(routing.topk_weights[i].sort().values, expected, atol=1e-6)
        assert sorted(routing.topk_ids[i].tolist()) == sorted(top_i[i].tolist())
    # The whole layer against a per-token loop over the formula.
    with torch.no_grad():
        y = moe(x)
        w13, w2 = moe.experts.gate_up_proj, moe.experts.down_proj
        for t in range(10):
            expected = moe.shared_experts(x[t])
            for k in range(3):
                e = top_i[t, k]
                h = F.silu(w13[e, :16] @ x[t]) * (w13[e, 16:] @ x[t])
                expected = expected + (top_w[t, k] / top_w[t].sum()) * (w2[e] @ h)
            assert torch.allclose(y[t], expected, atol=1e-5)


def test_routed_scaling_without_norm():
    model = DeepseekV2ForCausalLM(small_args(routed_scaling_factor=16.0)).init_weights(4)
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(5, 32)
    scores = F.softmax(x @ gate.weight.t(), dim=-1)
    r = gate(x)
    assert torch.allclose(r.topk_weights.sort(-1).values, (16.0 * scores.topk(3).values).sort(-1).values, atol=1e-6)


def test_moe_layer_freq_and_dense_layers():
    """Official DeepseekV2DecoderLayer: a layer is MoE if i >= first_k_dense_replace and i % moe_layer_freq == 0."""
    from deepseek_v2.moe import MLP, MoE
    model = DeepseekV2ForCausalLM(small_args(num_hidden_layers=7, first_k_dense_replace=2, moe_layer_freq=2))
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [MLP, MLP, MoE, MLP, MoE, MLP, MoE]
    assert model.model.layers[1].mlp.gate_proj.weight.shape == (48, 32)  # dense width


def test_group_limited_routing_uses_at_most_topk_group_groups():
    args = small_args(n_routed_experts=8, num_experts_per_tok=3, topk_method="group_limited_greedy",
                      n_group=4, topk_group=2)
    model = DeepseekV2ForCausalLM(args).init_weights(5)
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(200, 32)
    r = gate(x)
    groups = r.topk_ids // 2
    assert max(len(set(g)) for g in groups.tolist()) <= 2
    # and each pick is the best of the kept groups (masked with 0, as the official code)
    scores = F.softmax(x @ gate.weight.t(), dim=-1)
    group_best = scores.view(200, 4, 2).amax(-1).topk(2).indices
    for t in range(200):
        allowed = torch.cat([torch.arange(g * 2, g * 2 + 2) for g in group_best[t].tolist()])
        expected = scores[t, allowed].topk(3).indices
        assert sorted(allowed[expected].tolist()) == sorted(r.topk_ids[t].tolist())


def test_yarn_constants_match_official_code():
    from deepseek_v2.config import PRESETS
    from deepseek_v2.rope import yarn_inv_freq
    args = PRESETS["v2-lite"]
    assert math.isclose(args.softmax_scale, 0.11472139, rel_tol=1e-7)
    assert math.isclose(args.replace(rope_scaling=RopeScaling(40, 4096, 32, 1, 1.0, 1.0)).softmax_scale,
                        0.13523378, rel_tol=1e-7)
    inv_freq, magnitude = yarn_inv_freq(args)
    assert magnitude == 1.0
    assert torch.allclose(inv_freq[:3], torch.tensor([1.0, 0.74989, 0.56234]), atol=1e-5)
    assert torch.allclose(inv_freq[-3:], torch.tensor([5.928e-6, 4.446e-6, 3.334e-6]), rtol=1e-3)


def test_rotary_pairs_match_official_permute_rotate_half():
    """The official code permutes (2i, 2i+1) pairs to half-split and applies
    rotate_half; our in-place pair rotation must give the same q.k."""
    from deepseek_v2.kernels.reference import apply_rotary
    torch.manual_seed(6)
    q, k = torch.randn(5, 16), torch.randn(5, 16)
    pos = torch.tensor([0, 3, 100, 4000, 9000])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    ang = pos[:, None].float() * inv_freq
    cos, sin = ang.cos(), ang.sin()

    def official(x):
        x = x.view(5, 8, 2).transpose(-1, -2).reshape(5, 16)
        c, s = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        rot = torch.cat([-x[:, 8:], x[:, :8]], -1)
        return x * c + rot * s

    ours = (apply_rotary(q, cos, sin) * apply_rotary(k, cos, sin)).sum(-1)
    ref = (official(q) * official(k)).sum(-1)
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("name", ["lite-yarn-greedy", "qlora-yarn-scaled"])
def test_fused_projections_give_the_same_logits(hf_checkpoint, name):
    _, path = hf_checkpoint(name)
    model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 30))
    with torch.no_grad():
        before = model(ids)
        params = dict(model.named_parameters())
        model.fuse_for_inference()
        after = model(ids)
    assert torch.allclose(before, after, atol=1e-5)
    assert dict(model.named_parameters()).keys() == params.keys()  # checkpoint names unchanged
    mla = model.model.layers[1].self_attn
    assert mla.in_proj_weight is not None and mla.kv_a_proj_with_mqa.weight.data_ptr() > mla.in_proj_weight.data_ptr()


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_shared_experts_run_in_the_routed_experts_kernel(monkeypatch, quantization):
    """fuse_for_inference stacks the demo model's 2 shared experts after its 16 routed ones (FP8: with their
    block scales): a small step runs all of them in one call of the MoE kernels, a large one the shared
    MLP beside the routed experts; the layer's output is the same function either way, and the routed
    experts' weights are views of the stack, under their checkpoint names. FP8: the router hands the
    experts' kernel x quantized (x_fp8, what the kernels' router makes in its own launch), and with
    fp8.QUANTIZE_ONCE_FROM the shared MLP's gate/up GEMM too, in torch._scaled_mm's layout (its down
    projection then reads the activation quantized by the activation's launch)."""
    import dataclasses

    from deepseek_v2.kernels import fp8
    from deepseek_v2.kernels.fp8 import quantize_activation

    from deepseek_v2.config import DEFAULT_MODEL
    from deepseek_v2.moe import MoE

    model = DeepseekV2ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32, quantization=quantization)
    a = model.args
    moe = model.model.layers[1].mlp
    x = torch.randn(9, a.hidden_size)
    with torch.no_grad():
        before = moe(x)
        keys = model.state_dict().keys()
        model.fuse_for_inference()
        stack = moe.stack
        assert stack is not None and stack.num_shared == a.n_shared_experts == 2
        assert stack.gate_up.shape == (a.n_routed_experts + 2, 2 * a.moe_intermediate_size, a.hidden_size)
        assert (stack.gate_up_scale is not None) == (quantization == "fp8")
        assert moe.experts.gate_up_proj.data_ptr() == stack.gate_up.data_ptr()  # a view, not a copy
        experts_called, handed = [], []
        kernels = moe.experts.kernels
        moe.experts.kernels = dataclasses.replace(
            kernels, moe=lambda *args, **kw: experts_called.append(args[1].shape[0]) or handed.append(kw.get("x_fp8"))
            or kernels.moe(*args, **kw))
        moe.record_routing = True
        fused = moe(x)
        assert moe.last_routing.topk_ids.shape == (9, a.num_experts_per_tok)  # the routed picks only
        monkeypatch.setattr(MoE, "FUSED_SHARED_MAX_TOKENS", 8)
        unfused = moe(x)
        shared_handed = []
        shared_kernels = moe.shared_experts.kernels
        moe.shared_experts.kernels = dataclasses.replace(
            shared_kernels, linear=lambda *args, **kw: shared_handed.append(kw.get("x_fp8"))
            or shared_kernels.linear(*args, **kw))
        monkeypatch.setattr(fp8, "QUANTIZE_ONCE_FROM", 1)
        shared_once = moe(x)
    assert experts_called == [a.n_routed_experts + 2, a.n_routed_experts, a.n_routed_experts]
    want_q, want_s = quantize_activation(x)
    if quantization == "fp8":  # the router's quantization of x, for the experts' kernel, and the shared MLP's
        assert all(torch.equal(got.float(), want.float()) for h in handed for got, want in zip(h, (want_q, want_s)))
        q, scales = shared_handed[0]  # torch._scaled_mm's layout: 128 rows, M-major scales; x's rows first
        assert q.shape == (128, a.hidden_size) and scales.stride(0) == 1 and len(shared_handed) == 1
        assert torch.equal(q[:9].float(), want_q.float()) and torch.equal(scales[:9], want_s)
    else:
        assert handed == [None, None, None] and shared_handed == [None]
    assert rel_err(fused, before) < 1e-6, rel_err(fused, before)  # fp32: FP8 quantizes the same values
    assert rel_err(unfused, before) < 1e-6 and torch.equal(shared_once, unfused)
    assert model.state_dict().keys() == keys


def test_routers_keep_an_fp32_weight_for_inference(hf_checkpoint):
    """A bf16 model's routers multiply in fp32: after fuse_for_inference they hold that fp32 weight
    instead of casting it at every step, with the same logits and picks, and no new checkpoint name."""
    from deepseek_v2.moe import MoEGate

    _, path = hf_checkpoint("lite-yarn-greedy")
    model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    gate = next(m for m in model.modules() if isinstance(m, MoEGate))
    x = torch.randn(5, model.args.hidden_size).to(torch.bfloat16)
    keys = model.state_dict().keys()
    with torch.no_grad():
        before = gate(x)
        model.fuse_for_inference()
        after = gate(x)
    assert gate.weight_fp32 is not None and gate.weight_fp32.dtype == torch.float32
    assert torch.equal(before.logits, after.logits) and torch.equal(before.topk_ids, after.topk_ids)
    assert model.state_dict().keys() == keys
