"""OpenAI's Responses API (`POST /v1/responses`) over the chat machinery: a request becomes the chat
completion it means (instructions as the system message, input items as messages, function tools as
chat tools, `text.format` as `response_format`), and its reply is a Response object, or the Response
stream's typed events (`event: <type>` then `data: <json>`, each with its sequence_number, no `[DONE]`).

This server keeps no responses: `store` is accepted and nothing is stored, so `previous_response_id` and
`GET /v1/responses/{id}` are refused; a conversation is sent whole, as with chat completions. DeepSeek-V2
does not reason: `reasoning` is accepted and has no effect, and no reasoning items are output.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import Field

from ..outputs import RequestOutput
from . import protocol as P
from .chat_protocol import TranslatedChatRequest
from .errors import APIError
from .replies import Block, BlockReply, event_line

# a chat request's fields as the Responses API names them (errors name what the client sent)
RESPONSES_PARAMS = {"max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
                    "response_format": "text.format"}  # (any message's field is "input": MESSAGES below)


# ---- the request ---------------------------------------------------------------------------------------
class InputText(P.OpenAIModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputItem(P.OpenAIModel):
    id: str | None = None  # as a Response listed it: accepted, not needed
    status: str | None = None


class InputMessage(InputItem):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(InputItem):
    """A call the model made earlier in the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(InputItem):
    """The caller's result of a function call."""

    type: Literal["function_call_output"]
    call_id: str
    output: str


class FunctionTool(P.OpenAIModel):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(P.OpenAIModel):
    type: Literal["function"]
    name: str


