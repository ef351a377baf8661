# Run: python -m pytest -q tests/test_sampling.py
"""The batched sampler against hand-computed distributions, penalties, masks and logprobs; and
SamplingParams' checks, each naming its parameter."""

import re

import pytest
import torch

from deepseek_v2.config import DEFAULT_MODEL
from deepseek_v2.engine.sequence import Sequence
from deepseek_v2.engine.sampler import Sampler
from deepseek_v2.tokenizer import Tokenizer
from deepseek_v2.sampling_params import BadWords, InvalidRequestError, SamplingParams


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
    (dict(logit_bias={"x": 1.0}), "logit_bias"), (dict(logit_bias={1: float("nan")}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(logit_bias=[1]), "logit_bias"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(allowed_token_ids=[1, -2]), "allowed_token_ids"),
    (dict(bad_words=["ok", "  "]), "bad_words"), (dict(bad_words=[3]), "bad_words"),
    (dict(bad_words=["a"], allowed_token_ids=[1]), "bad_words"),
    (dict(allowed_token_ids=[1], structured_outputs={"choice": ["b"]}), "allowed_token_ids"),
    (dict(bad_words=["b"], structured_outputs={"choice": ["b"]}), "bad_words"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"), (dict(truncate_prompt_tokens=-2), "truncate_prompt_tokens"),
])
def test_invalid_params_name_their_parameter(kw, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kw)
    assert info.value.param == param and param in str(info.value)


def test_logit_bias_allowed_and_banned_tokens_hand_computed():
    """Masks, then the bias added (string keys taken as token ids, as JSON's are); the caller's logits
    are left as they were."""
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0],
                           [1.0, 2.0, 3.0, 4.0, 5.0],
                           [1.0, 2.0, 3.0, 4.0, 5.0]])
    rows = [seq(logit_bias={"0": 10.0, 4: -2.5}),
            seq(allowed_token_ids=[1, 3], logit_bias={3: 1.0, 4: 7.0}),
            seq(output=[2], eos_token_id=4, min_tokens=2)]
    rows[2].sampling_params.bad_words_tokens = bad_words([[1], [2, 3], [0, 0]])  # 1 always; 3 after a 2; 0 after 0
    inf = float("inf")
    expected = torch.tensor([[11.0, 2.0, 3.0, 4.0, 2.5],
                             [-inf, 2.0, -inf, 5.0, -inf],
                             [1.0, -inf, 3.0, -inf, -inf]])  # EOS 4 before min_tokens
    sampler = Sampler()
    assert torch.equal(sampler.apply_masks(logits, rows), expected)
    assert torch.equal(sampler.apply_masks(logits, rows), expected), "the second step, from the cached rules"
    assert logits[0, 0] == 1.0
    sampler.release(rows[1].seq_id)
    assert rows[1].seq_id not in sampler.rules and rows[0].seq_id in sampler.rules
    assert tokens(Sampler(), logits[:1], [seq(temperature=0, logit_bias={0: 10.0})]) == [0]
    assert not SamplingParams(logit_bias={0: 1.0}).samples_on_device, "the host applies them"
    assert not SamplingParams(temperature=0, allowed_token_ids=[1]).plain_greedy


def test_sampling_draws_only_allowed_tokens():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert torch.allclose(empirical(logits, lambda: seq(allowed_token_ids=[1, 3])), torch.tensor([0, 0.75, 0, 0.25]),
                          atol=0.03)
    # a bias of log(3) on token 3 triples its weight: 0.4, 0.3, 0.2, 0.3 of 1.2
    biased = empirical(logits, lambda: seq(logit_bias={3: float(torch.log(torch.tensor(3.0)))}))
    assert torch.allclose(biased, torch.tensor([0.4, 0.3, 0.2, 0.3]) / 1.2, atol=0.03)


def test_bad_words_are_banned_by_their_last_token_after_the_rest():
    s = seq(output=[7, 5, 6])
    s.sampling_params.bad_words_tokens = bad_words([[9], [5, 6, 8], [6, 8], [7, 5, 6, 4], [1, 6, 2], [3]])
    # [9] and [3] always; [5, 6, 8] and [6, 8] end on "5 6" / "6"; [7, 5, 6, 4] on the whole output; [1, 6, 2] not
    assert s.never_token_ids == (3, 9)
    assert sorted(s.banned_token_ids()) == [4, 8, 8]
    assert seq(output=[]).banned_token_ids() == []
    short = seq(output=[6])
    short.sampling_params.bad_words_tokens = bad_words([[5, 6, 8]])
    assert short.banned_token_ids() == [], "an output shorter than the word's head bans nothing"


