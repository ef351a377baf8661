"""Shared fixtures: tiny random DeepSeek-V2 checkpoints written by Hugging Face transformers
(the numerical oracle) in the official format."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

# Small configs that together cover: q_lora_rank null and set, yarn and plain rope, greedy and
# group-limited routing, routed_scaling_factor != 1, first_k_dense_replace > 1, attention bias.
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, n_shared_experts=1, max_position_embeddings=1280,
            bos_token_id=0, eos_token_id=1)
HF_CONFIGS = {
    "lite-yarn-greedy": dict(BASE, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
                             first_k_dense_replace=1, topk_method="greedy", rope_parameters=YARN),
    "qlora-plain-grouped": dict(BASE, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3,
                                first_k_dense_replace=2, topk_method="group_limited_greedy", n_group=4,
                                topk_group=2, routed_scaling_factor=2.5, attention_bias=True,
                                num_hidden_layers=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qlora-yarn-scaled": dict(BASE, q_lora_rank=16, n_routed_experts=6, num_experts_per_tok=2,
                              n_shared_experts=2, first_k_dense_replace=1, topk_method="greedy",
                              routed_scaling_factor=16.0, rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0)),
}


def make_hf_model(name: str, seed: int = 0):
    """A transformers DeepseekV2ForCausalLM with random weights (std large enough that the
    logits are far from uniform, so greedy decoding is not decided by rounding)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM as HFModel

    torch.manual_seed(seed)
    cfg = DeepseekV2Config(**HF_CONFIGS[name], initializer_range=0.08)
    model = HFModel(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> (transformers model, directory written by its save_pretrained)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = make_hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (model, path)
        return cache[name]

    return get
