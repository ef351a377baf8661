# Run: python -m pytest -q tests/test_plan.py
"""The memory plan (deepseek_v2/plan.py): per-rank weights against hand counts and the real model's
parameters, the activation reserve term by term, the cache left over, the V2 plans that `info` prints,
and clear errors for impossible sizes."""

import pytest

from conftest import HF_CONFIGS
from deepseek_v2.cli import main
from deepseek_v2.config import PRESETS, EngineConfig, ModelArgs
from deepseek_v2.plan import (GiB, KNOWN_GPUS, activation_terms, format_plan, longest_fitting_len, memory_plan,
                              rank_parameters)

# D 4, H 3 heads of qk 2 + 2 and v 1, q_lora 2, latent R 2 + P 2, attention bias; layer 0 dense (width 6),
# layers 1-2 MoE: 5 routed experts of width 3 (top-2) and 1 shared; vocabulary 10, untied head.
SMALL = ModelArgs(vocab_size=10, hidden_size=4, num_hidden_layers=3, intermediate_size=6, num_attention_heads=3,
                  q_lora_rank=2, kv_lora_rank=2, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=1,
                  attention_bias=True, n_routed_experts=5, n_shared_experts=1, num_experts_per_tok=2,
                  moe_intermediate_size=3, first_k_dense_replace=1, max_position_embeddings=64, rope_scaling=None)
# Per head and layer: q_b 4*2 + kv_b (2+1)*2 + o 1*4 = 18. Per layer replicated: kv_a 4*4, its norm 2,
# two layer norms 8, q_a 4*2, its norm 2, biases 2 + 4 + 4 = 46; router 5*4 = 20 per MoE layer.
# Dense MLP 3*4 = 12 per column of 6; an expert 3*4*3 = 36; shared 12 per column of 3; head 4 per row
# of 10. Embedding 40 and final norm 4, replicated.
REPLICATED = 3 * 46 + 2 * 20 + 40 + 4  # 222 on every rank
SHARDED = {  # rank -> sharded parameters, for tp = 1, 2, 3
    1: [3 * 3 * 18 + 6 * 12 + 2 * (5 * 36 + 3 * 12) + 10 * 4],  # 706
    2: [3 * 2 * 18 + 3 * 12 + 2 * (3 * 36 + 2 * 12) + 5 * 4,  # heads 2|1, columns 3|3, experts 3|2, shared 2|1
        3 * 1 * 18 + 3 * 12 + 2 * (2 * 36 + 1 * 12) + 5 * 4],  # vocabulary 5|5
    3: [3 * 1 * 18 + 2 * 12 + 2 * (2 * 36 + 1 * 12) + 4 * 4,  # heads 1|1|1, columns 2|2|2, experts 2|2|1,
        3 * 1 * 18 + 2 * 12 + 2 * (2 * 36 + 1 * 12) + 3 * 4,  # shared 1|1|1, vocabulary 4|3|3
        3 * 1 * 18 + 2 * 12 + 2 * (1 * 36 + 1 * 12) + 3 * 4],
}


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_rank_weights_match_hand_counts(tp):
    assert [rank_parameters(SMALL, tp, r) for r in range(tp)] == [(s, REPLICATED) for s in SHARDED[tp]]
    # the shards add up to the whole weights, and every rank holds the replicated ones whole
    assert sum(SHARDED[tp]) == SHARDED[1][0] == 706
    assert max(SHARDED[tp]) == SHARDED[tp][0]  # rank 0 holds the largest share
    plan = memory_plan(SMALL, tp, 4 * GiB, weight_bytes_per_value=2)
    assert (plan.sharded_weight_bytes, plan.replicated_weight_bytes) == (2 * SHARDED[tp][0], 2 * REPLICATED)


def test_v2_ranks_add_up_to_the_whole_model():
    v2 = PRESETS["v2"]
    whole_sharded, replicated = rank_parameters(v2, 1)
    for tp in (2, 6, 8):  # 6 splits the 128 heads and the 160 experts unevenly
        ranks = [rank_parameters(v2, tp, r) for r in range(tp)]
        assert sum(s for s, _ in ranks) == whole_sharded
        assert all(r == replicated for _, r in ranks)
        assert ranks[0][0] == max(s for s, _ in ranks)


