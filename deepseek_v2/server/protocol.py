"""The OpenAI requests as pydantic models, with vLLM's extra sampling fields: the fields completions and
chat share (`SamplingFields`), completions and /detokenize (chat_protocol.py holds the chat requests,
responses.py the response bodies, errors.py the error bodies). Each request turns itself into
`SamplingParams` and prompt token ids, and names its own field for an engine parameter (`param_name`), so
an `InvalidRequestError` from the engine's rules becomes a 400 naming the field the client sent
(`invalid`).

Unknown request fields are accepted and ignored, as vLLM does; non-finite floats are refused, and
types are strict as OpenAI's are ("0" is not a number, true is not an integer, "yes" is not a boolean).
Value ranges are checked once, by `SamplingParams` and the engine; the models here fix types and
shapes (which `/openapi.json` publishes), and check only what is the OpenAI API's own (its field
combinations, the context length with max_tokens).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field

from ..beam_search import BeamSearchParams
from ..sampling_params import (SEED_MAX, SEED_MIN, ContextLengthError, InvalidRequestError, SamplingParams,
                               StructuredOutputsParams)
from ..tokenizer import Tokenizer
from .errors import APIError

logger = logging.getLogger("deepseek_v2")

CheckChars = Callable[[int, str], None]  # (number of characters, param): raises ContextLengthError

def tokenize(param: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) (an encode or a chat-template call), with text the tokenizer cannot take
    (a lone UTF-16 surrogate, a template that raises) reported as a 400."""
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError, UnicodeError, TemplateError) as e:
        raise APIError(400, f"{param} cannot be tokenized: {e}", param=param, code="invalid_value") from None


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[int], Field(min_length=1)]


# ---- requests --------------------------------------------------------------------------------------
class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far on every chunk too


class JsonSchemaFormat(OpenAIModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# vLLM request fields not implemented here, refused when set (with why)
_REFUSED_EXTRAS = {"logits_processors": "no custom logits processors are loaded",
                   "prompt_logprobs": "on /v1/completions, echo with logprobs returns the prompt's",
                   "priority": "requests are served in arrival order, with fair turns between them"}
# fields clients send that need nothing here (OpenAI's metadata, vLLM's ids and options with no effect)
_KNOWN_EXTRAS = {"guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
                 "guided_whitespace_pattern", "request_id", "metadata", "store", "service_tier",
                 "spaces_between_special_tokens", "documents", "mm_processor_kwargs"}
_IGNORED_LOGGED: set[str] = set()


class SamplingFields(OpenAIModel):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None  # None: the served model
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = None  # None: 1.0
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON's keys are) -> bias, cut to [-100, 100]
    # vLLM extras
    top_k: int | None = Field(None, le=2**31 - 1)  # larger values would overflow the sampler's tensor
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: as many as fit)
    truncation_side: Literal["left"] | None = None  # the prompt's start is what is cut
    return_token_ids: bool = False  # the prompt's and the output's token ids in the response
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:<id>", not by their text
    cache_salt: str | None = None  # the prefix cache shares blocks only between requests with the same salt
    use_beam_search: bool = False  # the n most likely continuations (beam_search.py), the body at the end
    length_penalty: float = 1.0  # beam search's: a sequence's score is its log-probability / length ** this
    # structured outputs: OpenAI's response_format, or vLLM's structured_outputs (json, regex, choice, grammar)
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None

    def param_name(self, engine_param: str) -> str:
        """The request field that carries an engine parameter (SamplingParams' field, or "prompt")."""
        if engine_param == "structured_outputs":
            return self.structured_field
        return engine_param

    @property
    def structured_field(self) -> str:
        """The request field the output's grammar came from."""
        if self.structured_outputs is None and self.guided() is not None:
            return f"guided_{next(iter(self.guided()))}"
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def beam_search_params(self, max_tokens: int | None, prompts: list[tuple[str | None, list[int]]],
                           max_model_len: int) -> BeamSearchParams:
        """use_beam_search's search (n beams, as vLLM takes them), after refusing what it cannot give."""
        for name, given in (("stream", self.stream), ("logprobs", getattr(self, "logprobs", None) not in (None, False)),
                            ("echo", getattr(self, "echo", False)), (self.structured_field, self.structured() is not None),
                            ("tools", bool(getattr(self, "tools", None)))):
            if given:
                raise APIError(400, f"{name} cannot be used with use_beam_search", param=name)
        if max_tokens is None:  # up to the context
            max_tokens = max_model_len - max(len(ids) for _, ids in prompts)
        try:
            return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                                    temperature=self.temperature or 0.0, length_penalty=self.length_penalty)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param="n" if e.param == "beam_width" else self.param_name(e.param)) from None

    def check_extras(self) -> None:
        """Refuse the vLLM fields this server does not implement, where they are set (ignoring one would
        answer something else than asked), and log the names of other unknown fields once each."""
        extras = {k: v for k, v in (self.model_extra or {}).items() if v not in (None, False, 0, [], {})}
        for name, why in _REFUSED_EXTRAS.items():
            if name in extras:
                raise APIError(400, f"{name} is not supported: {why}", param=name, code="unsupported")
        for name in sorted(set(extras) - _KNOWN_EXTRAS - _IGNORED_LOGGED):
            _IGNORED_LOGGED.add(name)
            logger.warning("request field %r is not one this server knows; it is ignored", name[:100])

    def guided(self) -> dict | None:
        """vLLM's older guided_json / guided_regex / guided_choice / guided_grammar as structured_outputs."""
        extra = self.model_extra or {}
        given = {kind: extra[f"guided_{kind}"] for kind in ("json", "regex", "choice", "grammar")
                 if extra.get(f"guided_{kind}") is not None}
        return given or None

    def structured(self) -> StructuredOutputsParams | None:
        """The grammar the request asks for, from response_format or structured_outputs (or vLLM's
        older guided_* fields)."""
        given = self.structured_outputs if self.structured_outputs is not None else self.guided()
        if given is not None and self.response_format is not None and self.response_format.type != "text":
            raise APIError(400, f"give response_format or {self.structured_field}, not both",
                           param=self.structured_field)
        if given is not None:
            known = {"json", "regex", "choice", "grammar", "json_object"}
            unknown = sorted(set(given) - known)
            if unknown:
                raise APIError(400, f"structured_outputs.{unknown[0]} is not supported (known: {', '.join(sorted(known))})",
                               param="structured_outputs", code="unsupported")
            return StructuredOutputsParams(**given)
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        return StructuredOutputsParams(json=fmt.json_schema.schema_)

    def invalid(self, error: InvalidRequestError) -> APIError:
        """An engine rule the request broke, as a 400 naming the request's field."""
        code = "context_length_exceeded" if isinstance(error, ContextLengthError) else "invalid_value"
        return APIError(400, str(error), param=self.param_name(error.param), code=code)

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                         structured: StructuredOutputsParams | None = None,
                         skip_special_tokens: bool | None = None) -> SamplingParams:
        self.check_extras()
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        try:
            return SamplingParams(
                n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                min_p=self.min_p or 0.0, repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                structured_outputs=structured or self.structured(), logit_bias=self.token_biases(),
                allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
                truncate_prompt_tokens=self.truncate_prompt_tokens, cache_salt=self.cache_salt)
        except InvalidRequestError as e:
            raise self.invalid(e) from None

    def token_biases(self) -> dict[int, float] | None:
        """logit_bias with token ids for keys and each bias cut to OpenAI's [-100, 100], as vLLM does."""
        if not self.logit_bias:
            return None
        biases = {}
        for key, bias in self.logit_bias.items():
            if not re.fullmatch(r"\s*\d+\s*", key):
                raise APIError(400, f"logit_bias keys must be token ids, got {key[:50]!r}", param="logit_bias",
                               code="invalid_value")
            biases[int(key)] = min(100.0, max(-100.0, bias))
        return biases

    def truncated(self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams,
                  max_model_len: int) -> list[tuple[str | None, list[int]]]:
        """The prompts cut to truncate_prompt_tokens; a cut text prompt is echoed from its kept ids."""
        if params.truncate_prompt_tokens is None:
            return prompts
        cut = [(text, params.truncated(ids, max_model_len)) for text, ids in prompts]
        return [(text if len(kept) == len(ids) else None, kept) for (text, kept), (_, ids) in zip(cut, prompts)]

    def check_length(self, prompt_ids: list[int], max_model_len: int, max_tokens: int | None, param: str) -> None:
        if max_tokens is not None and len(prompt_ids) + max_tokens > max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                                f"requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the "
                                f"{param}, {max_tokens} for the completion). Please reduce the length of the "
                                f"{param} or max_tokens.", param=param, code="context_length_exceeded")


