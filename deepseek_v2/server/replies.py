"""Engine outputs into OpenAI bodies: one `Reply` per API request turns the `RequestOutput`s of its
prompts into the JSON response, or into Server-Sent Events exactly as OpenAI streams them (chat: a
role chunk per choice, content deltas, the finish reason on the last delta, an optional usage-only
chunk, then `data: [DONE]`; an error after the 200 goes out as a `data: {"error": ...}` event).

Choice `index` is prompt_index * n + sample_index, as vLLM numbers them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from ..engine.async_engine import EngineDeadError, EngineNotReadyError
from ..outputs import CompletionOutput, RequestOutput
from ..tokenizer import Tokenizer
from . import protocol as P
from . import responses as R
from .metrics import ServerMetrics

logger = logging.getLogger("deepseek_v2")
DONE = "data: [DONE]\n\n"


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

    def index(self, i: int, o: CompletionOutput) -> int:
        return i * self.n + o.index

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
    async def collect(self, outputs: AsyncIterator, metrics: ServerMetrics, key: str) -> dict:
        """The whole response of a non-streaming request."""
        finals: list[RequestOutput | None] = [None] * len(self.prompts)
        try:
            async for i, out in outputs:
                finals[i] = out
                if out.finished:
                    metrics.observe_request(out)
        except (EngineDeadError, EngineNotReadyError) as e:
            raise P.APIError(503, str(e), code="engine_dead") from None
        if any(f is None or not f.finished for f in finals):
            raise P.APIError(503, "the request was aborted (the server is shutting down)", code="aborted")
        body = self.body_of(finals)
        metrics.observe_usage(key, body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
        return body

    async def stream(self, outputs: AsyncIterator, metrics: ServerMetrics, key: str) -> AsyncIterator[str]:
        finals: list[RequestOutput | None] = [None] * len(self.prompts)
        started, done = set(), set()
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
                    choice = self.delta_choice(i, out, o, first=idx not in started)
                    started.add(idx)
                    if o.finish_reason is not None:
                        done.add(idx)
                    if choice is not None:
                        yield sse(self.chunk([choice]))
            opts = self.body.stream_options
            if opts is not None and opts.include_usage:
                yield sse(self.chunk([], usage=self.usage(finals)))
        except (EngineDeadError, EngineNotReadyError) as e:
            yield sse(P.error_body(503, str(e), code="engine_dead"))
        except Exception as e:  # after the 200 header an error can only travel in the stream
            logger.exception("error while streaming %s", self.id)
            yield sse(P.error_body(500, f"internal error: {e!r}"))
        finally:
            usage = self.usage(finals)  # a client that went away still used what was generated
            metrics.observe_usage(key, usage.prompt_tokens, usage.completion_tokens)
        yield DONE


class CompletionReply(Reply):
    """`/v1/completions`: text choices, legacy logprobs, echo of the prompt with its logprobs."""

    def legacy_logprobs(self, token_ids: list[int], entries: list, offset: int) -> R.CompletionLogprobs:
        lp = R.CompletionLogprobs()
        for tid, entry in zip(token_ids, entries):
            s = self.token_str(tid)
            lp.tokens.append(s)
            lp.text_offset.append(offset)
            offset += len(s)
            lp.token_logprobs.append(None if entry is None else entry[tid])
            lp.top_logprobs.append(None if entry is None else {self.token_str(t): v for t, v in entry.items()})
        return lp

    def piece(self, i: int, out: RequestOutput, o: CompletionOutput, first: bool, delta: bool, offset: int):
        """Text and logprobs of a choice: all of it (delta=False) or what is new; the first piece
        carries the echoed prompt."""
        body = self.body
        text, ids, entries = "", [], []
        if first and body.echo:
            prompt_text, prompt_ids = self.prompts[i]
            text = prompt_text if prompt_text is not None else self.tok.decode(prompt_ids)
            ids = list(prompt_ids)
            entries = list(out.prompt_logprobs or [None] * len(prompt_ids))
        if not body.echo_only:
            text += o.delta_text if delta else o.text
            ids += o.delta_token_ids if delta else o.token_ids
            entries += (o.delta_logprobs if delta else o.logprobs) or []
        logprobs = self.legacy_logprobs(ids, entries, offset) if body.logprobs is not None else None
        return text, logprobs

    def delta_choice(self, i, out, o, first):
        idx = self.index(i, o)
        text, logprobs = self.piece(i, out, o, first, delta=True, offset=self._offsets.get(idx, 0))
        if logprobs is not None and logprobs.tokens:
            self._offsets[idx] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        if not text and o.finish_reason is None and not (logprobs and logprobs.tokens):
            return None
        return R.CompletionChoice(index=idx, text=text, logprobs=logprobs, finish_reason=o.finish_reason,
                                  stop_reason=o.stop_reason)

    def chunk(self, choices, usage=None):
        return R.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def body_of(self, finals):
        choices = []
        for i, out in enumerate(finals):
            for o in out.outputs:
                text, logprobs = self.piece(i, out, o, first=True, delta=False, offset=0)
                choices.append(R.CompletionChoice(index=self.index(i, o), text=text, logprobs=logprobs,
                                                  finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        choices.sort(key=lambda c: c.index)
        return self.chunk(choices, self.usage(finals)).model_dump(mode="json")


class ChatReply(Reply):
    """`/v1/chat/completions`: assistant messages, chat-style logprobs."""

    prefix = "chatcmpl"

    def chat_logprobs(self, token_ids: list[int], entries: list | None) -> R.ChatLogprobs | None:
        if not self.body.logprobs:
            return None
        top_n = self.body.top_logprobs or 0
        content = []
        for tid, entry in zip(token_ids, entries or []):
            s = self.token_str(tid)
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
            content.append(R.TokenLogprob(
                token=s, logprob=entry[tid], bytes=list(s.encode("utf-8", "replace")),
                top_logprobs=[R.TopLogprob(token=self.token_str(t), logprob=v,
                                           bytes=list(self.token_str(t).encode("utf-8", "replace")))
                              for t, v in top]))
        return R.ChatLogprobs(content=content)

    def opening(self):
        return [sse(self.chunk([R.ChatStreamChoice(index=k, delta=R.DeltaMessage(role="assistant", content=""),
                                                   logprobs=None, finish_reason=None)]))
                for k in range(len(self.prompts) * self.n)]

    def delta_choice(self, i, out, o, first):
        if not o.delta_text and o.finish_reason is None and not (self.body.logprobs and o.delta_token_ids):
            return None
        delta = R.DeltaMessage(content=o.delta_text) if o.delta_text else R.DeltaMessage()
        return R.ChatStreamChoice(index=self.index(i, o), delta=delta,
                                  logprobs=self.chat_logprobs(o.delta_token_ids, o.delta_logprobs),
                                  finish_reason=o.finish_reason)

    def chunk(self, choices, usage=None):
        return R.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                     usage=usage)

    def body_of(self, finals):
        choices = [R.ChatChoice(index=self.index(i, o), message=R.ChatMessageOut(content=o.text),
                                logprobs=self.chat_logprobs(o.token_ids, o.logprobs),
                                finish_reason=o.finish_reason, stop_reason=o.stop_reason)
                   for i, out in enumerate(finals) for o in out.outputs]
        choices.sort(key=lambda c: c.index)
        return R.ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                        usage=self.usage(finals)).model_dump(mode="json")