def shapes() -> dict[str, ModelArgs]:
    found = {name: ModelArgs.from_hf_config(cfg) for name, cfg in HF_CONFIGS.items()}
    small = found["lite-yarn-greedy"]
    found["tied"] = small.replace(tie_word_embeddings=True)
    found["moe-every-other-layer"] = small.replace(moe_layer_freq=2, num_hidden_layers=4)
    found["dense"] = small.replace(n_routed_experts=None)
    found["small"] = SMALL
    return found


@pytest.mark.parametrize("name", list(shapes()))
def test_tp1_weights_are_every_parameter_of_the_model(name):
    """The router, the norms and the biases are all counted: against the real module's parameters."""
    from deepseek_v2.model import DeepseekV2ForCausalLM
    args = shapes()[name]
    held = sum(rank_parameters(args, 1))
    assert held == args.num_parameters()["total"]
    assert held == sum(p.numel() for p in DeepseekV2ForCausalLM(args).parameters())  # a tied head counted once
    assert memory_plan(args, 1, GiB, weight_bytes_per_value=4).weight_bytes == 4 * held


def test_v2_presets_count_every_parameter():
    for args in PRESETS.values():
        assert sum(rank_parameters(args, 1)) == args.num_parameters()["total"]


def test_activation_terms_by_hand():
    config = EngineConfig(max_num_batched_tokens=16, max_num_seqs=4, enforce_eager=True)
    # tp 2: rank 0 has 2 heads and 2 of the 3 shared columns; T = 16 tokens, L = 64 keys, N = 4 rows, 2 bytes
    assert activation_terms(SMALL, 2, config, max_model_len=64, bytes_per_value=2) == {
        "hidden": 4 * 16 * 4 * 2,
        "attention": 16 * (2 + 2 * 2 * 4 + 2 + 2 + 2 * 2 + 2 * 2 * 1) * 2,  # q_a, q twice, latent, q_pe, out twice
        "expanded_kv": 64 * (2 + 2 + 2 * 3 + 2 * 2 * 4) * 2,  # gathered latent, kv_b out, K, V padded to K's dim
        "ffn": 16 * 2 * (2 * 3 + 4) * 2 + 16 * 5 * 4 + 16 * 4 * 4 + 16 * 2 * 2 * 2,  # MoE > dense 16*2*3*2
        "logits": 4 * 10 * (2 * 2 + 40),
        "fixed": 3 * GiB,  # CUDA context, allocator slack, NCCL; no graphs under enforce_eager
        "shared_experts_stacked": 0,  # a rank's slice of the shared experts is not stacked
    }
    one_rank = activation_terms(SMALL, 1, EngineConfig(max_num_batched_tokens=16, max_num_seqs=4), max_model_len=64, bytes_per_value=2)
    assert one_rank["fixed"] == 3 * GiB  # with graphs, without NCCL
    assert one_rank["shared_experts_stacked"] == 2 * 3 * 4 * 3 * 2  # 2 MoE layers x gate, up, down of 4 x 3, bf16


def test_cache_left_over_by_hand():
    config = EngineConfig(max_model_len=48, max_num_batched_tokens=16, max_num_seqs=4, block_size=16,
                          gpu_memory_utilization=0.875, enforce_eager=True)
    plan = memory_plan(SMALL, 2, 4 * GiB, config, weight_bytes_per_value=2, cache_bytes_per_value=4)
    weights = 2 * (SHARDED[2][0] + REPLICATED)
    reserve = sum(activation_terms(SMALL, 2, config, 48, 2).values())
    assert plan.cache_bytes == 3.5 * GiB - weights - reserve  # 3 GiB of the reserve is the fixed overhead
    assert plan.cache_bytes_per_token == 3 * (2 + 2) * 4  # layers x (R + P) x 4 bytes, on every rank
    blocks = plan.cache_bytes // (48 * 16) - 1  # less the engine's scratch block
    assert plan.cache_tokens == 16 * blocks and plan.max_length_sequences == 16 * blocks / 48
    assert plan.fits


