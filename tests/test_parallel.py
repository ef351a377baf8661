# Run: python -m pytest -q tests/test_parallel.py   (tensor parallelism over 2-4 gloo processes on CPU, ~1 min)
"""Tensor and expert parallelism on CPU: each rank loads its part of a checkpoint (and no more), and the
ranks together compute the single-process model's logits (fp32), for sizes that split heads, experts,
intermediate columns and the vocabulary unequally."""

from __future__ import annotations

import pytest
import torch

from deepseek_v2 import DeepseekV2ForCausalLM
from deepseek_v2.parallel import ShardedLinear, split
from ranks import run_ranks

# q_lora + group-limited routing + two dense-first layers + shared experts + attention bias; and the Lite
# shape (no q_lora, greedy routing, YaRN)
CONFIGS = ["qlora-plain-grouped", "lite-yarn-greedy"]


def test_split_is_contiguous_and_near_equal():
    for n, parts in [(160, 6), (128, 8), (10, 3), (4, 4)]:
        bounds = [split(n, parts, i) for i in range(parts)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [b - a for a, b in (split(160, 6, i) for i in range(6))] == [27, 27, 27, 27, 26, 26]


def parameter_bytes(model) -> tuple[int, int]:
    """(bytes of split tensors, bytes of replicated ones) this model holds."""
    split_bytes = replicated = 0
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rpartition(".")[0])
        sharded = name.endswith(("experts.gate_up_proj", "experts.down_proj")) or (
            isinstance(module, ShardedLinear) and (module.shard[0] == 0 or name.endswith("weight")))
        if sharded:
            split_bytes += p.numel() * p.element_size()
        else:
            replicated += p.numel() * p.element_size()
    return split_bytes, replicated


def rank_logits(tp, path, ids):
    model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32, tp=tp)
    with torch.no_grad():
        return model(ids), parameter_bytes(model)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("name", CONFIGS)
def test_tensor_parallel_logits_equal_one_process(hf_checkpoint, name, world):
    _, path = hf_checkpoint(name)
    ids = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(world))
    single = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        expected = single(ids)
    results = run_ranks(world, "test_parallel:rank_logits", str(path), ids)
    for logits, _ in results:  # every rank ends with the whole logits
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # each rank loaded its share of the split tensors, and the replicated ones whole
    total_split, replicated = parameter_bytes(single)
    shares = [bytes_ for (_, (bytes_, _)) in results]
    assert sum(shares) == total_split
    assert all(r == replicated for (_, (_, r)) in results)
    assert max(shares) <= total_split / world * 1.25, shares
