"""The checks a request must pass before it is queued, against an engine's tokenizer and limits.

`LLMEngine` runs them on the requests given to it; the server's view of an engine that runs in
another process (`engine_process.RemoteEngine`) runs the same ones on the same values before it
sends a request there, so a bad request is refused with the same words either way.
"""

from __future__ import annotations

import functools

from ..sampling_params import ContextLengthError, InvalidRequestError, SamplingParams
from ..tokenizer import Tokenizer


class RequestChecks:
    """Needs tokenizer, max_model_len and vocab_size."""

    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int

    def encode_prompt(self, prompt: str | list[int], params: SamplingParams | None = None
                      ) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt, cut to params.truncate_prompt_tokens (a cut text is
        given as its kept tokens' text)."""
        truncating = params is not None and params.truncate_prompt_tokens is not None
        if isinstance(prompt, str):
            if not truncating:  # a text cut to its end may be longer than the context
                self.check_prompt_chars(len(prompt), "prompt")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        if truncating:
            kept = params.truncated(ids, self.max_model_len)
            if len(kept) < len(ids):
                text, ids = (None if text is None else self.tokenizer.decode(kept)), kept
        return text, ids

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """A text of more characters than this has more than max_model_len tokens, whatever it says:
        a character is at least one UTF-8 byte and no token covers more bytes than the vocabulary's
        longest (the byte-level BPE of DeepSeek's tokenizers, with no normalizer to shorten the
        text). A bound that costs no tokenizing."""
        tok = self.tokenizer
        longest = max(len(tok.decode([i]).encode()) for i in range(len(tok)))
        return self.max_model_len * longest

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        """Raise ContextLengthError for a text of num_chars characters, too long to fit the context
        whatever its tokens are: a check to make before tokenizing it."""
        if num_chars > self.max_prompt_chars:
            raise ContextLengthError(f"the {param} has {num_chars} characters, more than the {self.max_model_len} "
                                     f"tokens of this model's context can hold", param)

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        """Raise InvalidRequestError unless every id is a token of the vocabulary."""
        vocab = self.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]!r} is out of the vocabulary (0..{vocab - 1})", param)

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError, naming the parameter, for a request this engine cannot serve.
        (SamplingParams checked its own values when it was made; these are the rules that need the
        model and the engine's limits.)"""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(prompt_token_ids) >= self.max_model_len:  # before the ids are read: a long list costs
            raise ContextLengthError(f"the prompt has {len(prompt_token_ids)} tokens; the context length is "
                                     f"{self.max_model_len}, leaving no room for output", "prompt")
        self.check_token_ids(prompt_token_ids, "prompt")
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        for name in ("logit_bias", "allowed_token_ids"):
            if getattr(params, name):
                self.check_token_ids(list(getattr(params, name)), name)
        # what could leave a step with no token to sample (structured outputs refuse both themselves)
        stops = params.all_stop_token_ids(self.tokenizer.eos_token_id)
        if params.allowed_token_ids and params.min_tokens and set(params.allowed_token_ids) <= stops:
            raise InvalidRequestError("allowed_token_ids holds only stop tokens, which min_tokens forbids "
                                      "before its count", "allowed_token_ids")
        if params.bad_words and 2 * len(params.bad_words) + len(stops) >= self.vocab_size:
            raise InvalidRequestError(f"bad_words has {len(params.bad_words)} words, enough to forbid every "
                                      f"token of this vocabulary ({self.vocab_size})", "bad_words")
        if params.structured_outputs is not None:
            self.grammar_compiler.compile(params.structured_outputs)  # compiled once, then cached

    @functools.cached_property
    def grammar_compiler(self):
        """The grammars of structured outputs (structured_outputs.py), made on the first request that
        has one: requests without pay nothing, not even the tokenizer's conversion."""
        from ..structured_outputs import GrammarCompiler
        return GrammarCompiler(self.tokenizer, self.vocab_size)