def test_fits_means_weights_reserve_and_one_max_length_sequence():
    v2 = PRESETS["v2"]
    h200 = memory_plan(v2, 8, 141 * GiB)
    assert h200.fits and h200.max_length_sequences > 1
    assert memory_plan(v2, 8, KNOWN_GPUS["H200 141 GB"]).fits
    # on 80 GiB the weights and the reserve fit, but not a 163,840-token sequence: the longest that fits
    h100 = memory_plan(v2, 8, 80 * GiB)
    assert h100.weight_bytes + h100.activation_bytes < h100.budget_bytes and not h100.fits
    n = longest_fitting_len(v2, 8, 80 * GiB)
    assert 0 < n < v2.max_position_embeddings
    assert memory_plan(v2, 8, 80 * GiB, EngineConfig(max_model_len=n)).fits
    assert not memory_plan(v2, 8, 80 * GiB, EngineConfig(max_model_len=n + 1)).fits
    # the whole model on one GPU: weights alone exceed the budget
    one = memory_plan(v2, 1, 141 * GiB)
    assert not one.fits and one.cache_tokens == 0 and "does not fit" in format_plan(one)
    assert longest_fitting_len(v2, 1, 141 * GiB) == 0


@pytest.mark.parametrize("tp, message", [
    (0, "must be a positive integer"),
    (17, "larger than the model's 16 attention heads"),
])
def test_impossible_sizes_are_clear_errors(tp, message):
    with pytest.raises(ValueError, match=message):
        memory_plan(PRESETS["v2-lite"], tp, 80 * GiB)


def test_more_ranks_than_experts_is_a_clear_error():
    args = SMALL.replace(num_attention_heads=8)
    with pytest.raises(ValueError, match="larger than the model's 5 routed experts"):
        rank_parameters(args, 6)
    assert rank_parameters(args.replace(n_routed_experts=None), 6)  # a dense model has no experts to split


def test_info_prints_the_plans(capsys):
    v2 = PRESETS["v2"]
    assert main(["info", "--shape", "v2", "-tp", "8"]) == 0
    out = capsys.readouterr().out
    assert "576 values/token/layer = 69,120 bytes/token" in out
    assert "the latent cache is replicated on every rank: each of the 8 GPUs holds every cached token's" in out
    for name, size in KNOWN_GPUS.items():
        assert f"{name} ({size / GiB:.1f} GiB):\n" + format_plan(memory_plan(v2, 8, size)) in out
    assert "fits in 140.4 GiB x 0.90" in out
    assert f"fits with --max-model-len up to {longest_fitting_len(v2, 8, KNOWN_GPUS['H100 80 GB']):,}" in out

    assert main(["info", "--shape", "v2", "--tensor-parallel-size", "8", "--gpu-memory-gib", "141",
                 "--max-model-len", "32768", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    expected = memory_plan(v2, 8, 141 * GiB, EngineConfig(max_model_len=32768), weight_bytes_per_value=4)
    assert format_plan(expected) in out and "H100" not in out


def test_info_rejects_an_impossible_size_in_one_line(capsys):
    assert main(["info", "--shape", "v2", "-tp", "200"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before the error
    assert captured.err.strip() == ("deepseek-v2 info: error: tensor_parallel_size 200 is larger than the model's "
                                    "128 attention heads: attention is split by heads, so every rank needs one")


@pytest.mark.parametrize("gib", ["141", "80"])
def test_docs_show_the_current_plans(gib, capsys):
    """docs/parallel.md pastes `info`'s output; a change to the estimate must update it."""
    from pathlib import Path
    assert main(["info", "--shape", "v2", "-tp", "8", "--gpu-memory-gib", gib]) == 0
    doc = (Path(__file__).parent.parent / "docs" / "parallel.md").read_text()
    assert f"$ deepseek-v2 info --shape v2 -tp 8 --gpu-memory-gib {gib}\n" + capsys.readouterr().out in doc
