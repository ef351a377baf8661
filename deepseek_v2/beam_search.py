"""Beam search (vLLM's `LLM.beam_search` and `use_beam_search`): the `beam_width` most likely continuations
of a prompt, found one token at a time over the engine. Each step asks the engine for one token of every
live beam with its 2 x beam_width most likely alternatives (the prefix cache keeps the beams' shared tokens
computed), extends each beam by each alternative, puts aside the candidates that end in EOS, and keeps the
best beam_width of the others. A sequence's score is its cumulative log-probability divided by its length
(prompt included, EOS not) to the power length_penalty, as vLLM scores them. `BeamSearch` holds the search
and leaves running the steps to its caller (`LLM.beam_search`, or the server's event loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .outputs import RequestOutput
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


class BeamSearch:
    """The search over some prompts: `step_prompts` are the live beams' tokens to run one step on (with
    `step_params`), `advance` takes that step's outputs, in the same order; `done` says when to stop, and
    `results` gives each prompt's best sequences."""

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams, eos_token_id: int | None):
        self.prompts, self.params = prompts, params
        self.eos = None if params.ignore_eos else eos_token_id
        self.step_params = SamplingParams(max_tokens=1, temperature=params.temperature,
                                          logprobs=2 * params.beam_width, ignore_eos=True)
        self.beams = [[BeamSearchSequence(list(p))] for p in prompts]  # per prompt, its live beams
        self.finished: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        self.steps = 0

    def key(self, seq: BeamSearchSequence) -> float:
        return score(seq, self.eos, self.params.length_penalty)

    @property
    def live(self) -> list[tuple[int, BeamSearchSequence]]:
        return [(i, b) for i, group in enumerate(self.beams) for b in group]

    @property
    def done(self) -> bool:
        return self.steps == self.params.max_tokens or not self.live

    def step_prompts(self) -> list[list[int]]:
        return [b.tokens for _, b in self.live]

    def advance(self, outputs: list[RequestOutput]) -> None:
        candidates: list[list[BeamSearchSequence]] = [[] for _ in self.prompts]
        for (i, beam), out in zip(self.live, outputs):
            alternatives = out.outputs[0].logprobs[0]  # the drawn token and the 2 x beam_width best
            for token, logprob in alternatives.items():
                new = BeamSearchSequence(beam.tokens + [token], beam.cum_logprob + logprob,
                                         beam.logprobs + [alternatives], finished=token == self.eos)
                (self.finished[i] if new.finished else candidates[i]).append(new)
        self.beams = [sorted(c, key=self.key, reverse=True)[:self.params.beam_width] for c in candidates]
        self.steps += 1

    def results(self, decode: Callable[[list[int]], str]) -> list[BeamSearchOutput]:
        """Each prompt's best sequences, best first, with the text of their generated tokens (EOS left out)."""
        outputs = []
        for i, prompt in enumerate(self.prompts):
            best = sorted(self.finished[i] + self.beams[i], key=self.key, reverse=True)[:self.params.beam_width]
            for seq in best:
                generated = seq.tokens[len(prompt):]
                seq.text = decode(generated[:-1] if seq.finished else generated)
            outputs.append(BeamSearchOutput(best))
        return outputs
