"""The OpenAI response bodies and stream chunks as pydantic models, field for field (replies.py fills
them from engine outputs; protocol.py holds the requests and the error body)."""

from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_serializer


class OmitsNulls(BaseModel):
    """A body whose fields named in OMITTED are left out, not null, when unset: usage on stream chunks but
    the last, the token ids that only return_token_ids asks for."""

    OMITTED: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler):
        d = handler(self)
        for name in self.OMITTED:
            if d.get(name) is None:
                d.pop(name, None)
        return d


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "deepseek_v2"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    """The legacy completions shape; entries of the first prompt token are null (no context)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OmitsNulls):
    OMITTED = ("prompt_token_ids", "token_ids")

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids (streamed: on the first chunk)
    token_ids: list[int] | None = None  # the generated ids (streamed: this chunk's)


class WithOptionalUsage(OmitsNulls):
    OMITTED = ("usage",)

    usage: UsageInfo | None = None


class CompletionResponse(WithOptionalUsage):
    """Also the shape of each streamed chunk (without usage unless it is the usage chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class ChatChoice(OmitsNulls):
    OMITTED = ("token_ids",)

    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's return_token_ids


class ChatCompletionResponse(OmitsNulls):
    OMITTED = ("prompt_token_ids",)

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids


class WithoutNulls(BaseModel):
    """Serialized without its unset (None) fields, as OpenAI streams deltas: the final delta is {}, a
    tool call's later pieces carry only their index and arguments."""

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(WithoutNulls):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(WithoutNulls):
    """A piece of a streamed tool call: the first carries id, type and name, the rest argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(WithoutNulls):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(OmitsNulls):
    OMITTED = ("token_ids",)

    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # vLLM's return_token_ids: this chunk's


class ChatCompletionChunk(WithOptionalUsage):
    OMITTED = ("usage", "prompt_token_ids")

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids: on each choice's first chunk


# ---- errors and service routes (for /openapi.json) --------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, the body of every 4xx and 5xx answer."""

    error: ErrorInfo


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # only with return_token_strs


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    model_max_length: int
    tokenizer_class: str = "PreTrainedTokenizerFast"


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class VersionResponse(BaseModel):
    version: str
