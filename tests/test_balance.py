# Run: python -m pytest -q tests/test_balance.py   (DeepSeekMoE balance losses, device-limited routing, load stats)
"""The three balance losses against a hand computation on a fixed routing; device-limited routing
never leaves its M groups; expert load statistics and the load plot."""

from __future__ import annotations

import pytest
import torch

from deepseek_v2.config import ModelArgs
from deepseek_v2.moe import MoEGate, Routing
from deepseek_v2.train.balance import (balance_losses, device_limit, expert_counts, load_fractions, load_spread,
                                       plot_expert_load)

# One sequence of T=4 tokens, E=4 experts in D=2 device groups {0,1} {2,3}, K=2 picks per token.
SCORES = torch.tensor([[0.40, 0.30, 0.20, 0.10],
                       [0.10, 0.20, 0.30, 0.40],
                       [0.50, 0.10, 0.30, 0.10],
                       [0.25, 0.25, 0.25, 0.25]])
IDS = torch.tensor([[0, 1], [3, 2], [0, 2], [0, 1]])


def args(**kw) -> ModelArgs:
    base = dict(vocab_size=32, hidden_size=8, num_hidden_layers=2, intermediate_size=16, num_attention_heads=2,
                kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, n_routed_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=4, topk_method="greedy", n_group=2, topk_group=2,
                aux_loss_alpha=1.0, seq_aux=True, rope_scaling=None)
    return ModelArgs(**(base | kw))


def routing(scores=SCORES, ids=IDS) -> Routing:
    """A routing record whose softmax scores are `scores` (each row sums to 1, so log gives logits)."""
    return Routing(scores.log(), ids.clone(), torch.ones(ids.shape))


def test_balance_losses_equal_hand_computation():
    # picks per expert: 3, 2, 2, 1 -> f_e = E/(K T) * picks = 0.5 * picks = [1.5, 1.0, 1.0, 0.5]
    # P_e = column means = [0.3125, 0.2125, 0.2625, 0.2125]
    expert = 1.5 * 0.3125 + 1.0 * 0.2125 + 1.0 * 0.2625 + 0.5 * 0.2125  # = 1.05
    # f'_d = mean of f in the group = [1.25, 0.75]; P'_d = sum of P in the group = [0.525, 0.475]
    device = 1.25 * 0.525 + 0.75 * 0.475  # = 1.0125
    # tokens sent to group 0: t0, t2, t3; to group 1: t1, t2. M = min(K, D) = 2 under greedy routing,
    # f''_d = D/(M T) * sent = 0.25 * [3, 2]
    comm = 0.75 * 0.525 + 0.5 * 0.475  # = 0.63125
    losses = balance_losses(routing(), 1, args(aux_loss_alpha=0.1), alpha2=0.2, alpha3=0.3)
    assert losses.expert.item() == pytest.approx(0.1 * expert, abs=1e-7)
    assert losses.device.item() == pytest.approx(0.2 * device, abs=1e-7)
    assert losses.comm.item() == pytest.approx(0.3 * comm, abs=1e-7)
    assert losses.total.item() == pytest.approx(0.1 * expert + 0.2 * device + 0.3 * comm, abs=1e-7)
    assert (expert, device, comm) == pytest.approx((1.05, 1.0125, 0.63125))


def test_communication_loss_uses_the_device_limit():
    # group-limited routing with M = 1: f'' = D/(M T) * sent = 0.5 * [3, 2]
    a = args(topk_method="group_limited_greedy", n_group=2, topk_group=1)
    assert device_limit(a) == 1
    comm = balance_losses(routing(), 1, a, alpha3=1.0).comm.item()
    assert comm == pytest.approx(1.5 * 0.525 + 1.0 * 0.475)


def test_gradient_reaches_the_router_only_through_the_scores():
    logits = SCORES.log().requires_grad_()
    balance_losses(Routing(logits, IDS, torch.ones(4, 2)), 1, args()).expert.backward()
    g = torch.tensor([1.5, 1.0, 1.0, 0.5]) / 4  # dL/ds[t, e] = alpha1 f_e / T: the f terms carry no gradient
    # through the softmax: dL/dlogit[t, e] = s[t, e] (g_e - sum_j s[t, j] g_j)
    assert torch.allclose(logits.grad, SCORES * (g - (SCORES @ g)[:, None]))


def test_per_sequence_mean_and_whole_batch_variant():
    other_scores = SCORES.flip(1)
    other_ids = 3 - IDS
    both = routing(torch.cat([SCORES, other_scores]), torch.cat([IDS, other_ids]))
    a = args()
    first = balance_losses(routing(), 1, a)
    second = balance_losses(routing(other_scores, other_ids), 1, a)
    per_seq = balance_losses(both, 2, a)
    for name in ("expert", "device", "comm"):
        expect = (getattr(first, name) + getattr(second, name)) / 2
        assert torch.allclose(getattr(per_seq, name), expect)
    # seq_aux=False: the batch counts as one sequence of 8 tokens
    whole = balance_losses(both, 2, args(seq_aux=False))
    assert torch.allclose(whole.expert, balance_losses(both, 1, a).expert)


@pytest.mark.parametrize("M", [1, 2, 3])
def test_device_limited_routing_never_leaves_m_groups(M):
    torch.manual_seed(M)
    E, D, K = 16, 4, 4
    a = args(hidden_size=32, n_routed_experts=E, num_experts_per_tok=K, topk_method="group_limited_greedy",
             n_group=D, topk_group=M)
    gate = MoEGate(a)
    torch.nn.init.normal_(gate.weight, std=1.0)
    x = torch.randn(2048, 32)
    ids = gate(x).topk_ids
    groups_per_token = torch.zeros(len(ids), D).scatter_(1, ids // (E // D), 1.0).sum(-1)
    assert groups_per_token.max().item() <= M
    assert torch.unique(ids, dim=1).shape == ids.shape  # K distinct experts per token
    free = MoEGate(a.replace(topk_method="greedy"))  # the same router without the limit spreads wider
    free.weight = gate.weight
    free_groups = torch.zeros(len(ids), D).scatter_(1, free(x).topk_ids // (E // D), 1.0).sum(-1)
    assert free_groups.max().item() > M


def test_load_statistics_and_plot(tmp_path):
    counts = torch.stack([expert_counts(routing(), 4), torch.tensor([2.0, 2.0, 2.0, 2.0])])
    assert counts[0].tolist() == [3.0, 2.0, 2.0, 1.0]
    assert load_fractions(counts)[0].tolist() == [0.375, 0.25, 0.25, 0.125]
    assert load_spread(counts) == pytest.approx((1.5 + 1.0) / 2)
    pytest.importorskip("matplotlib")
    path = tmp_path / "load.png"
    plot_expert_load(load_fractions(counts), str(path), layer_ids=[1, 2], group_size=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
