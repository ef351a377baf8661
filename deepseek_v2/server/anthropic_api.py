"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) over the chat
machinery, for clients written against Anthropic's SDK: a request becomes the chat completion it means
(`system` as the system message, text blocks as content, `tool_use` / `tool_result` blocks as tool calls
and tool messages, tools with their `input_schema` as function tools), and its reply is a Message, or
the Message stream's events (`message_start`, `content_block_start` / `_delta` / `_stop` per block,
`message_delta` with the stop reason, `message_stop`). Errors on these routes use Anthropic's envelope,
`{"type": "error", "error": {"type", "message"}}`; the key may come as `x-api-key` (middleware.py).
Images, documents and extended thinking are refused: the model reads text and does not reason.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field

from ..outputs import RequestOutput
from . import protocol as P
from .chat_protocol import TranslatedChatRequest
from .errors import APIError, anthropic_error
from .replies import Block, BlockReply, event_line

# a chat request's fields as Anthropic's API names them (errors name what the client sent)
MESSAGES_PARAMS = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences", "user": "metadata",
                   "response_format": "output_config"}
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


# ---- the request ---------------------------------------------------------------------------------------
class TextBlock(P.OpenAIModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(P.OpenAIModel):
    """A call the model made earlier in the conversation (assistant messages)."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(P.OpenAIModel):
    """The caller's result of a call (user messages)."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


class Message(P.OpenAIModel):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock | ToolUseBlock | ToolResultBlock]


