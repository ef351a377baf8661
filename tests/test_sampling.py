# Run: python -m pytest -q tests/test_sampling.py
"""The batched sampler against hand-computed distributions and penalties."""

import pytest
import torch

from deepseek_v2.sampling import SampleRequest, Sampler, SamplingParams


def row(**kw):
    return SampleRequest(SamplingParams(**kw), prompt_token_ids=[], output_token_ids=[])


def empirical(logits, req, draws=4000, seed=0):
    sampler = Sampler(torch.Generator().manual_seed(seed))
    counts = torch.zeros(logits.numel())
    batch = logits[None].expand(draws, -1).contiguous()
    tokens = sampler(batch, [req] * draws).token_ids
    counts += torch.bincount(tokens, minlength=logits.numel())
    return counts / draws


def test_greedy_and_temperature_distribution():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    assert Sampler()(logits[None], [row(temperature=0)]).token_ids.item() == 1
    freq = empirical(logits, row(temperature=0.7))
    assert torch.allclose(freq, (logits / 0.7).softmax(-1), atol=0.03)


def test_top_k_top_p_min_p_masks():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert torch.allclose(empirical(logits, row(top_k=2)), torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=0.03)
    # top_p=0.65: 0.4 alone is below, 0.4 + 0.3 reaches it -> keep two
    assert torch.allclose(empirical(logits, row(top_p=0.65)), torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=0.03)
    # min_p=0.4: keep tokens with p >= 0.4 * 0.4 = 0.16 -> three
    assert torch.allclose(empirical(logits, row(min_p=0.4)), torch.tensor([4 / 9, 3 / 9, 2 / 9, 0]), atol=0.03)


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    req = SampleRequest(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
                        prompt_token_ids=[0], output_token_ids=[1, 3, 3])
    got = Sampler.apply_penalties(logits.clone(), [req])[0]
    expected = torch.tensor([2.0 / 2,                  # prompt token: repetition only
                             -1.0 * 2 - 0.5 - 0.25,    # output once
                             0.5,
                             3.0 / 2 - 0.5 - 0.5,      # output twice
                             1.0])
    assert torch.allclose(got, expected)


def test_seeded_rows_ignore_the_rest_of_the_batch():
    logits = torch.randn(3, 50)
    def seeded():
        return SampleRequest(SamplingParams(temperature=1.0, seed=5), [], [],
                             generator=torch.Generator().manual_seed(5))
    a = Sampler(torch.Generator().manual_seed(1))(logits, [row(), seeded(), row()]).token_ids[1]
    b = Sampler(torch.Generator().manual_seed(2))(logits[1:2], [seeded()]).token_ids[0]
    assert a == b


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(2, 10)
    out = Sampler()(logits, [row(temperature=0, logprobs=3), row(temperature=0.5, top_k=2)])
    ref = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])
    assert torch.allclose(out.top_logprobs[0], ref[0].topk(3).values)


def test_blocked_tokens_never_sampled():
    logits = torch.tensor([[5.0, 0.0, 0.0]])
    req = SampleRequest(SamplingParams(temperature=0), [], [], blocked_token_ids=[0])
    assert Sampler()(logits, [req]).token_ids.item() != 0


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n must"), (dict(logprobs=21), "logprobs"),
    (dict(stop=[""]), "stop"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
])
def test_invalid_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