class CompletionRequest(SamplingFields):
    prompt: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None  # fill-in-the-middle: the prompt is the text before the hole, this after it
    best_of: int | None = None  # only best_of == n is accepted
    add_special_tokens: bool = True  # BOS for string prompts, as the tokenizer config asks

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens=0: score the prompt, generate nothing (one token is run and dropped)."""
        return self.echo and self.max_tokens == 0

    @property
    def batch(self) -> list[str] | list[list[int]]:
        """The prompts (the schema has refused empty ones, vllm #7283)."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else p

    def check_chars(self, check: CheckChars) -> None:
        """Refuse a text prompt too long for the context before anything is tokenized."""
        for x in self.batch:
            if isinstance(x, str):
                check(len(x) + len(self.suffix or ""), "prompt")

    def prompts(self, tokenizer: Tokenizer, check: CheckChars) -> list[tuple[str | None, list[int]]]:
        """(text or None, token ids) per prompt (with a suffix, the fill-in-the-middle prompt). The
        tokenizing: call it off the event loop."""
        self.check_chars(check)
        texts = [tokenizer.fill_in_middle(x, self.suffix) if self.suffix is not None else x for x in self.batch]
        return [(x, tokenize("prompt", tokenizer.encode, x, add_special_tokens=self.add_special_tokens))
                if isinstance(x, str) else (None, list(x)) for x in texts]

    def param_name(self, engine_param: str) -> str:
        # echo's prompt logprobs
        return "logprobs" if engine_param == "prompt_logprobs" else super().param_name(engine_param)

    def to_sampling_params(self, tokenizer: Tokenizer | None = None) -> SamplingParams:
        if self.suffix is not None:
            if tokenizer is not None and not tokenizer.has_fill_in_middle:
                raise APIError(400, "suffix needs fill-in-the-middle tokens, which this model's tokenizer does not have",
                               param="suffix", code="unsupported")
            if any(not isinstance(x, str) for x in self.batch):
                raise APIError(400, "suffix needs text prompts (the fill-in-the-middle prompt is made of text)",
                               param="suffix")
            if self.echo:
                raise APIError(400, "echo cannot be used with suffix", param="echo")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of", code="unsupported")
        max_tokens = 1 if self.echo_only else self.max_tokens  # one token is run and dropped
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)

    def check_lengths(self, prompts: list[tuple[str | None, list[int]]], max_model_len: int) -> None:
        for _, ids in prompts:
            self.check_length(ids, max_model_len, 1 if self.echo_only else self.max_tokens, "prompt")


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]
