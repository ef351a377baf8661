# Run: python -m pytest -q tests/test_checkpoint.py
"""Checkpoints: official-format round trips, shards, dtypes, transformers loading what we write,
config.json parsing, and named errors for broken checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_v2 import DeepseekV2ForCausalLM, ModelArgs
from deepseek_v2.checkpoint import CheckpointError
from deepseek_v2.config import PRESETS, ConfigError

# The DeepSeek-V2-Lite config.json as the official checkpoint ships it.
V2_LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                                            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400}


def test_official_config_parses_to_the_lite_preset():
    args = ModelArgs.from_hf_config(V2_LITE_CONFIG)
    assert args == PRESETS["v2-lite"]
    assert args.num_parameters() == {"total": 15_706_484_224, "activated": 2_451_435_008}
    assert PRESETS["v2"].num_parameters()["total"] == 235_741_434_880


def test_transformers5_config_parses(hf_checkpoint):
    _, path = hf_checkpoint("lite-yarn-greedy")
    cfg = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in cfg and "rope_scaling" not in cfg
    args = ModelArgs.from_hf_config(cfg)
    assert args.rope_scaling.factor == 40.0 and args.rope_scaling.original_max_position_embeddings == 32
    assert args.q_lora_rank is None and args.first_k_dense_replace == 1


@pytest.mark.parametrize("change, key", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 48}, "head_dim"),
    ({"qk_head_dim": 100}, "qk_head_dim"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"topk_method": "noaux_tc"}, "topk_method"),
    ({"topk_method": "group_limited_greedy", "n_group": 5, "topk_group": 1}, "n_group"),
    ({"scoring_func": "sigmoid"}, "scoring_func"),
    ({"model_type": "llama"}, "model_type"),
])
def test_bad_config_names_the_key(change, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelArgs.from_hf_config({**V2_LITE_CONFIG, **change})


def tiny_model(seed=0, **changes) -> DeepseekV2ForCausalLM:
    args = ModelArgs(vocab_size=80, hidden_size=32, num_hidden_layers=3, intermediate_size=40,
                     num_attention_heads=2, q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8,
                     qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=16, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                     **changes)
    return DeepseekV2ForCausalLM(args).init_weights(seed)


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in names  # unstacked, official names
    assert "model.layers.1.mlp.experts.gate_up_proj" not in names


def test_sharded_and_single_file_load_the_same(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "many", max_shard_size=20_000)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    a = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "one", dtype=torch.float32)
    b = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "many", dtype=torch.float32)
    ids = torch.randint(0, 80, (1, 20))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_transformers_loads_what_we_save(tmp_path):
    from transformers import DeepseekV2ForCausalLM as HFModel
    model = tiny_model(topk_method="group_limited_greedy", n_group=2, topk_group=1)
    model.save_pretrained(tmp_path)
    hf = HFModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 80, (2, 30))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits.float(), model(ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading(tmp_path, dtype):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    half = DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert all(p.dtype == dtype for p in half.parameters())
    ids = torch.randint(0, 80, (1, 16))
    with torch.no_grad():
        ref, got = model(ids), half(ids)
    assert ((got - ref).norm() / ref.norm()) < 2e-2
    half.save_pretrained(tmp_path / "half")  # and a bf16/fp16 checkpoint loads back in that dtype
    assert json.loads((tmp_path / "half" / "config.json").read_text())["torch_dtype"] == str(dtype)[6:]
    assert DeepseekV2ForCausalLM.from_pretrained(tmp_path / "half").dtype == dtype


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_named_errors(tmp_path):
    model = tiny_model()
    good = tmp_path / "good"
    model.save_pretrained(good)
    name = "model.layers.2.self_attn.kv_b_proj.weight"

    missing = broken_copy(good, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="missing tensor.*kv_b_proj"):
        DeepseekV2ForCausalLM.from_pretrained(missing)
    extra = broken_copy(good, tmp_path / "extra", lambda t: t.update({"model.layers.9.foo.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor.*layers.9.foo"):
        DeepseekV2ForCausalLM.from_pretrained(extra)
    shaped = broken_copy(good, tmp_path / "shape", lambda t: t.update({name: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"kv_b_proj.weight' has shape \[3, 3\]"):
        DeepseekV2ForCausalLM.from_pretrained(shaped)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        DeepseekV2ForCausalLM.from_pretrained(corrupt)

    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path / "nowhere")
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    shutil.copy(good / "config.json", no_weights)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        DeepseekV2ForCausalLM.from_pretrained(no_weights)
    (no_weights / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DeepseekV2ForCausalLM.from_pretrained(no_weights)


def test_loading_builds_on_meta_then_fills_once(tmp_path, monkeypatch):
    """The model is constructed on the meta device (no weights allocated), then each parameter
    is allocated once and filled from the file."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    built_on = []
    original_init = DeepseekV2ForCausalLM.__init__

    def recording_init(self, args, *rest):
        original_init(self, args, *rest)
        built_on.append(self.lm_head.weight.device.type)

    monkeypatch.setattr(DeepseekV2ForCausalLM, "__init__", recording_init)
    loaded = DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    assert built_on == ["meta"]
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
