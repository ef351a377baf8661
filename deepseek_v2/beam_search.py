"""Beam search (vLLM's `LLM.beam_search`): the `beam_width` most likely continuations of a prompt, found
one token at a time over the engine. Each step asks the engine for one token of every live beam with its
2 x beam_width most likely alternatives (the prefix cache keeps the beams' shared tokens computed), extends
each beam by each alternative, puts aside the candidates that end in EOS, and keeps the best beam_width
of the others. A sequence's score is its cumulative log-probability divided by its length (prompt included,
EOS not) to the power length_penalty, as vLLM scores them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .sampling_params import InvalidRequestError, SamplingParams


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # of the step's draws; the beams are ranked on the model's log-probabilities
    length_penalty: float = 1.0

    def __post_init__(self):
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}", name)
        if 2 * self.beam_width > 20:  # the alternatives a step asks for are logprobs, at most 20
            raise InvalidRequestError(f"beam_width must be at most 10, got {self.beam_width}", "beam_width")


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # the prompt's, then the generated ones
    cum_logprob: float = 0.0
    logprobs: list[dict[int, float]] = field(default_factory=list)  # per generated token, the step's alternatives
    text: str | None = None  # the generated tokens' text, once finished
    finished: bool = False  # ended by EOS


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


def score(seq: BeamSearchSequence, eos_token_id: int | None, length_penalty: float) -> float:
    length = len(seq.tokens) - (seq.tokens[-1] == eos_token_id)
    return seq.cum_logprob / length ** length_penalty


def beam_search(generate: Callable[[list[list[int]], SamplingParams], list], prompts: list[list[int]],
                params: BeamSearchParams, eos_token_id: int | None,
                decode: Callable[[list[int]], str]) -> list[BeamSearchOutput]:
    """`generate(token_id_prompts, sampling_params)` returns one RequestOutput per prompt, in order (all
    the prompts' beams go to it as one batch each step)."""
    step = SamplingParams(max_tokens=1, temperature=params.temperature, logprobs=2 * params.beam_width,
                          ignore_eos=True)
    beams = [[BeamSearchSequence(list(p))] for p in prompts]  # per prompt, its live beams
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    key = lambda s: score(s, eos_token_id, params.length_penalty)  # noqa: E731
    for _ in range(params.max_tokens):
        live = [(i, b) for i, group in enumerate(beams) for b in group]
        if not live:
            break
        outs = generate([b.tokens for _, b in live], step)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), out in zip(live, outs):
            alternatives = out.outputs[0].logprobs[0]  # the drawn token and the 2 x beam_width best
            for token, logprob in alternatives.items():
                new = BeamSearchSequence(beam.tokens + [token], beam.cum_logprob + logprob,
                                         beam.logprobs + [alternatives])
                if token == eos_token_id and not params.ignore_eos:
                    new.finished = True
                    done[i].append(new)
                else:
                    candidates[i].append(new)
        beams = [sorted(c, key=key, reverse=True)[:params.beam_width] for c in candidates]
    results = []
    for i, prompt in enumerate(prompts):
        best = sorted(done[i] + beams[i], key=key, reverse=True)[:params.beam_width]
        for seq in best:
            generated = seq.tokens[len(prompt):]
            seq.text = decode(generated[:-1] if seq.finished else generated)
        results.append(BeamSearchOutput(best))
    return results
