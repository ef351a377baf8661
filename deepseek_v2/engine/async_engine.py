"""`AsyncLLMEngine`: the engine behind the server.

One background asyncio task owns the `LLMEngine`. Between steps it applies the adds and aborts that
request handlers queued, then runs `engine.step()` in a single worker thread, so the event loop
keeps answering HTTP while the model runs and only one thread ever touches the engine. Each request
gets an asyncio queue of `RequestOutput`s; `generate` yields them and aborts the request when its
caller stops listening (cancellation, `aclose`, a client that went away).

States: loading (a `loader` is still building the engine), ready, draining (no new requests),
dead (a step raised: every pending request fails with `EngineDeadError`, new ones are refused).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .llm_engine import LLMEngine

logger = logging.getLogger("deepseek_v2")


class EngineDeadError(RuntimeError):
    """The engine failed (or shut down) and serves no more requests."""


class EngineNotReadyError(RuntimeError):
    """The engine is still loading, or draining before shutdown."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is over `max_waiting_requests`; the caller should retry later."""


_ABORTED = object()  # ends the iteration of a request aborted from outside


@dataclass
class _PendingAdd:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine | None = None, loader: Callable[[], LLMEngine] | None = None):
        if (engine is None) == (loader is None):
            raise ValueError("give either a built engine or a loader")
        self.engine = engine
        self._loader = loader
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._streams: dict[str, asyncio.Queue] = {}
        self._reserved: set[str] = set()  # accepted by generate(), iteration not started yet
        self._adds: list[_PendingAdd] = []
        self._aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stats: dict = engine.stats() if engine is not None else {}
        self.error: BaseException | None = None
        self.draining = False

    @classmethod
    def from_pretrained(cls, model: str | None = None, dtype="auto", device: str | None = None,
                        **knobs) -> AsyncLLMEngine:
        """An engine that loads the checkpoint in its worker thread once `start()` is called."""
        return cls(loader=lambda: LLMEngine.from_pretrained(model, dtype=dtype, device=device, **knobs))

    # ---- state ------------------------------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return self.error is not None

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self._task is not None and not self.is_dead and not self.draining

    def stats(self) -> dict:
        """The engine's statistics as of the end of the last step (safe to read from any thread),
        with requests accepted but not yet handed to the engine counted as waiting."""
        waiting = self._stats.get("num_waiting", 0) + len(self._adds) + len(self._reserved)
        return {**self._stats, "num_waiting": waiting}

    def _check_accepting(self) -> None:
        if self.is_dead:
            raise EngineDeadError(f"the engine is dead: {self.error!r}")
        if self.engine is None or self._task is None:
            raise EngineNotReadyError("the model is still loading")
        if self.draining:
            raise EngineNotReadyError("the server is shutting down")

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the background loop (and the loading, with a loader) on the running event loop."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="engine-loop")

    async def wait_until_loaded(self) -> None:
        """Return once the engine is built; raise EngineDeadError if loading failed."""
        while self.engine is None and not self.is_dead:
            await asyncio.sleep(0.05)
        if self.is_dead:
            raise EngineDeadError(f"the engine failed to load: {self.error!r}")

    async def shutdown(self, grace_period: float = 0.0) -> None:
        """Refuse new requests, let running ones finish for up to grace_period seconds, then fail the
        rest and stop the loop."""
        self.draining = True
        deadline = time.monotonic() + grace_period
        while self._streams and not self.is_dead and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._fail_all(EngineDeadError("the server shut down"))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.close()  # the other tensor-parallel ranks

    # ---- requests ---------------------------------------------------------------------------------
    def encode_and_validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Token ids of `prompt` (a string is encoded with the tokenizer's defaults); raises
        InvalidRequestError for a request the engine cannot serve. The engine's own check, so the
        worker thread only enqueues."""
        self._check_accepting()
        _, ids = self.engine.encode_prompt(prompt)  # reads only immutable tokenizer/model state
        self.engine.validate_request(ids, params)
        return ids

    def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                 arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Validate now (raising InvalidRequestError, EngineOverloadedError, EngineNotReadyError or
        EngineDeadError before anything is queued) and return an async iterator of the request's
        outputs. The request holds a place in the waiting queue from now on; it reaches the engine
        when iteration starts and is aborted when iteration stops early (call `abort` for an
        iterator you never start). Outputs that pile up while the caller is busy are merged into
        one (deltas concatenated)."""
        ids = self.encode_and_validate(prompt, params)
        if request_id in self._streams or request_id in self._reserved:
            raise ValueError(f"request id {request_id!r} is already in use")
        limit = self.engine.config.max_waiting_requests
        if limit is not None and self.stats()["num_waiting"] >= limit:
            raise EngineOverloadedError(f"{limit} requests are already waiting; retry later")
        self._reserved.add(request_id)
        return self._iterate(request_id, ids, params, time.monotonic() if arrival_time is None else arrival_time)

    async def _iterate(self, request_id: str, ids: list[int], params: SamplingParams,
                       arrival_time: float) -> AsyncIterator[RequestOutput]:
        if request_id not in self._reserved:  # aborted before it started
            return
        self._reserved.discard(request_id)
        self._check_accepting()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._adds.append(_PendingAdd(request_id, ids, params, arrival_time))
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        finished = True  # nothing left to abort
                        raise item
                    if item is _ABORTED:
                        finished = True
                        return
                out = _merge(items)
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its cache blocks at the next step boundary (no-op if unknown);
        its iterator, if one is waiting, ends."""
        self._reserved.discard(request_id)
        queue = self._streams.pop(request_id, None)
        if queue is None:  # unknown, finished or failed: nothing runs
            return
        queue.put_nowait(_ABORTED)
        pending = [a for a in self._adds if a.request_id == request_id]
        if pending:
            self._adds.remove(pending[0])
        elif self.engine is not None and not self.is_dead:
            self._aborts.append(request_id)
            if self._wakeup is not None:
                self._wakeup.set()

    def _fail_all(self, error: BaseException) -> None:
        for queue in self._streams.values():
            queue.put_nowait(error)
        self._streams.clear()
        self._adds.clear()
        self._reserved.clear()

    # ---- the loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.engine is None:
                self.engine = await loop.run_in_executor(self._executor, self._loader)
                self._stats = self.engine.stats()
                logger.info("engine ready")
            while True:
                if not (self._adds or self._aborts or self.engine.has_unfinished_requests()):
                    self._wakeup.clear()  # idle: sleep until a request arrives
                    await self._wakeup.wait()
                    continue
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                outputs, failed = await loop.run_in_executor(self._executor, self._step, adds, aborts)
                for request_id, error in failed:
                    self._deliver(request_id, error)
                for out in outputs:
                    self._deliver(out.request_id, out)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a failed step may leave the engine inconsistent: stop serving
            logger.exception("the engine died")
            self.error = e
            self._fail_all(EngineDeadError(f"the engine died: {e!r}"))

    def _deliver(self, request_id: str, item) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _step(self, adds: list[_PendingAdd], aborts: list[str]):
        """Runs in the worker thread: the only place the engine is touched after loading."""
        for request_id in aborts:
            self.engine.abort(request_id)
        failed = []
        for a in adds:
            try:
                self.engine.enqueue(a.request_id, None, a.prompt_token_ids, a.params, arrival_time=a.arrival_time)
            except Exception as e:  # only this request fails
                failed.append((a.request_id, e))
        outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
        self._stats = self.engine.stats()
        return outputs, failed


def _merge(items: list[RequestOutput]) -> RequestOutput:
    """Several outputs of one request as one: the latest state with the deltas concatenated."""
    if len(items) == 1:
        return items[0]
    last = items[-1]
    outs = []
    for i, o in enumerate(last.outputs):
        parts = [it.outputs[i] for it in items]
        logprobs = None if o.delta_logprobs is None else [lp for p in parts for lp in (p.delta_logprobs or [])]
        outs.append(replace(o, delta_text="".join(p.delta_text for p in parts),
                            delta_token_ids=[t for p in parts for t in p.delta_token_ids],
                            delta_logprobs=logprobs))
    return replace(last, outputs=outs)
