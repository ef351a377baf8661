"""What a request asks of generation: `SamplingParams` (vLLM's names and defaults), and
`InvalidRequestError`, the one error every request check raises, naming the parameter at fault.

Pure Python (no torch): the scheduler and sequences hold these, and the server builds them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

GREEDY_EPS = 1e-5  # temperatures below this mean greedy
# Sample i of a seeded request draws from seed + i, and a torch generator takes any 64-bit seed: the
# headroom keeps seed + i a 64-bit integer for every n (and both bounds are exact as JSON numbers).
SEED_MIN, SEED_MAX = -2**63, 2**63 - 2**16


class InvalidRequestError(ValueError):
    """A request the engine cannot serve. `param` names the request parameter at fault (the
    SamplingParams field, or "prompt"), so a server can report it without parsing the message."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt (with the output asked for) does not fit in the context length."""


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A grammar the output must follow (vLLM's `structured_outputs`): exactly one of
    json (a JSON schema, as a dict or a JSON string), regex, choice (the output is one of these
    strings), grammar (Lark, or GBNF when it has `::=`) and json_object (any JSON object)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    @property
    def kind(self) -> str:
        return next(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the grammar (the cache key): its kind and its text."""
        value = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, dict) or self.kind == "choice":
            value = json.dumps(value, sort_keys=True, ensure_ascii=False)
        return self.kind, str(value)

    def problem(self) -> str | None:
        """What is wrong with its shape, or None (the grammar itself is checked when compiled)."""
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            return f"give exactly one of json, regex, choice, grammar, json_object; got {given or 'none'}"
        value = getattr(self, given[0])
        ok = {"json": isinstance(value, (dict, str)), "regex": isinstance(value, str) and bool(value),
              "choice": isinstance(value, (list, tuple)) and bool(value)
              and all(isinstance(c, str) and c for c in value),
              "grammar": isinstance(value, str) and bool(value.strip()), "json_object": value is True}
        if not ok[given[0]]:
            kinds = {"json": "a JSON schema (an object or a JSON string)", "regex": "a non-empty string",
                     "choice": "a non-empty list of non-empty strings", "grammar": "a non-empty string",
                     "json_object": "true"}
            return f"{given[0]} must be {kinds[given[0]]}, got {value!r}"[:300]
        return None


@dataclass(frozen=True)
class BadWords:
    """bad_words as rules on tokens (vLLM's): each word is spelled as the tokenizer spells it alone and
    after a space; a one-token spelling is never produced (`never`), the last token of a longer one not
    where the output ends with the rest (`heads`: the rest's length -> the rest -> those last tokens, so
    that a step looks up one ending per length, however many words there are). Made once per request,
    off the engine's thread (`SamplingParams.tokenize_bad_words`)."""

    never: tuple[int, ...]
    heads: dict[int, dict[tuple[int, ...], tuple[int, ...]]]

    @classmethod
    def of(cls, tokenizer, words: list[str]) -> BadWords:
        texts = [t for w in words for t in (w.lstrip(), " " + w.lstrip())]
        spellings = {tuple(ids) for ids in tokenizer.encode_many(texts, add_special_tokens=False) if ids}
        heads: dict[int, dict[tuple[int, ...], tuple[int, ...]]] = {}
        for *head, last in sorted(w for w in spellings if len(w) > 1):
            group = heads.setdefault(len(head), {})
            group[tuple(head)] = group.get(tuple(head), ()) + (last,)
        return cls(tuple(sorted(w[0] for w in spellings if len(w) == 1)), heads)

    def banned_after(self, output: list[int]) -> list[int]:
        """The last tokens of the longer spellings whose other tokens end `output`."""
        banned: list[int] = []
        for k, group in self.heads.items():
            if len(output) >= k:
                banned += group.get(tuple(output[len(output) - k:]), ())
        return banned


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0  # stop tokens (EOS included) cannot end the output before this many tokens
    logprobs: int | None = None  # top-N alternatives per generated token (0: only the chosen one)
    prompt_logprobs: int | None = None  # same for every prompt token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False: token ids only (stop strings need text)
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output follows
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    allowed_token_ids: list[int] | None = None  # only these tokens can be produced
    bad_words: list[str] | None = None  # words the output never contains (each as its tokens)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: as many as fit)
    cache_salt: str | None = None  # the prefix cache shares blocks only between requests with the same salt
    bad_words_tokens: BadWords | None = field(default=None, repr=False, compare=False)  # tokenize_bad_words

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        # anything else than a list is left as it is for validate() to name
        self.stop = list(self.stop) if isinstance(self.stop, (list, tuple)) else self.stop or []
        self.stop_token_ids = (list(self.stop_token_ids) if isinstance(self.stop_token_ids, (list, tuple))
                               else self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.logit_bias, dict):  # token ids as strings too (JSON's keys), as vLLM takes them
            self.logit_bias = {_token_key(k): v for k, v in self.logit_bias.items()}
        if isinstance(self.allowed_token_ids, tuple):
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.bad_words, (str, tuple)):
            self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words)
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError, naming the field, for a value generation cannot use."""
        def check(cond: bool, param: str, message: str):
            if not cond:
                raise InvalidRequestError(message, param)

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        check(integer(self.n) and self.n >= 1, "n", f"n must be a positive integer, got {self.n!r}")
        check(self.temperature >= 0, "temperature", f"temperature must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        check(integer(self.top_k) and 0 <= self.top_k < 2**31, "top_k",
              f"top_k must be a non-negative integer below 2^31 (0 or -1 disables it), got {self.top_k!r}")
        check(0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        check(self.repetition_penalty > 0, "repetition_penalty",
              f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            check(-2 <= getattr(self, name) <= 2, name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        check(self.max_tokens is None or (integer(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
              f"max_tokens must be at least 1, got {self.max_tokens!r}")
        check(integer(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
              f"min_tokens must be >= 0, got {self.min_tokens!r}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
              f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or (integer(value) and 0 <= value <= 20), name,
                  f"{name} must be an integer in 0..20, got {value!r}")
        check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop), "stop",
              f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        check(isinstance(self.stop_token_ids, list) and all(integer(t) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        check(self.seed is None or (integer(self.seed) and SEED_MIN <= self.seed <= SEED_MAX), "seed",
              f"seed must be an integer in [-2^63, 2^63 - 2^16], got {self.seed!r}")
        check(self.detokenize or not self.stop, "stop", "stop strings need detokenize=True")
        so = self.structured_outputs
        if so is not None:
            check(isinstance(so, StructuredOutputsParams), "structured_outputs",
                  f"structured_outputs must be a StructuredOutputsParams, got {type(so).__name__}")
            problem = so.problem()
            check(problem is None, "structured_outputs", f"structured_outputs: {problem}")
            # the grammar ends the output with EOS, which these would hold off or ignore
            check(not self.ignore_eos, "ignore_eos", "ignore_eos cannot be used with structured outputs")
            check(not self.min_tokens, "min_tokens", "min_tokens cannot be used with structured outputs")
            # these could forbid every token the grammar allows at some step, leaving nothing to sample
            for name in ("allowed_token_ids", "bad_words"):
                check(getattr(self, name) is None, name, f"{name} cannot be used with structured outputs")
        lb = self.logit_bias
        check(lb is None or (isinstance(lb, dict) and all(integer(k) and k >= 0 for k in lb)
                             and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                     for v in lb.values())),
              "logit_bias", f"logit_bias must map token ids to finite numbers, got {_short(lb)}")
        ids = self.allowed_token_ids
        check(ids is None or (isinstance(ids, list) and ids and all(integer(t) and t >= 0 for t in ids)),
              "allowed_token_ids", f"allowed_token_ids must be a non-empty list of token ids, got {_short(ids)}")
        words = self.bad_words
        check(words is None or (isinstance(words, list) and all(isinstance(w, str) and w.strip() for w in words)),
              "bad_words", f"bad_words must be a list of words (strings with more than spaces), got {_short(words)}")
        # with both, a bad word's last token could be the only allowed one left at some step
        check(ids is None or not words, "bad_words", "give allowed_token_ids or bad_words, not both")
        k = self.truncate_prompt_tokens
        check(k is None or (integer(k) and (k >= 1 or k == -1)), "truncate_prompt_tokens",
              f"truncate_prompt_tokens must be a positive integer or -1, got {k!r}")
        check(self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt), "cache_salt",
              f"cache_salt must be a non-empty string, got {_short(self.cache_salt)}")
        check(self.bad_words_tokens is None or isinstance(self.bad_words_tokens, BadWords), "bad_words",
              "bad_words_tokens is made from bad_words (tokenize_bad_words), not given")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the sampler: argmax of the raw logits is the answer."""
        return self.greedy and self.samples_on_device

    @property
    def samples_on_device(self) -> bool:
        """Nothing of this row's sampling needs the host (no logprobs, grammar, min_tokens or penalties):
        its token can be drawn on the device and fed to the next step there (asynchronous scheduling)."""
        return (self.logprobs is None and self.min_tokens == 0 and self.structured_outputs is None
                and self.repetition_penalty == 1.0 and not self.presence_penalty and not self.frequency_penalty
                and not self.logit_bias and self.allowed_token_ids is None and not self.bad_words)

    def tokenize_bad_words(self, tokenizer) -> None:
        """Spell bad_words in tokens (BadWords), once; the engine does it when a request is added if no one
        did before (the server does it in a worker thread, so a long list does not hold up the engine)."""
        if self.bad_words and self.bad_words_tokens is None:
            self.bad_words_tokens = BadWords.of(tokenizer, self.bad_words)

    def truncated(self, prompt_token_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt as generation takes it: its last truncate_prompt_tokens tokens (with -1, as many as
        leave room for max_tokens, or for one token when max_tokens is None)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return prompt_token_ids
        if k == -1:
            k = max_model_len - (self.max_tokens or 1)
        return prompt_token_ids[-k:] if k >= 1 else prompt_token_ids

    def all_stop_token_ids(self, eos_token_id: int | None) -> frozenset[int]:
        """The tokens that end a sequence: stop_token_ids, and the tokenizer's EOS unless ignore_eos."""
        eos = () if self.ignore_eos or eos_token_id is None else (eos_token_id,)
        return frozenset([*self.stop_token_ids, *eos])


def _token_key(key):
    """A logit_bias key as a token id: "42" -> 42 (anything else is left for validate() to name)."""
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return key


def _short(value) -> str:
    """A value for an error message, cut short: only a long collection's first items are written out
    (the message is made whether or not the check fails)."""
    if isinstance(value, dict) and len(value) > 8:
        return repr(dict(list(value.items())[:8]))[:-1] + ", ...}"
    if isinstance(value, list) and len(value) > 8:
        return repr(value[:8])[:-1] + ", ...]"
    return repr(value)[:200]
