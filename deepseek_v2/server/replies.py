"""Engine outputs into OpenAI bodies: one `Reply` per API request turns the `RequestOutput`s of its
prompts into the JSON response, or into Server-Sent Events exactly as OpenAI streams them (chat: a
role chunk per choice, content deltas, the finish reason on the last delta, an optional usage-only
chunk, then `data: [DONE]`; an error after the 200 goes out as a `data: {"error": ...}` event, and
the stream still ends with `data: [DONE]`).

Choice `index` is prompt_index * n + sample_index, as vLLM numbers them. A Reply is built, and a
non-streaming body assembled, in a worker thread: echoing a long prompt with its logprobs is work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .. import tool_calls as tc
from ..engine.async_engine import EngineDeadError, EngineNotReadyError, RequestAbortedError
from ..engine.llm_engine import StepError
from ..outputs import CompletionOutput, RequestOutput
from ..tokenizer import Tokenizer
from . import responses as R
from .errors import APIError, error_body, scrubbed
from .metrics import ServerMetrics

logger = logging.getLogger("deepseek_v2")
DONE = "data: [DONE]\n\n"


ENGINE_ERRORS = (StepError, RequestAbortedError, EngineDeadError, EngineNotReadyError)


def engine_error(e: Exception) -> APIError:
    """What the client of a request that the engine ended (one of ENGINE_ERRORS) is told."""
    if isinstance(e, StepError):  # a fault in this request's step: the others are served on
        return APIError(500, scrubbed(f"internal error: {e}"))
    if isinstance(e, RequestAbortedError):
        return APIError(503, str(e), code="aborted")
    return APIError(503, str(e), code="engine_dead" if isinstance(e, EngineDeadError) else "not_ready")


def sse(obj) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


class Reply:
    prefix = "cmpl"

    def __init__(self, body, model: str, tokenizer: Tokenizer, prompts: list[tuple[str | None, list[int]]]):
        self.body, self.model, self.tok, self.prompts = body, model, tokenizer, prompts
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n = body.n
        self._token_strs: dict[int, str] = {}
        self._offsets: dict[int, int] = {}  # choice -> text offset reached by streamed logprobs

    def token_str(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = self._token_strs[token_id] = self.tok.decode([token_id])
        return s

    def token_name(self, token_id: int) -> str:
        """How logprobs name a token: its text, or "token_id:<id>" (vLLM's return_tokens_as_token_ids:
        unambiguous where texts are not, e.g. a byte of a character split over tokens)."""
        if getattr(self.body, "return_tokens_as_token_ids", False):
            return f"token_id:{token_id}"
        return self.token_str(token_id)

    def index(self, i: int, o: CompletionOutput) -> int:
        return i * self.n + o.index

    def prompt_ids(self, i: int) -> list[int] | None:
        """Prompt i's token ids where the request asks for them (vLLM's return_token_ids)."""
        return list(self.prompts[i][1]) if getattr(self.body, "return_token_ids", False) else None

    def output_ids(self, o: CompletionOutput) -> list[int] | None:
        if not getattr(self.body, "return_token_ids", False):
            return None
        return [] if getattr(self.body, "echo_only", False) else list(o.token_ids)  # (echo_only's token is dropped)

    def usage(self, finals: list[RequestOutput | None]) -> R.UsageInfo:
        prompt = sum(len(ids) for _, ids in self.prompts)
        done = [f for f in finals if f is not None]
        completion = 0 if getattr(self.body, "echo_only", False) else sum(
            len(o.token_ids) for f in done for o in f.outputs)
        cached = sum(f.num_cached_tokens for f in done)
        return R.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                           prompt_tokens_details=R.PromptTokensDetails(cached_tokens=cached))

    # ---- to be filled in per endpoint -----------------------------------------------------------
    def opening(self) -> list[str]:
        return []

    def delta_choice(self, i: int, out: RequestOutput, o: CompletionOutput, first: bool):
        raise NotImplementedError

    def chunk(self, choices: list, usage: R.UsageInfo | None = None):
        raise NotImplementedError

    def body_of(self, finals: list[RequestOutput]) -> dict:
        raise NotImplementedError

    # ---- shared drivers -------------------------------------------------------------------------
    def count_unfinished(self, finals: list[RequestOutput | None], metrics: ServerMetrics) -> None:
        """Count the samples that end without finishing (client gone, shutdown, failed step)."""
        for f in finals:
            if f is None:
                metrics.observe_aborted(self.n)
            elif not f.finished:
                metrics.observe_aborted(sum(o.finish_reason is None for o in f.outputs))

    async def collect(self, outputs: AsyncIterator, metrics: ServerMetrics, key: str) -> dict:
        """The whole response of a non-streaming request."""
        finals: list[RequestOutput | None] = [None] * len(self.prompts)
        try:
            async for i, out in outputs:
                finals[i] = out
                if out.finished:
                    metrics.observe_request(out)
        except ENGINE_ERRORS as e:
            raise engine_error(e) from None
        finally:  # a client that went away cancels this
            self.count_unfinished(finals, metrics)
        if any(f is None or not f.finished for f in finals):
            raise APIError(503, "the request was aborted: the server is shutting down", code="aborted")
        body = await asyncio.to_thread(self.body_of, finals)
        usage = self.usage(finals)
        metrics.observe_usage(key, usage.prompt_tokens, usage.completion_tokens)
        return body

    async def stream(self, outputs: AsyncIterator, metrics: ServerMetrics, key: str) -> AsyncIterator[str]:
        finals: list[RequestOutput | None] = [None] * len(self.prompts)
        started, done = set(), set()
        continuous = self.body.stream_options is not None and self.body.stream_options.continuous_usage_stats
        try:
            for line in self.opening():
                yield line
            async for i, out in outputs:
                finals[i] = out
                if out.finished:
                    metrics.observe_request(out)
                for o in out.outputs:
                    idx = self.index(i, o)
                    if idx in done:
                        continue
                    first = idx not in started
                    if first and getattr(self.body, "echo", False):  # the whole prompt goes first
                        choice = await asyncio.to_thread(self.delta_choice, i, out, o, first)
                    else:
                        choice = self.delta_choice(i, out, o, first)
                    started.add(idx)
                    if o.finish_reason is not None:
                        done.add(idx)
                    if choice is not None:
                        yield sse(self.chunk([choice], self.usage(finals) if continuous else None))
            opts = self.body.stream_options
            if opts is not None and opts.include_usage:
                yield sse(self.chunk([], usage=self.usage(finals)))
        except ENGINE_ERRORS as e:  # after the 200 header an error can only travel in the stream
            yield sse(engine_error(e).body())
        except Exception as e:
            logger.exception("error while streaming %s", self.id)
            yield sse(error_body(500, scrubbed(f"internal error: {e!r}")))
        finally:
            self.count_unfinished(finals, metrics)
            usage = self.usage(finals)  # a client that went away still used what was generated
            metrics.observe_usage(key, usage.prompt_tokens, usage.completion_tokens)
        yield DONE


class CompletionReply(Reply):
    """`/v1/completions`: text choices, legacy logprobs, echo of the prompt with its logprobs."""

    def __init__(self, *args):
        super().__init__(*args)
        self.echoed = [self.echo_of(text, ids) for text, ids in self.prompts] if self.body.echo else []
        # generated special tokens (EOS with ignore_eos, ...) are left out of the text by default
        self.unseen = set(self.tok.all_special_ids) if self.body.skip_special_tokens else set()

    def echo_of(self, text: str | None, ids: list[int]) -> tuple[str, set[int]]:
        """The prompt as echoed, and the positions of its tokens that are not in that text: the
        special tokens the tokenizer put around a text prompt (its BOS). Such tokens take no room in
        text_offset."""
        if text is None:
            return self.tok.decode(ids), set()
        if not self.body.add_special_tokens:
            return text, set()
        added, plain = self.tok.encode("x"), self.tok.encode("x", add_special_tokens=False)
        lead = next(k for k in range(len(added)) if added[k:k + len(plain)] == plain)
        trail = len(added) - lead - len(plain)
        return text, {*range(lead), *range(len(ids) - trail, len(ids))}

    def legacy_logprobs(self, token_ids: list[int], entries: list, offset: int,
                        hidden: set[int] = frozenset()) -> tuple[R.CompletionLogprobs, int]:
        """The legacy logprobs of these tokens, their text starting at `offset` of the choice's text
        (the tokens at `hidden` take no room), and the offset after them."""
        lp = R.CompletionLogprobs()
        for k, (tid, entry) in enumerate(zip(token_ids, entries)):
            lp.tokens.append(self.token_name(tid))
            lp.text_offset.append(offset)
            if k not in hidden:
                offset += len(self.token_str(tid))
            lp.token_logprobs.append(None if entry is None else entry[tid])
            lp.top_logprobs.append(None if entry is None else {self.token_name(t): v for t, v in entry.items()})
        return lp, offset

    def piece(self, i: int, out: RequestOutput, o: CompletionOutput, first: bool, delta: bool, offset: int):
        """Text, logprobs and the text offset after them, of a choice: all of it (delta=False) or
        what is new; the first piece carries the echoed prompt."""
        body = self.body
        text, ids, entries, hidden = "", [], [], set()
        if first and body.echo:
            text, hidden = self.echoed[i]
            ids = list(self.prompts[i][1])
            entries = list(out.prompt_logprobs or [None] * len(ids))
        if not body.echo_only:
            new_ids = o.delta_token_ids if delta else o.token_ids
            hidden = hidden | {len(ids) + k for k, t in enumerate(new_ids) if t in self.unseen}
            text += o.delta_text if delta else o.text
            ids += new_ids
            entries += (o.delta_logprobs if delta else o.logprobs) or []
        if body.logprobs is None:
            return text, None, offset
        logprobs, end = self.legacy_logprobs(ids, entries, offset, hidden)
        return text, logprobs, end

    def delta_choice(self, i, out, o, first):
        idx = self.index(i, o)
        text, logprobs, self._offsets[idx] = self.piece(i, out, o, first, delta=True,
                                                        offset=self._offsets.get(idx, 0))
        ids = self.body.return_token_ids
        if not text and o.finish_reason is None and not (logprobs and logprobs.tokens) and not (ids and o.delta_token_ids):
            return None
        return R.CompletionChoice(index=idx, text=text, logprobs=logprobs, finish_reason=o.finish_reason,
                                  stop_reason=o.stop_reason, prompt_token_ids=self.prompt_ids(i) if first else None,
                                  token_ids=list(o.delta_token_ids) if ids else None)

    def chunk(self, choices, usage=None):
        return R.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def body_of(self, finals):
        choices = []
        for i, out in enumerate(finals):
            for o in out.outputs:
                text, logprobs, _ = self.piece(i, out, o, first=True, delta=False, offset=0)
                choices.append(R.CompletionChoice(index=self.index(i, o), text=text, logprobs=logprobs,
                                                  finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                                                  prompt_token_ids=self.prompt_ids(i), token_ids=self.output_ids(o)))
        choices.sort(key=lambda c: c.index)
        return self.chunk(choices, self.usage(finals)).model_dump(mode="json")


class ChatReply(Reply):
    """`/v1/chat/completions`: assistant messages, chat-style logprobs; with tools, the model's tool
    calls parsed out of its text (tool_calls.py) and streamed as OpenAI streams them, with
    finish_reason "tool_calls"."""

    prefix = "chatcmpl"

    def __init__(self, *args):
        super().__init__(*args)
        self.parsers: dict[int, tc.ToolCallParser] = {}  # choice -> its streaming parser, with tools

    @staticmethod
    def finish_reason(o: CompletionOutput, calls: list) -> str | None:
        return "tool_calls" if calls and o.finish_reason == "stop" else o.finish_reason

    def stream_tools(self, idx: int, o: CompletionOutput) -> tuple[str, list[R.DeltaToolCall], str | None]:
        """Content, tool-call deltas and finish reason of a streamed piece, with tools."""
        parser = self.parsers.setdefault(idx, tc.ToolCallParser())
        content, deltas = parser.feed(o.delta_text)
        if o.finish_reason is not None:
            content += parser.finish()
        calls = [R.DeltaToolCall(index=d.index, id=d.id, type="function" if d.id else None,
                                 function=R.DeltaFunctionCall(name=d.name, arguments=d.arguments if d.id is None
                                                              else "")) for d in deltas]
        return content, calls, self.finish_reason(o, parser.calls)

    def chat_logprobs(self, token_ids: list[int], entries: list | None) -> R.ChatLogprobs | None:
        if not self.body.logprobs:
            return None
        top_n = self.body.top_logprobs or 0
        content = []
        for tid, entry in zip(token_ids, entries or []):
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
            content.append(R.TokenLogprob(
                token=self.token_name(tid), logprob=entry[tid], bytes=list(self.token_str(tid).encode("utf-8", "replace")),
                top_logprobs=[R.TopLogprob(token=self.token_name(t), logprob=v,
                                           bytes=list(self.token_str(t).encode("utf-8", "replace")))
                              for t, v in top]))
        return R.ChatLogprobs(content=content)

    @property
    def echoed(self) -> str:
        """With echo (vLLM's), the last message's text when it is the assistant's: the reply starts with it
        (with continue_final_message, the whole of the continued message)."""
        last = self.body.messages[-1]
        return last.text() if getattr(self.body, "echo", False) and last.role == "assistant" else ""

    def opening(self):
        return [sse(R.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, prompt_token_ids=self.prompt_ids(0),
            choices=[R.ChatStreamChoice(index=k, delta=R.DeltaMessage(role="assistant", content=self.echoed),
                                        logprobs=None, finish_reason=None)]))
                for k in range(len(self.prompts) * self.n)]

    def delta_choice(self, i, out, o, first):
        content, calls, finish = o.delta_text, [], o.finish_reason
        if self.body.uses_tools:
            content, calls, finish = self.stream_tools(self.index(i, o), o)
        ids = self.body.return_token_ids
        if not content and not calls and finish is None and not ((self.body.logprobs or ids) and o.delta_token_ids):
            return None
        delta = R.DeltaMessage(content=content or None, tool_calls=calls or None)
        return R.ChatStreamChoice(index=self.index(i, o), delta=delta,
                                  logprobs=self.chat_logprobs(o.delta_token_ids, o.delta_logprobs),
                                  finish_reason=finish, token_ids=list(o.delta_token_ids) if ids else None)

    def message(self, o: CompletionOutput) -> tuple[R.ChatMessageOut, str | None]:
        if not self.body.uses_tools:
            return R.ChatMessageOut(content=self.echoed + o.text), o.finish_reason
        content, calls = tc.ToolCallParser.parse(o.text)
        tool_calls = [R.ToolCallOut(id=c.id, function=R.FunctionCallOut(name=c.name, arguments=c.arguments))
                      for c in calls]
        return (R.ChatMessageOut(content=(self.echoed + (content or "")) or None, tool_calls=tool_calls),
                self.finish_reason(o, calls))

    def chunk(self, choices, usage=None):
        return R.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                     usage=usage)

    def body_of(self, finals):
        choices = []
        for i, out in enumerate(finals):
            for o in out.outputs:
                message, finish = self.message(o)
                choices.append(R.ChatChoice(index=self.index(i, o), message=message,
                                            logprobs=self.chat_logprobs(o.token_ids, o.logprobs),
                                            finish_reason=finish, stop_reason=o.stop_reason,
                                            token_ids=self.output_ids(o)))
        choices.sort(key=lambda c: c.index)
        return R.ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                        usage=self.usage(finals), prompt_token_ids=self.prompt_ids(0)
                                        ).model_dump(mode="json")


def event_line(event: dict) -> str:
    """One Server-Sent Event as the typed streams send them (the Responses API's, Anthropic's): its
    type as the SSE event, then the event as JSON."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


@dataclass
class Block:
    """A piece of one reply's output as APIs made of blocks stream it: text, or one tool call."""

    kind: str  # "text" or "call"
    id: str
    text: str = ""  # kind "text"
    call_id: str = ""  # kind "call": the id the caller's result names
    name: str = ""
    arguments: str = ""  # JSON text, as the model wrote it


class BlockReply(ChatReply):
    """A one-choice chat reply streamed as a sequence of blocks (the Responses API's output items,
    Anthropic's content blocks): the model's text and each of its tool calls open, grow and close in
    order, one open at a time. Subclasses say what each moment sends (`events_*`) and build their
    final body from the same blocks (`blocks_of`)."""

    def blocks_of(self, o: CompletionOutput) -> list[Block]:
        """The finished output as blocks: its text (if any), then its tool calls."""
        message, _ = self.message(o)
        blocks = [Block("text", self.block_id("text"), text=message.content)] if message.content else []
        return blocks + [Block("call", self.block_id("call"), call_id=c.id, name=c.function.name,
                               arguments=c.function.arguments) for c in message.tool_calls or []]

    # ---- what each moment sends -------------------------------------------------------------------------
    def block_id(self, kind: str) -> str:
        return uuid.uuid4().hex

    def events_start(self) -> list[str]:
        return []

    def events_opened(self, index: int, block: Block) -> list[str]:
        return []

    def events_grown(self, index: int, block: Block, piece: str) -> list[str]:
        return []

    def events_closed(self, index: int, block: Block) -> list[str]:
        return []

    def events_end(self, blocks: list[Block], finals: list[RequestOutput | None]) -> list[str]:
        return []

    def events_error(self, error: APIError) -> list[str]:
        return []

    async def stream(self, outputs: AsyncIterator, metrics: ServerMetrics, key: str) -> AsyncIterator[str]:
        finals: list[RequestOutput | None] = [None]
        blocks: list[Block] = []
        open_text: Block | None = None  # the text block taking text now
        calls: dict[int, int] = {}  # the model's call index -> its block's index
        try:
            for line in self.events_start():
                yield line
            async for _, out in outputs:
                finals[0] = out
                if out.finished:
                    metrics.observe_request(out)
                o = out.outputs[0]
                content, deltas = o.delta_text, []
                if self.body.uses_tools:
                    content, deltas, _ = self.stream_tools(0, o)
                lines: list[str] = []
                if content:
                    if open_text is None:
                        lines += self._open(blocks, open_text := Block("text", self.block_id("text")))
                    open_text.text += content
                    lines += self.events_grown(len(blocks) - 1, open_text, content)
                for d in deltas:
                    if d.id is not None:  # a new call: text after it opens a new text block
                        open_text, calls[d.index] = None, len(blocks)
                        lines += self._open(blocks, Block("call", self.block_id("call"), call_id=d.id,
                                                          name=d.function.name))
                    if d.function.arguments:
                        call = blocks[calls[d.index]]
                        call.arguments += d.function.arguments
                        lines += self.events_grown(calls[d.index], call, d.function.arguments)
                for line in lines:
                    yield line
            if blocks:
                for line in self.events_closed(len(blocks) - 1, blocks[-1]):
                    yield line
            for line in self.events_end(blocks, finals):
                yield line
        except ENGINE_ERRORS as e:  # after the 200 header an error can only travel in the stream
            for line in self.events_error(engine_error(e)):
                yield line
        except Exception as e:
            logger.exception("error while streaming %s", self.id)
            for line in self.events_error(APIError(500, scrubbed(f"internal error: {e!r}"))):
                yield line
        finally:
            self.count_unfinished(finals, metrics)
            usage = self.usage(finals)  # a client that went away still used what was generated
            metrics.observe_usage(key, usage.prompt_tokens, usage.completion_tokens)

    def _open(self, blocks: list[Block], block: Block) -> list[str]:
        """Close the open block (one is open at a time), then open this one."""
        lines = self.events_closed(len(blocks) - 1, blocks[-1]) if blocks else []
        blocks.append(block)
        return lines + self.events_opened(len(blocks) - 1, block)