def test_bad_words_spell_the_word_at_the_start_and_inside_a_text():
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    texts = {tok.decode(ids) for ids in spellings(BadWords.of(tok, ["  harbor", "the"]))}
    assert texts == {"harbor", " harbor", "the", " the"}


class _Spelled:
    """A tokenizer whose texts are their own token ids, space-separated ("3 4" -> [3, 4])."""

    @staticmethod
    def encode_many(texts, add_special_tokens=False):
        return [[int(t) for t in text.split()] for text in texts]


def bad_words(words_as_ids: list[list[int]]) -> BadWords:
    return BadWords.of(_Spelled, [" ".join(map(str, w)) for w in words_as_ids])


def spellings(bad: BadWords) -> list[list[int]]:
    return [[t] for t in bad.never] + [[*head, last] for group in bad.heads.values()
                                       for head, lasts in group.items() for last in lasts]


def test_truncated_keeps_the_prompts_end():
    ids = list(range(10))
    assert SamplingParams(truncate_prompt_tokens=3).truncated(ids, 100) == [7, 8, 9]
    assert SamplingParams(truncate_prompt_tokens=30).truncated(ids, 100) == ids
    assert SamplingParams(truncate_prompt_tokens=-1, max_tokens=4).truncated(ids, 8) == [6, 7, 8, 9]
    assert SamplingParams(truncate_prompt_tokens=-1, max_tokens=None).truncated(ids, 8) == list(range(3, 10))
    assert SamplingParams().truncated(ids, 5) == ids


def run(engine, prompt, params) -> list[int]:
    engine.add_request("r", prompt, params)
    while engine.has_unfinished_requests():
        outs = [o for o in engine.step() if o.finished]
    return outs[0]


def test_engine_generates_within_allowed_tokens_without_bad_words_and_with_the_bias(tiny_engine):
    engine = tiny_engine()
    tok = engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What does the word harbor mean?"}],
                                     add_generation_prompt=True)
    plain = run(engine, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)).outputs[0]
    first = plain.token_ids[0]
    # a bias of -100 on the greedy first token: another first token; +100 on any token: that one throughout
    assert run(engine, prompt, SamplingParams(temperature=0, max_tokens=1, logit_bias={first: -100})
               ).outputs[0].token_ids[0] != first
    assert run(engine, prompt, SamplingParams(temperature=0, max_tokens=4, logit_bias={str(first + 1): 100})
               ).outputs[0].token_ids == [first + 1] * 4
    allowed = [tok.encode(w, add_special_tokens=False)[0] for w in (" yes", " no", ".")]
    out = run(engine, prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=16, allowed_token_ids=allowed,
                                             ignore_eos=True)).outputs[0]
    assert len(out.token_ids) == 16 and set(out.token_ids) <= set(allowed)
    word = re.findall("[a-z]{3,}", plain.text)[0]  # a word of the plain greedy reply
    banned = run(engine, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=[word]))
    out = banned.outputs[0].token_ids

    def spelled(ids) -> bool:  # banned as its tokens, as in vLLM (its letters in other tokens can still come)
        return any(ids[i:i + len(w)] == w for w in spellings(BadWords.of(tok, [word])) for i in range(len(ids)))
    assert spelled(plain.token_ids) and not spelled(out)


def test_engine_truncates_prompts_and_checks_the_new_fields(tiny_engine):
    engine = tiny_engine()
    ids = engine.tokenizer.encode("one two three four five six seven eight")
    out = run(engine, ids, SamplingParams(temperature=0, max_tokens=3, truncate_prompt_tokens=4))
    assert out.prompt_token_ids == ids[-4:]
    assert out.outputs[0].token_ids == run(engine, ids[-4:], SamplingParams(temperature=0, max_tokens=3)
                                           ).outputs[0].token_ids
    text = "word " * (engine.max_model_len + 10)  # longer than the context: cut, not refused
    out = run(engine, text, SamplingParams(max_tokens=2, truncate_prompt_tokens=-1))
    assert len(out.prompt_token_ids) == engine.max_model_len - 2 and out.prompt == engine.tokenizer.decode(
        out.prompt_token_ids)
    V, eos = engine.vocab_size, engine.tokenizer.eos_token_id
    for params, param in [(SamplingParams(logit_bias={V: 1.0}), "logit_bias"),
                          (SamplingParams(allowed_token_ids=[1, V]), "allowed_token_ids"),
                          (SamplingParams(allowed_token_ids=[eos], min_tokens=1), "allowed_token_ids"),
                          (SamplingParams(bad_words=["w"] * V), "bad_words")]:
        with pytest.raises(InvalidRequestError) as info:
            engine.add_request("bad", ids, params)
        assert info.value.param == param
    assert not engine.has_unfinished_requests()
