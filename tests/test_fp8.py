# Run: python -m pytest -q tests/test_fp8.py
"""FP8 on CPU (docs/fp8.md): the block format against DeepSeek's weight_dequant meaning, activation and
cache-row quantization, the reference FP8 GEMM, checkpoints in DeepSeek's FP8 layout (round trip,
quantize on load, FP8 tensors the model keeps in bf16, `deepseek-v2 quantize`), the demo model's FP8
logits against bf16, and the engine end to end with FP8 weights and the FP8 latent cache."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from deepseek_v2 import LLM, DeepseekV2ForCausalLM, EngineConfig, LLMEngine, ModelArgs, SamplingParams, Tokenizer
from deepseek_v2.checkpoint import CheckpointError
from deepseek_v2.config import DEFAULT_MODEL, ConfigError
from deepseek_v2.parallel import Linear
from deepseek_v2.kernels import reference
from deepseek_v2.kernels.fp8 import (FP8, dequantize_activation, dequantize_weight, quantize_activation, quantize_cache,
                                     quantize_cache_rows, quantize_weight, read_cache, write_cache)

E4M3_HALF_STEP = 2**-4  # rounding to nearest with 3 mantissa bits: at most 2^-4 of the value (normal range)


def test_weight_blocks_mean_weight_times_scale_inv():
    """DeepSeek-V3's weight_dequant: every 128 x 128 block (edge blocks partial) is weight * its
    weight_scale_inv; the scale is the block's max / 448, so the block's largest value is stored as 448."""
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-2, 1, 200)  # columns of very different magnitudes
    q, s = quantize_weight(w)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (3, 2)
    deq = dequantize_weight(q, s)
    for i in range(3):
        for j in range(2):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            assert s[i, j] == w[rows, cols].abs().max() / 448
            assert q[rows, cols].float().abs().max() == 448
            assert torch.equal(deq[rows, cols], q[rows, cols].float() * s[i, j])
    normal = w.abs() >= s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200] * 2**-6
    assert ((deq - w).abs() <= E4M3_HALF_STEP * w.abs())[normal].all()
    assert (deq - w).norm() / w.norm() < 0.03  # ~2.6% for e4m3


def test_a_part_inside_a_block_keeps_its_whole_blocks():
    """A tensor-parallel part of a matrix (rows or columns starting inside a block) with the scales of the
    blocks it touches and its block_offset means exactly its slice of the whole; quantizing those whole
    blocks and cropping (the loader's quantize-on-load) gives the whole's very bits."""
    torch.manual_seed(1)
    w = torch.randn(300, 260)
    q, s = quantize_weight(w)
    whole = dequantize_weight(q, s)
    for dim, start, end in [(0, 100, 250), (0, 128, 300), (1, 70, 200), (1, 0, 129)]:
        index = (slice(None),) * dim + (slice(start, end),)
        blocks = (slice(None),) * dim + (slice(start // 128, -(-end // 128)),)
        offset = (start % 128, 0) if dim == 0 else (0, start % 128)
        assert torch.equal(dequantize_weight(q[index], s[blocks], offset), whole[index])
        first, last = start // 128 * 128, min(-(-end // 128) * 128, w.shape[dim])
        covering = w[(slice(None),) * dim + (slice(first, last),)]
        q_part, s_part = quantize_weight(covering)
        crop = (slice(None),) * dim + (slice(start - first, end - first),)
        assert torch.equal(q_part[crop].view(torch.uint8), q[index].view(torch.uint8))
        assert torch.equal(s_part, s[blocks])


def test_activations_are_quantized_per_token_in_groups_of_128():
    torch.manual_seed(2)
    x = torch.randn(4, 300)
    x[1] = 0.0
    x[2, 128:256] *= 1000.0
    q, s = quantize_activation(x)
    assert q.shape == x.shape and s.shape == (4, 3)
    assert (q[1].float() == 0).all() and (s[1] > 0).all()  # a zero row: zeros, not NaN
    for g, cols in enumerate([slice(0, 128), slice(128, 256), slice(256, 300)]):
        assert torch.equal(s[[0, 2, 3], g], x[[0, 2, 3], cols].abs().amax(-1) / 448)
        assert (q[[0, 2, 3], cols].float().abs().amax(-1) == 448).all()
    back = dequantize_activation(q, s)
    assert (back[0] - x[0]).norm() / x[0].norm() < 0.03
    # groups aligned with the weight's blocks: a part that starts 70 columns into a block
    q70, s70 = quantize_activation(x[:, 70:], offset=70)
    assert s70.shape == (4, 3) and torch.equal(s70[:, 1:], s[:, 1:])
    assert torch.equal(q70[:, 58:].view(torch.uint8), q[:, 128:].view(torch.uint8))


def test_reference_fp8_linear_is_the_product_of_the_dequantized_operands():
    torch.manual_seed(3)
    x, w, bias = torch.randn(5, 260), torch.randn(300, 260) / 16, torch.randn(300)
    q, s = quantize_weight(w)
    y = reference.linear(x, q, bias, s)
    expected = dequantize_activation(*quantize_activation(x)) @ dequantize_weight(q, s).T + bias
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    exact = x @ w.T + bias
    assert (y - exact).norm() / exact.norm() < 0.05  # W8A8: two e4m3 roundings
    # a part of the output rows (column parallel), starting inside a block: its columns of y
    part = reference.linear(x, q[100:250], bias[100:250], s[0:2], (100, 0))
    torch.testing.assert_close(part, y[:, 100:250], rtol=1e-6, atol=1e-6)


def test_fp8_cache_blocks_hold_values_then_their_scales():
    """A block of the FP8 cache: its tokens' e4m3 values (each row scaled by its max / 448), then their
    fp32 scales; written and read back at slots."""
    torch.manual_seed(4)
    rows = torch.randn(6, 160) * 3
    rows[3] = 0.0
    cache = torch.zeros(3, 4, 164, dtype=torch.uint8)
    slots = torch.tensor([5, 0, 11, 2, 7, 8])
    write_cache(cache, slots, rows)
    flat = cache.view(3, 4 * 164)
    scale = flat[:, 4 * 160:].contiguous().view(torch.float32).view(-1)[slots]
    assert torch.equal(scale[[0, 1, 2, 4, 5]], rows[[0, 1, 2, 4, 5]].abs().amax(-1) / 448)
    q, s = quantize_cache_rows(rows)
    assert torch.equal(s, scale)
    assert torch.equal(flat[1, 160:320], q[0].view(torch.uint8))  # slot 5 = block 1, offset 1
    back = read_cache(cache, slots // 4, slots % 4, torch.float32)
    assert (back[3] == 0).all()
    assert ((back - rows).abs() <= E4M3_HALF_STEP * rows.abs() + scale[:, None] * 2**-9).all()
    assert torch.equal(quantize_cache(rows[:4].view(1, 4, 160)).view(-1)[:640], q[:4].view(torch.uint8).view(-1))


# ---- checkpoints -----------------------------------------------------------------------------------------
def small_args(**changes) -> ModelArgs:
    """Sizes that make several 128-blocks and partial ones (160 = 128 + 32, 200, 136)."""
    return ModelArgs(**{**dict(vocab_size=80, hidden_size=160, num_hidden_layers=2, intermediate_size=200,
                               num_attention_heads=2, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                               qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                               n_shared_experts=1, moe_intermediate_size=136, max_position_embeddings=256,
                               initializer_range=0.05, bos_token_id=0, eos_token_id=1), **changes})


def assert_same_parameters(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(pa[name].view(torch.uint8) if pa[name].dtype == FP8 else pa[name],
                           pb[name].view(torch.uint8) if pb[name].dtype == FP8 else pb[name]), name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A bf16 checkpoint, and the FP8 one use_fp8 makes of it."""
    root = tmp_path_factory.mktemp("fp8")
    model = DeepseekV2ForCausalLM(small_args()).init_weights(0).to(torch.bfloat16)
    model.save_pretrained(root / "bf16")
    model.use_fp8().save_pretrained(root / "fp8")
    return root / "bf16", root / "fp8"


def test_fp8_checkpoint_layout_and_round_trip(checkpoints):
    _, path = checkpoints
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    assert config["torch_dtype"] == "bfloat16"
    files = load_file(path / "model.safetensors")
    scaled = {n.removesuffix("_scale_inv") for n in files if n.endswith("_scale_inv")}
    assert {n for n in scaled if n.startswith("model.layers.0.")} == {
        f"model.layers.0.self_attn.{p}.weight" for p in ("q_proj", "o_proj")}  # layer 0 is dense
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in scaled
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in scaled
    for name in scaled:
        assert files[name].dtype == FP8 and files[name + "_scale_inv"].dtype == torch.float32
    assert files["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"].shape == (2, 2)  # 136 x 160
    assert files["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
    assert files["lm_head.weight"].dtype == torch.bfloat16
    loaded = DeepseekV2ForCausalLM.from_pretrained(path)
    assert loaded.args.quantization == "fp8" and loaded.dtype == torch.bfloat16
    loaded.save_pretrained(path.parent / "again")
    assert_same_parameters(loaded, DeepseekV2ForCausalLM.from_pretrained(path.parent / "again"))


def test_quantize_on_load_equals_the_fp8_checkpoint(checkpoints):
    bf16, fp8 = checkpoints
    on_load = DeepseekV2ForCausalLM.from_pretrained(bf16, quantization="fp8")
    assert_same_parameters(on_load, DeepseekV2ForCausalLM.from_pretrained(fp8))
    ids = torch.randint(2, 80, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp8_logits, bf16_logits = on_load(ids), DeepseekV2ForCausalLM.from_pretrained(bf16)(ids)
    assert (fp8_logits - bf16_logits).norm() / bf16_logits.norm() < 0.1


def test_fp8_tensors_the_model_keeps_in_bf16_are_dequantized(checkpoints, tmp_path):
    """DeepSeek-V3's checkpoints hold kv_a_proj_with_mqa, kv_b_proj and the dense MLP in FP8 too: they load
    dequantized (the model keeps them in bf16), every other FP8 tensor as it is."""
    _, fp8 = checkpoints
    files = load_file(fp8 / "model.safetensors")
    for name in ["model.layers.1.self_attn.kv_b_proj.weight", "model.layers.0.mlp.down_proj.weight"]:
        files[name], files[name + "_scale_inv"] = quantize_weight(files[name])
    save_file(files, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((fp8 / "config.json").read_text())
    model = DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    for name in ["model.layers.1.self_attn.kv_b_proj.weight", "model.layers.0.mlp.down_proj.weight"]:
        want = dequantize_weight(files[name], files[name + "_scale_inv"]).to(torch.bfloat16)
        assert torch.equal(model.get_parameter(name), want), name
    assert_same_parameters(model.model.layers[1].mlp.experts, DeepseekV2ForCausalLM.from_pretrained(fp8)
                           .model.layers[1].mlp.experts)


def test_fuse_for_inference_pads_fp8_weights_for_cublas(checkpoints, tmp_path, monkeypatch):
    """fuse_for_inference widens the FP8 weights whose K is not a multiple of 512 with zero columns (here
    every FP8 linear layer: K is 160, 32 or 136; none is fused, their FP8 blocks would straddle two
    layers): same parameter shapes and values, the same logits, and the checkpoint it saves equals the one
    it loaded. Weights that are views of a fused matrix keep their storage (the bf16 model below)."""
    from deepseek_v2.kernels import fp8
    monkeypatch.setattr(fp8, "PAD_FOR_SCALED_MM", True)
    model = DeepseekV2ForCausalLM.from_pretrained(checkpoints[1])
    ids = torch.tensor([[3, 9, 27, 4, 50]])
    before = model(ids)
    fp8_linears = {f"{name}.weight" for name, m in model.named_modules()
                   if isinstance(m, Linear) and m.weight_scale_inv is not None}
    model.fuse_for_inference()
    padded = {name for name, p in model.named_parameters() if getattr(p, "zero_columns_to", None)}
    assert padded == fp8_linears and "model.layers.1.mlp.shared_experts.down_proj.weight" in padded
    down = model.model.layers[1].mlp.shared_experts.down_proj
    assert down.weight.shape == (160, 136) and down.weight.zero_columns_to == 512
    # the FP8 query projection and the bf16 kv_a_proj_with_mqa: multiplied in one call (linear's plain_rows)
    assert all(layer.self_attn.in_proj_plain and layer.self_attn.in_proj_weight is None for layer in model.model.layers)
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    assert_same_parameters(DeepseekV2ForCausalLM.from_pretrained(tmp_path), DeepseekV2ForCausalLM.from_pretrained(checkpoints[1]))
    fused = DeepseekV2ForCausalLM(small_args(moe_intermediate_size=128, n_shared_experts=2))
    fused.init_weights(0).use_fp8().fuse_for_inference()  # the shared experts' gate and up: views of one matrix
    shared = fused.model.layers[1].mlp.shared_experts
    assert shared.gate_up_weight is not None
    assert not any(hasattr(w, "zero_columns_to") for w in (shared.gate_proj.weight, shared.up_proj.weight))
    assert shared.down_proj.weight.zero_columns_to == 512
    monkeypatch.setattr(fp8, "PAD_FOR_SCALED_MM", False)  # the setting off: nothing padded
    unpadded = DeepseekV2ForCausalLM.from_pretrained(checkpoints[1]).fuse_for_inference()
    assert not any(hasattr(p, "zero_columns_to") for p in unpadded.parameters())


def test_quantize_command_writes_a_checkpoint_that_loads_back(checkpoints, tmp_path):
    from deepseek_v2.cli import main
    bf16, fp8 = checkpoints
    assert main(["quantize", str(bf16), str(tmp_path / "out")]) == 0
    assert_same_parameters(DeepseekV2ForCausalLM.from_pretrained(tmp_path / "out"),
                           DeepseekV2ForCausalLM.from_pretrained(bf16, quantization="fp8"))
    assert main(["quantize", str(bf16), str(bf16)]) == 1  # never over its input
    # tensor by tensor: the very tensors the quantized model saves, in shards of any size
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert written.keys() == load_file(fp8 / "model.safetensors").keys()
    for name, t in load_file(fp8 / "model.safetensors").items():
        assert written[name].dtype == t.dtype and torch.equal(written[name].view(torch.uint8), t.view(torch.uint8))
    DeepseekV2ForCausalLM.quantize_pretrained(bf16, tmp_path / "shards", max_shard_size=200_000)
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and set(index["weight_map"]) == written.keys()
    assert not list((tmp_path / "shards").glob("model-part-*"))
    assert_same_parameters(DeepseekV2ForCausalLM.from_pretrained(tmp_path / "shards"),
                           DeepseekV2ForCausalLM.from_pretrained(fp8))
    DeepseekV2ForCausalLM.quantize_pretrained(fp8, tmp_path / "again")  # an FP8 checkpoint is copied as it is
    assert_same_parameters(DeepseekV2ForCausalLM.from_pretrained(tmp_path / "again"),
                           DeepseekV2ForCausalLM.from_pretrained(fp8))
    extra = tmp_path / "extra"
    shutil.copytree(bf16, extra)
    tensors = load_file(extra / "model.safetensors")
    save_file({**tensors, "model.stray.weight": torch.zeros(2)}, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.stray.weight"):
        DeepseekV2ForCausalLM.quantize_pretrained(extra, tmp_path / "never")


@pytest.mark.parametrize("change, key", [({"quant_method": "awq"}, "quant_method"), ({"fmt": "e5m2"}, "fmt"),
                                         ({"weight_block_size": [64, 64]}, "weight_block_size"),
                                         ({"activation_scheme": "static"}, "activation_scheme")])
def test_unsupported_quantization_config_names_the_key(change, key):
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    cfg = small_args().to_hf_config()
    assert ModelArgs.from_hf_config({**cfg, "quantization_config": qc}).quantization == "fp8"
    with pytest.raises(ConfigError, match=f"quantization_config.{key}"):
        ModelArgs.from_hf_config({**cfg, "quantization_config": {**qc, **change}})


# ---- the demo model and the engine -------------------------------------------------------------------------
def test_demo_model_fp8_logits_stay_close_to_bf16():
    """Teacher-forced on held-out chat conversations (their assistant tokens), bf16 activations: FP8
    weights move the next-token distributions by a mean KL under 0.01 (docs/fp8.md measures 0.0036 on
    the whole set), keep 95% of the top-1 predictions and the loss within 1%."""
    from deepseek_v2.train.data import IGNORE, load_chat
    data = load_chat("tests/data/demo_chat_heldout.jsonl", Tokenizer.from_pretrained(DEFAULT_MODEL), 1024)
    inputs, targets = data.get([0, 1])
    mask = targets != IGNORE
    with torch.no_grad():
        base = DeepseekV2ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.bfloat16)(inputs)[mask]
        fp8 = DeepseekV2ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.bfloat16, quantization="fp8")(inputs)[mask]
    kl = F.kl_div(fp8.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean").item()
    assert kl < 0.01
    assert (fp8.argmax(-1) == base.argmax(-1)).float().mean() > 0.95
    loss, fp8_loss = (F.cross_entropy(x, targets[mask]).item() for x in (base, fp8))
    assert abs(fp8_loss - loss) < 0.01 * loss, (loss, fp8_loss)


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)  # few: the FP8 reference path is slow on CPU


def test_engine_with_fp8_weights_and_cache_end_to_end():
    """LLM(quantization="fp8", kv_cache_dtype="fp8") answers in the trained format, and its greedy tokens
    are the same with every engine switch (prefix caching, chunked prefill, one sequence at a time):
    prefill and decode read the same quantized latents."""
    llm = LLM(device="cpu", dtype="float32", quantization="fp8", kv_cache_dtype="fp8", num_kv_blocks=64)
    runner = llm.engine.runner
    assert runner.kv_caches[0].dtype == torch.uint8 and llm.engine.model.args.quantization == "fp8"
    out = llm.chat([{"role": "user", "content": "What does the word \"momentarily\" mean?"}],
                   SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    assert out.text.strip().startswith('"momentarily" (adverb):')
    tok = llm.tokenizer
    shared = tok.encode("The dictionary is a data structure that")
    # Prompts whose greedy tokens do not sit on an e4m3 rounding edge: batch composition moves values in
    # their last fp32 bit (CPU GEMMs sum in another order at another row count), and an FP8 quantization
    # can turn that into a different token ("A tuple" did, at its third token, under 2e-7 noise)
    prompts = [shared + tok.encode(s) for s in (" maps keys", " in Python is")] + [tok.encode("A list")]
    outputs = []
    for knobs in [dict(), dict(enable_prefix_caching=False, max_num_batched_tokens=8), dict(max_num_seqs=1)]:
        engine = LLMEngine(llm.engine.model, tok, EngineConfig(num_kv_blocks=64, kv_cache_dtype="fp8", **knobs))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, GREEDY)
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        outputs.append([done[str(i)] for i in range(len(prompts))])
    assert outputs[0] == outputs[1] == outputs[2]


def test_fp8_cache_holds_about_twice_the_tokens(caplog, capsys):
    """The same CPU budget holds 2 (R + P) / (R + P + 4) times the tokens of a bf16 cache (1.95x for the
    demo's 160 values per token and layer), and the start-up log and `info` say so."""
    import logging

    from deepseek_v2.cli import main
    model = DeepseekV2ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.bfloat16)
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    blocks = {}
    for kv in ("auto", "fp8"):
        with caplog.at_level(logging.INFO, logger="deepseek_v2"):
            blocks[kv] = LLMEngine(model, tok, EngineConfig(cpu_kv_cache_gib=0.01, kv_cache_dtype=kv)).runner.num_blocks
    assert math.isclose(blocks["fp8"] / blocks["auto"], 2 * 160 / 164, rel_tol=0.03), blocks
    tokens = blocks["fp8"] * EngineConfig().block_size
    assert f"latent cache (fp8: e4m3 and one fp32 scale per token and layer): {blocks['fp8']} blocks" in caplog.text
    assert f"= {tokens} tokens" in caplog.text
    assert main(["info", "--cache-dtype", "fp8"]) == 0
    assert "latent cache (fp8): 160 values/token/layer in e4m3 + a 4-byte scale = 984 bytes/token" in capsys.readouterr().out


def test_generate_and_serve_with_fp8_weights_and_cache():
    """The flags end to end: `generate` and `serve` with --quantization fp8 --kv-cache-dtype fp8 answer
    with the greedy tokens of LLM(quantization="fp8", kv_cache_dtype="fp8")."""
    import subprocess
    import sys

    import httpx
    from server_process import start_server, stop_server
    flags = ["--quantization", "fp8", "--kv-cache-dtype", "fp8"]
    llm = LLM(device="cpu", dtype="float32", quantization="fp8", kv_cache_dtype="fp8")
    expected = llm.generate("def main():", SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text
    r = subprocess.run([sys.executable, "-m", "deepseek_v2.cli", "generate", "def main():", "--max-tokens", "6",
                        "--dtype", "float32", *flags], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    proc, url, _ = start_server(*flags)
    try:
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": "def main():", "max_tokens": 6,
                                                          "temperature": 0}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected
    finally:
        stop_server(proc)
