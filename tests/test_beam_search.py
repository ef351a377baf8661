# Run: python -m pytest -q tests/test_beam_search.py
"""LLM.beam_search against the same search over the model's plain forward pass (no engine, no cache),
and against greedy decoding at width one."""

import pytest
import torch

from deepseek_v2 import LLM, BeamSearchParams, InvalidRequestError, SamplingParams
from deepseek_v2.beam_search import score


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu", num_kv_blocks=64)


def reference(model, prompt: list[int], width: int, max_tokens: int, eos: int, length_penalty: float = 1.0):
    """The search written out over full forward passes: every live beam's next-token log-probabilities,
    its 2 x width best continuations, EOS ones set aside, the best width kept."""
    beams, done = [(list(prompt), 0.0)], []
    key = lambda b: b[1] / (len(b[0]) - (b[0][-1] == eos)) ** length_penalty  # noqa: E731
    for _ in range(max_tokens):
        candidates = []
        for tokens, cum in beams:
            with torch.no_grad():
                logprobs = model(torch.tensor([tokens]))[0, -1].log_softmax(-1)
            values, ids = logprobs.topk(2 * width)
            for lp, t in zip(values.tolist(), ids.tolist()):
                (done if t == eos else candidates).append((tokens + [t], cum + lp))
        beams = sorted(candidates, key=key, reverse=True)[:width]
    return sorted(done + beams, key=key, reverse=True)[:width]


@pytest.mark.parametrize("width, length_penalty", [(2, 1.0), (3, 0.5)])
def test_beam_search_equals_the_search_over_plain_forward_passes(llm, width, length_penalty):
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What does the word harbor mean?"}],
                                               add_generation_prompt=True)
    params = BeamSearchParams(beam_width=width, max_tokens=6, length_penalty=length_penalty)
    [out] = llm.beam_search([prompt], params)
    expect = reference(llm.engine.model, prompt, width, 6, llm.tokenizer.eos_token_id, length_penalty)
    assert [s.tokens for s in out.sequences] == [tokens for tokens, _ in expect]
    assert [s.cum_logprob for s in out.sequences] == pytest.approx([cum for _, cum in expect], abs=1e-3)
    scores = [score(s, llm.tokenizer.eos_token_id, length_penalty) for s in out.sequences]
    assert scores == sorted(scores, reverse=True)
    assert out.sequences[0].text == llm.tokenizer.decode(out.sequences[0].tokens[len(prompt):],
                                                         skip_special_tokens=True)


def test_width_one_is_greedy_and_bad_params_name_themselves(llm):
    prompts = ["The dictionary is", "def main():"]
    outs = llm.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=8, ignore_eos=True))
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for out, g in zip(outs, greedy):
        assert out.sequences[0].tokens[len(g.prompt_token_ids):] == g.outputs[0].token_ids
    for kw, param in [(dict(beam_width=0, max_tokens=4), "beam_width"), (dict(beam_width=11, max_tokens=4), "beam_width"),
                      (dict(beam_width=2, max_tokens=0), "max_tokens")]:
        with pytest.raises(InvalidRequestError) as info:
            BeamSearchParams(**kw)
        assert info.value.param == param
