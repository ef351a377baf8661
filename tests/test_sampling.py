# Run: python -m pytest -q tests/test_sampling.py
"""The batched sampler against hand-computed distributions, penalties, masks and logprobs; and
SamplingParams' checks, each naming its parameter."""

import pytest
import torch

from deepseek_v2.engine.sequence import Sequence
from deepseek_v2.engine.sampler import Sampler
from deepseek_v2.sampling_params import InvalidRequestError, SamplingParams


def seq(prompt=(), output=(), eos_token_id=None, **kw) -> Sequence:
    s = Sequence(list(prompt), SamplingParams(**kw), eos_token_id=eos_token_id)
    s.output_token_ids = list(output)
    return s


def tokens(sampler, logits, seqs) -> list[int]:
    return [t.token_id for t in sampler(logits, seqs)]


def empirical(logits, make_seq, draws=4000, seed=0):
    batch = logits[None].expand(draws, -1).contiguous()
    drawn = tokens(Sampler(seed=seed), batch, [make_seq() for _ in range(draws)])
    return torch.bincount(torch.tensor(drawn), minlength=logits.numel()) / draws


def test_greedy_and_temperature_distribution():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    assert tokens(Sampler(), logits[None], [seq(temperature=0)]) == [1]
    freq = empirical(logits, lambda: seq(temperature=0.7))
    assert torch.allclose(freq, (logits / 0.7).softmax(-1), atol=0.03)


def test_top_k_top_p_min_p_masks():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert torch.allclose(empirical(logits, lambda: seq(top_k=2)), torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=0.03)
    # top_p=0.65: 0.4 alone is below, 0.4 + 0.3 reaches it -> keep two
    assert torch.allclose(empirical(logits, lambda: seq(top_p=0.65)), torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=0.03)
    # min_p=0.4: keep tokens with p >= 0.4 * 0.4 = 0.16 -> three
    assert torch.allclose(empirical(logits, lambda: seq(min_p=0.4)), torch.tensor([4 / 9, 3 / 9, 2 / 9, 0]),
                          atol=0.03)


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    s = seq(prompt=[0], output=[1, 3, 3], repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = Sampler.apply_penalties(logits, [s])[0]
    expected = torch.tensor([2.0 / 2,                  # prompt token: repetition only
                             -1.0 * 2 - 0.5 - 0.25,    # output once
                             0.5,
                             3.0 / 2 - 0.5 - 0.5,      # output twice
                             1.0])
    assert torch.allclose(got, expected)
    assert logits[0, 0] == 2.0, "the caller's logits are left as they were"


def test_seeded_rows_ignore_the_rest_of_the_batch():
    logits = torch.randn(3, 50)
    a = tokens(Sampler(seed=1), logits, [seq(), seq(temperature=1.0, seed=5), seq()])[1]
    b = tokens(Sampler(seed=2), logits[1:2], [seq(temperature=1.0, seed=5)])[0]
    assert a == b


def test_a_seeded_sequence_keeps_its_generator_until_released():
    logits = torch.randn(1, 1000)
    s = seq(temperature=1.0, seed=9)
    sampler = Sampler()
    first = [tokens(sampler, logits, [s])[0] for _ in range(4)]
    assert len(set(first)) > 1, "one generator advancing, not re-seeded every step"
    sampler.release(s.seq_id)
    assert s.seq_id not in sampler.seeded
    assert [tokens(sampler, logits, [s])[0] for _ in range(4)] == first  # starts again from the seed


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(2, 10)
    out = Sampler()(logits, [seq(temperature=0, logprobs=3), seq(temperature=0.5, top_k=2)])
    ref = logits.log_softmax(-1)
    first = out[0].logprobs
    assert first.token_id == out[0].token_id == ref[0].argmax().item()
    assert first.logprob == pytest.approx(ref[0].max().item())
    assert [t for t, _ in first.top] == ref[0].topk(3).indices.tolist()
    assert torch.allclose(torch.tensor([lp for _, lp in first.top]), ref[0].topk(3).values)
    assert out[1].logprobs is None  # not asked for


def test_prompt_logprobs_score_the_next_prompt_token():
    logits = torch.randn(3, 10)
    s = seq(prompt=[4, 7, 1, 2], prompt_logprobs=2)
    entries = Sampler().prompt_logprobs(logits, s, positions=[0, 1, 2])
    ref = logits.log_softmax(-1)
    assert [e.token_id for e in entries] == [7, 1, 2]
    assert [e.logprob for e in entries] == pytest.approx([ref[0, 7].item(), ref[1, 1].item(), ref[2, 2].item()])
    assert all(len(e.top) == 2 for e in entries)


def test_stop_tokens_are_masked_until_min_tokens():
    """EOS and stop_token_ids cannot be produced before min_tokens output tokens (vLLM's min_tokens)."""
    logits = torch.tensor([[5.0, 4.0, 0.0, 1.0]])  # EOS = 0 is the favourite, then stop token 1
    assert tokens(Sampler(), logits, [seq(output=[3], eos_token_id=0, temperature=0, min_tokens=2,
                                          stop_token_ids=[1])]) == [3]
    assert tokens(Sampler(), logits, [seq(output=[3, 3], eos_token_id=0, temperature=0, min_tokens=2)]) == [0]
    ignoring = seq(output=[], eos_token_id=0, temperature=0, min_tokens=2, ignore_eos=True)
    assert tokens(Sampler(), logits, [ignoring]) == [0], "with ignore_eos, EOS is no stop token"


@pytest.mark.parametrize("kw, param", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"), (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"), (dict(stop=[""]), "stop"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(seed=2**64), "seed"), (dict(stop=5), "stop"), (dict(stop_token_ids=7), "stop_token_ids"),
    (dict(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs"),
])
def test_invalid_params_name_their_parameter(kw, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kw)
    assert info.value.param == param and param in str(info.value)