class TextFormat(P.OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(P.OpenAIModel):
    format: TextFormat | None = None


class ResponsesRequest(P.OpenAIModel):
    model: str | None = None
    input: Annotated[str, Field(min_length=1)] | \
        Annotated[list[InputMessage | FunctionCallItem | FunctionCallOutputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = None  # None: up to the context
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    stream: bool = False
    store: bool = True  # accepted; nothing is stored
    previous_response_id: str | None = None  # refused: no response is stored
    background: bool = False  # refused
    truncation: Literal["disabled", "auto"] | None = None  # "auto" refused
    metadata: dict[str, str] | None = None  # returned as given
    user: str | None = None
    reasoning: dict[str, Any] | None = None  # no effect: the model does not reason

    def to_chat(self) -> ResponsesChatRequest:
        """The chat completion this request means (vLLM's sampling extras pass through to it)."""
        refused = {"previous_response_id": (self.previous_response_id is not None, "this server stores no responses; "
                                            "send the whole conversation as input"),
                   "background": (self.background, "responses are served while the client waits"),
                   "truncation": (self.truncation == "auto", "a conversation too long for the context is refused, "
                                  "not cut")}
        for name, (given, why) in refused.items():
            if given:
                raise APIError(400, f"{name} is not supported: {why}", param=name, code="unsupported")
        extras = ResponsesChatRequest.passed_through(self.model_extra, "the Responses API")
        chat: dict[str, Any] = {**extras, "messages": self.messages(), "stream": self.stream,
                                "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature,
                                "top_p": self.top_p, "parallel_tool_calls": self.parallel_tool_calls, "user": self.user}
        if self.tools:
            chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if isinstance(self.tool_choice, FunctionChoice):
            chat["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            chat["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_}}
        elif fmt is not None:
            chat["response_format"] = {"type": fmt.type}
        return ResponsesChatRequest.made_from(chat)

    def messages(self) -> list[dict]:
        """instructions and input as chat messages: function calls join the assistant message before them
        (or make one) as its tool_calls, a call's output is a tool message."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, InputMessage):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                    last["content"] = last["content"] or None  # (how DeepSeek's templates tell a call from a reply)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return messages

    def echoed(self) -> dict:
        """The request's settings as a Response object repeats them."""
        fmt = self.text.format if self.text is not None and self.text.format is not None else TextFormat(type="text")
        choice = self.tool_choice or "auto"
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "metadata": self.metadata or {}, "parallel_tool_calls": self.parallel_tool_calls,
                "temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p,
                "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
                "tools": [t.model_dump(exclude_none=True) for t in self.tools or []],
                "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)}, "truncation": "disabled",
                "user": self.user, "previous_response_id": None, "background": False, "reasoning": None,
                "store": False}


class ResponsesChatRequest(TranslatedChatRequest):
    PARAMS = RESPONSES_PARAMS
    MESSAGES = "input"


# ---- the reply ---------------------------------------------------------------------------------------
class ResponsesReply(BlockReply):
    """A Response object (`body_of`), or its stream of events: the model's text as a message item with
    one output_text part, and with tools a function_call item for each call it makes."""

    prefix = "resp"

    def __init__(self, *args, request: ResponsesRequest):
        super().__init__(*args)
        self.request = request
        self.id = self.id.replace("resp-", "resp_")
        self.seq = 0

    def response(self, output: list[dict], finals: list[RequestOutput | None] | None = None) -> dict:
        """The Response object: in progress (no finals yet), else completed or incomplete."""
        o = finals[0].outputs[0] if finals and finals[0] is not None else None
        incomplete = {"reason": "max_output_tokens"} if o is not None and o.finish_reason == "length" else None
        status = "in_progress" if finals is None else "incomplete" if incomplete else "completed"
        return {"id": self.id, "object": "response", "created_at": self.created, "model": self.model,
                "status": status, "output": output, "error": None, "incomplete_details": incomplete,
                "usage": None if finals is None else self.response_usage(finals), **self.request.echoed()}

    def response_usage(self, finals: list[RequestOutput | None]) -> dict:
        u = self.usage(finals)
        return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
                "input_tokens_details": {"cached_tokens": u.prompt_tokens_details.cached_tokens},
                "output_tokens_details": {"reasoning_tokens": 0}}

    def block_id(self, kind: str) -> str:
        return f"{'msg' if kind == 'text' else 'fc'}_{uuid.uuid4().hex}"

    @staticmethod
    def item(block: Block, status: str = "completed") -> dict:
        if block.kind == "text":
            content = [{"type": "output_text", "text": block.text, "annotations": []}] if status == "completed" else []
            return {"type": "message", "id": block.id, "status": status, "role": "assistant", "content": content}
        return {"type": "function_call", "id": block.id, "call_id": block.call_id, "name": block.name,
                "arguments": block.arguments if status == "completed" else "", "status": status}

    def body_of(self, finals: list[RequestOutput]) -> dict:
        return self.response([self.item(b) for b in self.blocks_of(finals[0].outputs[0])], finals)

    # ---- the stream's events ------------------------------------------------------------------------------
    def event(self, type_: str, **fields) -> str:
        line = event_line({"type": type_, "sequence_number": self.seq, **fields})
        self.seq += 1
        return line

    def events_start(self):
        return [self.event("response.created", response=self.response([])),
                self.event("response.in_progress", response=self.response([]))]

    def events_opened(self, index, block):
        lines = [self.event("response.output_item.added", output_index=index, item=self.item(block, "in_progress"))]
        if block.kind == "text":
            lines.append(self.event("response.content_part.added", item_id=block.id, output_index=index,
                                    content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return lines

    def events_grown(self, index, block, piece):
        if block.kind == "text":
            return [self.event("response.output_text.delta", item_id=block.id, output_index=index, content_index=0,
                               delta=piece, logprobs=[])]
        return [self.event("response.function_call_arguments.delta", item_id=block.id, output_index=index,
                           delta=piece)]

    def events_closed(self, index, block):
        done = self.item(block)
        if block.kind == "text":
            return [self.event("response.output_text.done", item_id=block.id, output_index=index, content_index=0,
                               text=block.text, logprobs=[]),
                    self.event("response.content_part.done", item_id=block.id, output_index=index, content_index=0,
                               part=done["content"][0]),
                    self.event("response.output_item.done", output_index=index, item=done)]
        return [self.event("response.function_call_arguments.done", item_id=block.id, output_index=index,
                           arguments=block.arguments),
                self.event("response.output_item.done", output_index=index, item=done)]

    def events_end(self, blocks, finals):
        final = self.response([self.item(b) for b in blocks], finals)
        return [self.event(f"response.{final['status']}", response=final)]

    def events_error(self, error):
        return [self.event("error", code=error.code, message=error.message, param=error.param)]
