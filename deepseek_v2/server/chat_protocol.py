"""The chat requests as pydantic models: messages (text, tool calls, tool results), tools, how the messages
are rendered (ChatTemplateFields), `ChatCompletionRequest`, `TranslatedChatRequest` (the chat request another
API's request becomes: the Responses API's, Anthropic's) and `/tokenize`'s request; `encode_chat` renders and
tokenizes a conversation. The fields shared with completions are protocol.SamplingFields'.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError

from .. import tool_calls as tc
from ..sampling_params import SamplingParams, StructuredOutputsParams
from ..tokenizer import Tokenizer
from .errors import APIError
from .protocol import CheckChars, OpenAIModel, SamplingFields, tokenize


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionCallIn(OpenAIModel):
    name: str
    arguments: str  # JSON text


class ToolCallIn(OpenAIModel):
    """A tool call of an earlier assistant message."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(OpenAIModel):
    role: str = Field(json_schema_extra={"enum": ["system", "developer", "user", "assistant", "tool"]})
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(OpenAIModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class ToolDef(OpenAIModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: FunctionName


class ChatTemplateFields(OpenAIModel):
    """How the messages are rendered (vLLM's fields): chat completions and /tokenize."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the prompt ends inside the last message, which the output continues
    chat_template_kwargs: dict[str, Any] | None = None  # more variables for the template

    def render_options(self) -> dict:
        """apply_chat_template's arguments besides the messages; a request's own template is refused."""
        if (self.model_extra or {}).get("chat_template") is not None:
            raise APIError(400, "chat_template is not taken from requests: the server renders with the model's own "
                                "template", param="chat_template", code="unsupported")
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt=false (one continues the last "
                                "message, the other starts a new one)", param="continue_final_message")
        extra = self.chat_template_kwargs or {}
        taken = sorted(set(extra) & _TEMPLATE_NAMES)
        if taken:
            raise APIError(400, f"chat_template_kwargs cannot set {taken[0]!r}", param="chat_template_kwargs")
        return {**extra, "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message}


_TEMPLATE_NAMES = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
                   "bos_token", "eos_token", "pad_token", "unk_token"}


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    max_tokens: int | None = None  # None: up to the context length
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    echo: bool = False  # vLLM's: a last assistant message is repeated at the reply's start
    add_special_tokens: bool = False  # the chat template writes the BOS itself
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def batch(self) -> list[list[ChatMessage]]:
        return [self.messages]

    def check_chars(self, check: CheckChars) -> None:
        """Refuse messages too long for the context before the template runs (it only adds text)."""
        check(sum(len(m.text()) for m in self.messages), "messages")

    @property
    def uses_tools(self) -> bool:
        """Whether the model is offered tools (and its output is parsed for calls)."""
        return bool(self.tools) and self.tool_choice != "none"

    def tool_dicts(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.uses_tools else None

    def check_tools(self, tokenizer: Tokenizer) -> None:
        """Tools, and tool calls or results in the conversation, need a checkpoint that can call tools."""
        history = any(m.tool_calls or m.role == "tool" for m in self.messages)
        if (self.uses_tools or history) and not tc.supports_tools(tokenizer):
            raise APIError(400, "this model's chat template has no tool calling (it needs a checkpoint whose "
                                "template and tokens carry tool calls, as DeepSeek-V2.5 and DeepSeek-Coder-V2-0724 "
                                "do); send the request without tools", param="tools" if self.tools else "messages",
                           code="unsupported")

    def prompts(self, tokenizer: Tokenizer, check: CheckChars) -> list[tuple[str | None, list[int]]]:
        """The conversation's token ids. The template and the tokenizing: call it off the event loop."""
        ids = encode_chat(tokenizer, check, self, self.tool_dicts())
        if self.add_special_tokens and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        return [(None, ids)]

    def param_name(self, engine_param: str) -> str:
        if engine_param == "structured_outputs" and self.tool_grammar_wanted:
            return "tools"  # the grammar is made of their parameters' schemas
        renamed = {"prompt": "messages", "logprobs": "top_logprobs",
                   "max_tokens": "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"}
        return renamed.get(engine_param, super().param_name(engine_param))

    @property
    def tool_grammar_wanted(self) -> bool:
        """tool_choice "required" or a named function: the output is forced into a call."""
        return self.uses_tools and self.tool_choice not in (None, "auto")

    def to_sampling_params(self, tokenizer: Tokenizer | None = None) -> SamplingParams:
        self.render_options()  # its refusals before anything is rendered
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        structured, skip_special = None, None
        if tokenizer is not None:
            self.check_tools(tokenizer)
        if self.uses_tools:
            skip_special = False  # the parser reads the tool-call tokens in the text
            names = [t.function.name for t in self.tools]
            if len(set(names)) < len(names):
                raise APIError(400, "tools must have different names", param="tools")
            if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
                raise APIError(400, f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools",
                               param="tool_choice")
            if self.tool_grammar_wanted:
                if self.structured() is not None:
                    raise APIError(400, "tool_choice 'required' or a named function cannot be combined with "
                                        "response_format", param="tool_choice")
                if tokenizer is not None:
                    name = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
                    structured = StructuredOutputsParams(grammar=tc.tool_grammar(
                        tokenizer, self.tool_dicts(), name, parallel=self.parallel_tool_calls))
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(self.max_new_tokens, logprobs, None, structured, skip_special)

    def check_lengths(self, prompts: list[tuple[str | None, list[int]]], max_model_len: int) -> None:
        self.check_length(prompts[0][1], max_model_len, self.max_new_tokens, "messages")


class TranslatedChatRequest(ChatCompletionRequest):
    """The chat request another API's request becomes (the Responses API's, Anthropic's): refusals name
    that API's fields (PARAMS renames chat fields; any message's field is MESSAGES)."""

    PARAMS: ClassVar[dict[str, str]] = {}
    MESSAGES: ClassVar[str] = "messages"

    def param_name(self, engine_param: str) -> str:
        return self.renamed_param(super().param_name(engine_param))

    @classmethod
    def renamed_param(cls, param: str) -> str:
        return cls.MESSAGES if param.startswith("messages") else cls.PARAMS.get(param, param)

    @classmethod
    def renamed(cls, error: APIError) -> APIError:
        """A refusal of the chat request, naming the other API's field."""
        if error.param is not None:
            error.param = cls.renamed_param(error.param)
        return error

    @classmethod
    def passed_through(cls, extras: dict | None, api: str) -> dict:
        """The other API's request fields it does not know, for the chat request: vLLM's sampling fields
        (top_k, seed, logit_bias, ...); chat completions' own fields, and those whose answer only a chat
        body carries, are refused."""
        extras = extras or {}
        foreign = sorted(set(extras) & _NOT_PASSED_THROUGH)
        if foreign:
            raise APIError(400, f"{foreign[0]} is not a field of {api}", param=foreign[0], code="unsupported")
        return extras

    @classmethod
    def made_from(cls, fields: dict) -> TranslatedChatRequest:
        try:
            return cls.model_validate(fields)
        except ValidationError as e:
            raise cls.renamed(APIError.from_validation(e.errors())) from None


# chat completion fields another API's request may not pass through to the chat request it becomes
_NOT_PASSED_THROUGH = (set(ChatCompletionRequest.model_fields) - set(SamplingFields.model_fields)
                       | {"n", "stream_options", "response_format", "structured_outputs", "return_token_ids"})


def encode_chat(tokenizer: Tokenizer, check: CheckChars, body: ChatTemplateFields,
                tools: list[dict] | None = None) -> list[int]:
    """The token ids of the rendered chat template; a rendering too long for the context is refused
    before it is tokenized."""
    text = tokenize("messages", tokenizer.apply_chat_template, conversation(body.messages), tokenize=False,
                    tools=tools, **body.render_options())
    check(len(text), "messages")
    return tokenize("messages", tokenizer.encode, text, add_special_tokens=False)  # the template wrote the BOS


def conversation(messages: list[ChatMessage]) -> list[dict]:
    """Messages as {"role", "content"} dicts for the chat template ("developer" is OpenAI's new
    name for "system"), with an assistant's tool_calls (its content None when empty, which is how
    DeepSeek's templates tell a call from a reply) and a tool's tool_call_id; an unknown role is a 400."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}].role must be 'system', 'user', 'assistant' or 'tool', got {m.role!r}",
                           param=f"messages.{i}.role", code="invalid_value")
        if m.tool_calls and role != "assistant":
            raise APIError(400, f"messages[{i}]: only assistant messages have tool_calls",
                           param=f"messages.{i}.tool_calls")
        d = {"role": role, "content": m.text()}
        if m.tool_calls:
            d["content"] = m.text() or None
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": c.function.arguments}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


class TokenizeRequest(ChatTemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: list[ToolDef] | None = None  # with messages: as a chat request with these tools renders them
    add_special_tokens: bool = True
    return_token_strs: bool = False

    def tool_dicts(self, tokenizer: Tokenizer) -> list[dict] | None:
        if not self.tools:
            return None
        if not tc.supports_tools(tokenizer):
            raise APIError(400, "this model's chat template has no tool calling", param="tools", code="unsupported")
        return [t.model_dump(exclude_none=True) for t in self.tools]