class Tool(P.OpenAIModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")]
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None


class ToolChoice(P.OpenAIModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class OutputFormat(P.OpenAIModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(P.OpenAIModel):
    format: OutputFormat | None = None
    effort: str | None = None  # no effect: the model does not reason


class Metadata(P.OpenAIModel):
    user_id: str | None = None


class MessagesRequest(P.OpenAIModel):
    model: str | None = None
    max_tokens: int
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None  # format: the output follows a JSON schema
    thinking: dict[str, Any] | None = None  # refused when enabled: the model does not reason

    def to_chat(self) -> MessagesChatRequest:
        """The chat completion this request means (vLLM's sampling extras pass through to it)."""
        if self.thinking is not None and self.thinking.get("type") != "disabled":
            raise APIError(400, "thinking is not supported: this model does not reason", param="thinking",
                             code="unsupported")
        extras = MessagesChatRequest.passed_through(self.model_extra, "the Messages API")
        chat: dict[str, Any] = {**extras, "messages": self.chat_messages(), "stream": self.stream,
                                "max_completion_tokens": self.max_tokens, "temperature": self.temperature,
                                "top_p": self.top_p, "top_k": self.top_k, "stop": self.stop_sequences,
                                "user": self.metadata.user_id if self.metadata else None}
        if self.output_config is not None and self.output_config.format is not None:
            chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output",
                                                                              "schema": self.output_config.format.schema_}}
        if self.tools:
            chat["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                               "parameters": t.input_schema}} for t in self.tools]
        choice = self.tool_choice
        if choice is not None:
            if choice.type == "tool" and not choice.name:
                raise APIError(400, "tool_choice of type 'tool' needs a name", param="tool_choice")
            chat["tool_choice"] = ({"type": "function", "function": {"name": choice.name}} if choice.type == "tool"
                                   else {"any": "required"}.get(choice.type, choice.type))
            chat["parallel_tool_calls"] = not choice.disable_parallel_tool_use
        return MessagesChatRequest.made_from({k: v for k, v in chat.items() if v is not None})

    def chat_messages(self) -> list[dict]:
        """system and the messages as chat messages: a user message's tool results become tool
        messages before its text, an assistant's tool_use blocks its tool_calls."""
        system = self.system if isinstance(self.system, str) or self.system is None else \
            "".join(b.text for b in self.system)
        out = [{"role": "system", "content": system}] if system else []
        for m in self.messages:
            blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
            if m.role == "user":
                out += [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
                        for b in blocks if isinstance(b, ToolResultBlock)]
                if text or not any(isinstance(b, ToolResultBlock) for b in blocks):
                    out.append({"role": "user", "content": text})
                continue
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                     for b in blocks if isinstance(b, ToolUseBlock)]
            out.append({"role": "assistant", "content": text or None, "tool_calls": calls} if calls
                       else {"role": "assistant", "content": text})
        return out


class MessagesChatRequest(TranslatedChatRequest):
    PARAMS = MESSAGES_PARAMS


class CountTokensRequest(MessagesRequest):
    max_tokens: int | None = None  # not needed to count


# ---- the reply ---------------------------------------------------------------------------------------
class MessagesReply(BlockReply):
    """A Message (`body_of`), or its stream of events: the model's text as a text block, and with
    tools a tool_use block for each call it makes (its arguments streamed as input_json_delta)."""

    prefix = "msg"

    def __init__(self, *args, request: MessagesRequest):
        super().__init__(*args)
        self.request = request
        self.id = self.id.replace("msg-", "msg_")

    @staticmethod
    def content_block(block: Block, done: bool = True) -> dict:
        if block.kind == "text":
            return {"type": "text", "text": block.text if done else ""}
        return {"type": "tool_use", "id": block.call_id, "name": block.name,
                "input": json.loads(block.arguments or "{}") if done else {}}

    def stop(self, finals: list[RequestOutput | None], blocks: list[Block]) -> tuple[str | None, str | None]:
        """stop_reason and stop_sequence."""
        o = finals[0].outputs[0] if finals[0] is not None else None
        if o is None:
            return None, None
        if o.finish_reason == "stop" and any(b.kind == "call" for b in blocks):
            return "tool_use", None
        if o.finish_reason == "stop" and isinstance(o.stop_reason, str):
            return "stop_sequence", o.stop_reason
        return STOP_REASONS.get(o.finish_reason, "end_turn"), None

    @staticmethod
    def checked(blocks: list[Block], text: str) -> list[Block]:
        """The blocks, or the whole output text as one text block where a call's arguments are not a JSON
        object (a tool_use block's input must be one; the chat reply too gives malformed calls as text)."""
        def is_object(arguments: str) -> bool:
            try:
                return isinstance(json.loads(arguments or "{}"), dict)
            except ValueError:
                return False
        if all(b.kind == "text" or is_object(b.arguments) for b in blocks):
            return blocks
        return [Block("text", "", text=text)]

    def usage_of(self, finals: list[RequestOutput | None]) -> dict:
        u = self.usage(finals)
        return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                "cache_read_input_tokens": u.prompt_tokens_details.cached_tokens, "cache_creation_input_tokens": 0}

    def message_object(self, blocks: list[Block], finals: list[RequestOutput | None] | None = None) -> dict:
        reason, sequence = self.stop(finals, blocks) if finals is not None else (None, None)
        usage = self.usage_of(finals) if finals is not None else {  # at the stream's start
            "input_tokens": sum(len(ids) for _, ids in self.prompts), "output_tokens": 0,
            "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [self.content_block(b) for b in blocks], "stop_reason": reason,
                "stop_sequence": sequence, "usage": usage}

    def body_of(self, finals: list[RequestOutput]) -> dict:
        o = finals[0].outputs[0]
        return self.message_object(self.checked(self.blocks_of(o), o.text), finals)

    # ---- the stream's events ------------------------------------------------------------------------------
    @staticmethod
    def event(type_: str, **fields) -> str:
        return event_line({"type": type_, **fields})

    def events_start(self):
        return [self.event("message_start", message=self.message_object([]))]

    def events_opened(self, index, block):
        return [self.event("content_block_start", index=index, content_block=self.content_block(block, done=False))]

    def events_grown(self, index, block, piece):
        delta = ({"type": "text_delta", "text": piece} if block.kind == "text"
                 else {"type": "input_json_delta", "partial_json": piece})
        return [self.event("content_block_delta", index=index, delta=delta)]

    def events_closed(self, index, block):
        return [self.event("content_block_stop", index=index)]

    def events_end(self, blocks, finals):
        reason, sequence = self.stop(finals, blocks)
        return [self.event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                           usage={"output_tokens": self.usage(finals).completion_tokens}),
                self.event("message_stop")]

    def events_error(self, error):
        return [self.event("error", error=anthropic_error(error.status, error.body())["error"])]
