"""`AsyncLLMEngine`: the engine behind the server.

One worker thread owns the `LLMEngine` and steps it back to back: between steps it takes the adds
and aborts that request handlers queued (under a lock), runs `engine.step()`, and hands the outputs to
the event loop with `call_soon_threadsafe`. So the event loop keeps answering HTTP while the model
runs, only one thread ever touches the engine, and the next step never waits for the event loop to
get round to it: with hundreds of streams the loop has a step's worth of chunks to send, and when
each step was awaited from the loop, that work sat between every two steps (online at 20 requests/s
the server reached half the engine's offline throughput). The interpreter's switch interval is cut
to 0.1 ms for the same reason: the engine thread gives up the GIL at every CUDA wait and must get it
back at once, not after the 5 ms a busy event loop may otherwise hold it. Each request gets an
asyncio queue of `RequestOutput`s; `generate` yields them and aborts the request when its caller
stops listening (cancellation, `aclose`, a client that went away).

engine_process.py's subclass, `AsyncEngineProcess`, puts the engine in a process of its own instead:
the same admission and streams, another loop.

Fair admission: requests wait here, in groups (one per API request), until the running batch has
room, and are handed to the engine taking the groups in turn. So one API request of many prompts
cannot keep the requests behind it waiting until all its prompts were scheduled (the engine's own
queue is first come, first served); sequences already running are never preempted for fairness.

States: loading (a `loader` is still building the engine), ready, draining (no new requests; after
the grace period the rest fail with `RequestAbortedError`), dead (a fatal error: every pending
request fails with `EngineDeadError`, new ones are refused). A step that fails in a way that harms
only its own requests (`StepError`) fails those requests and the engine goes on.
(About 420 lines: admission, the loop and the drain share the queues defined here.)
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .llm_engine import LLMEngine, StepError

logger = logging.getLogger("deepseek_v2")

# seconds a thread may hold the GIL while another waits for it (CPython's default: 0.005)
SWITCH_INTERVAL_S = 1e-4


class EngineDeadError(RuntimeError):
    """The engine failed (or shut down) and serves no more requests."""


class EngineNotReadyError(RuntimeError):
    """The engine is still loading, or draining before shutdown."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is over `max_waiting_requests`; the caller should retry later."""


class RequestAbortedError(RuntimeError):
    """The server shut down before the request finished (the drain's grace period ran out)."""


_ABORTED = object()  # ends the iteration of a request aborted from outside


@dataclass
class _PendingAdd:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    group: str

    def as_work(self) -> tuple:
        """What take_work (and the engine process) takes: (request_id, prompt_token_ids, params, arrival_time)."""
        return self.request_id, self.prompt_token_ids, self.params, self.arrival_time


def freeze_loaded_heap() -> None:
    """Move every object alive once the engine has loaded (modules, the model, the engine, the app)
    into the garbage collector's permanent generation, as vLLM's engine core does, so that its full
    collections walk only what requests make. A server's process calls this; a library's caller keeps
    its heap as it is. On an H200 server at the V2-Lite shape the full collections of a 500-request
    run took 1.7 s in ten pauses of up to 0.3 s (start-up included), each a stall of every stream;
    frozen, 0.7-0.95 s and 0.18-0.22 s (docs/benchmarks.md, "Start-up")."""
    gc.collect()
    gc.freeze()
    logger.info("froze %d start-up objects out of the garbage collector's way", gc.get_freeze_count())


class AsyncLLMEngine:
    LOWER_SWITCH_INTERVAL = True  # for the engine thread of this process (below)

    def __init__(self, engine: LLMEngine | None = None, loader: Callable[[], LLMEngine] | None = None):
        if (engine is None) == (loader is None):
            raise ValueError("give either a built engine or a loader")
        self.engine = engine
        self._loader = loader
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._streams: dict[str, asyncio.Queue] = {}
        self._reserved: dict[str, int] = {}  # accepted by generate(), iteration not started: id -> n
        self._pending: dict[str, deque[_PendingAdd]] = {}  # group -> its requests not yet in the engine
        self._pending_group: dict[str, str] = {}  # request id -> its group, while pending
        self._num_held = 0  # sequences of the reserved and pending requests
        self._aborts: list[str] = []
        # _pending, _pending_group, _num_held and _aborts are shared with the engine thread
        self._lock = threading.RLock()
        self._work = threading.Event()  # set when a request or an abort is queued (or on shutdown)
        self._stopping = False
        self._died: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stats: dict = engine.stats() if engine is not None else {}
        self.error: BaseException | None = None
        self.draining = False

    @classmethod
    def from_pretrained(cls, model: str | None = None, dtype="auto", device: str | None = None,
                        load_format: str = "auto", **knobs) -> AsyncLLMEngine:
        """An engine that loads the checkpoint in its worker thread once `start()` is called."""
        return cls(loader=lambda: LLMEngine.from_pretrained(model, dtype=dtype, device=device,
                                                            load_format=load_format, **knobs))

    # ---- state ------------------------------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return self.error is not None

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self._task is not None and not self.is_dead and not self.draining

    def stats(self) -> dict:
        """The engine's statistics as of the end of the last step (safe to read from any thread),
        with the sequences of requests accepted but not yet handed to the engine counted as waiting."""
        return {**self._stats, "num_waiting": self._stats.get("num_waiting", 0) + self._num_held}

    def check_room(self, num_seqs: int) -> None:
        """Raise EngineOverloadedError if num_seqs more waiting sequences would go over
        max_waiting_requests (a request of n samples is n sequences)."""
        limit = self.engine.config.max_waiting_requests
        if limit is not None and self.stats()["num_waiting"] + num_seqs > limit:
            raise EngineOverloadedError(f"{limit} sequences may wait and this request would go over; retry later")

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
            if self.LOWER_SWITCH_INTERVAL:
                sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
            self._died = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="engine-loop")

    async def wait_until_loaded(self) -> None:
        """Return once the engine is built; raise EngineDeadError if loading failed."""
        while self.engine is None and not self.is_dead:
            await asyncio.sleep(0.05)
        if self.is_dead:
            raise EngineDeadError(f"the engine failed to load: {self.error!r}")

    async def wait_until_dead(self) -> BaseException:
        """Return the fatal error once the engine has died (after `start()`)."""
        await self._died.wait()
        return self.error

    async def drain(self, grace_period: float) -> None:
        """Refuse new requests, let running ones finish for up to grace_period seconds, then abort
        the rest: their iterators raise RequestAbortedError and their blocks are freed."""
        self.draining = True
        deadline = time.monotonic() + grace_period
        while (self._streams or self._reserved) and not self.is_dead and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._fail_all(RequestAbortedError("the request was aborted: the server is shutting down"))

    async def shutdown(self, grace_period: float = 0.0) -> None:
        """`drain`, then stop the loop."""
        await self.drain(grace_period)
        self._stopping = True
        self._notify()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)
        # the engine thread ends after the step it may be in; the engine is closed after that
        try:
            await asyncio.wait_for(asyncio.to_thread(self._executor.shutdown, wait=True), timeout=10)
        except asyncio.TimeoutError:
            logger.warning("the engine thread did not stop within 10 s")
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)  # the other tensor-parallel ranks, or the engine's process

    # ---- requests ---------------------------------------------------------------------------------
    def encode_and_validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Token ids of `prompt` (a string is encoded with the tokenizer's defaults); raises
        InvalidRequestError for a request the engine cannot serve. The engine's own check, so the
        worker thread only enqueues."""
        self._check_accepting()
        _, ids = self.engine.encode_prompt(prompt, params)  # reads only immutable tokenizer/model state
        self.engine.validate_request(ids, params)
        return ids

    def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                 arrival_time: float | None = None, group: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validate now (raising InvalidRequestError, EngineOverloadedError, EngineNotReadyError or
        EngineDeadError before anything is queued) and return an async iterator of the request's
        outputs. The request holds a place in the waiting queue from now on; it reaches the engine
        when iteration starts and is aborted when iteration stops early (call `abort` for an
        iterator you never start). Outputs that pile up while the caller is busy are merged into
        one (deltas concatenated). `group`: requests of one group take their turns as one (default:
        the request alone), e.g. the prompts of one API request."""
        ids = self.encode_and_validate(prompt, params)
        if request_id in self._streams or request_id in self._reserved:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_room(params.n)
        self._reserved[request_id] = params.n
        with self._lock:
            self._num_held += params.n
        add = _PendingAdd(request_id, ids, params, time.monotonic() if arrival_time is None else arrival_time,
                          request_id if group is None else group)
        return self._iterate(add)

    async def _iterate(self, add: _PendingAdd) -> AsyncIterator[RequestOutput]:
        request_id = add.request_id
        if request_id not in self._reserved:  # aborted before it started
            return
        try:
            self._check_accepting()
        except Exception:
            self.abort(request_id)  # gives its places back
            raise
        del self._reserved[request_id]  # now pending: still held
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        with self._lock:
            self._pending.setdefault(add.group, deque()).append(add)
            self._pending_group[request_id] = add.group
        self._notify()
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
        with self._lock:
            self._num_held -= self._reserved.pop(request_id, 0)
        queue = self._streams.pop(request_id, None)
        if queue is None:  # unknown, finished or failed: nothing runs
            return
        queue.put_nowait(_ABORTED)
        self._stop(request_id)

    def _stop(self, request_id: str) -> None:
        """Take a request out of the pending groups, or have the engine abort it at the next step."""
        with self._lock:
            group = self._pending_group.pop(request_id, None)
            if group is not None:
                queue = self._pending[group]
                add = next(a for a in queue if a.request_id == request_id)
                queue.remove(add)
                self._num_held -= add.params.n
                if not queue:
                    del self._pending[group]
            elif self.engine is not None and not self.is_dead:
                self._aborts.append(request_id)
                self._notify()

    def _notify(self) -> None:
        """Wake the loop that hands work to the engine."""
        self._work.set()

    def _fail_all(self, error: BaseException) -> None:
        """Every request raises `error` and stops (a dead engine has nothing left to abort)."""
        for request_id, queue in self._streams.items():
            queue.put_nowait(error)
            self._stop(request_id)
        self._streams.clear()
        self._reserved.clear()
        with self._lock:
            self._num_held = 0

    # ---- the loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.engine is None:
                self.engine = await loop.run_in_executor(self._executor, self._load)
                self._stats = self.engine.stats()
                logger.info("engine ready")
            await loop.run_in_executor(self._executor, self._engine_loop, loop)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the engine cannot serve on (is_fatal), or its bookkeeping failed
            self._die(e)

    def _die(self, error: BaseException) -> None:
        """The engine cannot serve on: every request fails with EngineDeadError, new ones are refused."""
        if self.is_dead:
            return
        logger.error("the engine died: %r", error, exc_info=error)
        self.error = error
        self._fail_all(EngineDeadError(f"the engine died: {error!r}"))
        self._died.set()

    def _load(self) -> LLMEngine:
        engine = self._loader()
        engine.max_prompt_chars  # computed once here, not by the first request on the event loop
        return engine

    def _engine_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs in the worker thread until shutdown: step while there is work, else sleep until
        some is queued. An exception ends it (and `_run` declares the engine dead)."""
        while not self._stopping and not loop.is_closed():
            with self._lock:
                idle = not (self._pending or self._aborts or self.engine.has_unfinished_requests())
                if idle:
                    self._work.clear()
                else:
                    adds = self._take_turns()
                    aborts, self._aborts = self._aborts, []
            if idle:
                self._work.wait(timeout=0.5)  # the timeout notices a loop closed without a shutdown
                continue
            outputs, failed = self._step(adds, aborts)
            try:
                loop.call_soon_threadsafe(self._deliver_step, outputs, failed)
            except RuntimeError:  # the event loop was closed: nobody is listening any more
                return

    def _deliver_step(self, outputs: list[RequestOutput], failed: list) -> None:
        for request_id, error in failed:
            self._deliver(request_id, error)
        for out in outputs:
            self._deliver(out.request_id, out)

    def _take_turns(self) -> list[_PendingAdd]:
        """The pending requests to hand to the engine now: as many sequences as the running batch
        has room for beside those already waiting in the engine, one request per group in turn."""
        s = self._stats
        room = (self.engine.config.max_num_seqs - s.get("num_running", 0) - s.get("num_waiting", 0)
                - self._sequences_sent())
        adds = []
        while self._pending and room > 0:
            group, queue = next(iter(self._pending.items()))
            del self._pending[group]
            add = queue.popleft()
            if queue:
                self._pending[group] = queue  # its next request waits for the other groups' turns
            del self._pending_group[add.request_id]
            self._num_held -= add.params.n
            adds.append(add)
            room -= add.params.n
        return adds

    def _sequences_sent(self) -> int:
        """Sequences handed over that the engine's statistics do not count yet (none here: the engine
        thread takes them before it reads its statistics again)."""
        return 0

    def _deliver(self, request_id: str, item) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _step(self, adds: list[_PendingAdd], aborts: list[str]):
        """Runs in the worker thread: the only place the engine is touched after loading."""
        failed = take_work(self.engine, [a.as_work() for a in adds], aborts)
        outputs, step_failed = step_failing_alone(self.engine)
        self._stats = self.engine.stats()
        return outputs, failed + step_failed


def take_work(engine: LLMEngine, adds, aborts: list[str]) -> list[tuple[str, BaseException]]:
    """Abort, then queue the adds ((request_id, prompt_token_ids, params, arrival_time) each); a request
    the engine will not take fails alone. Returns the failed (request_id, error)."""
    for request_id in aborts:
        engine.abort(request_id)
    failed = []
    for request_id, ids, params, arrival_time in adds:
        try:
            engine.enqueue(request_id, None, ids, params, arrival_time=arrival_time)
        except Exception as e:  # only this request fails
            failed.append((request_id, e))
    return failed


def step_failing_alone(engine: LLMEngine) -> tuple[list[RequestOutput], list[tuple[str, BaseException]]]:
    """One step if there is work. A step that fails only its own requests (StepError: the engine aborted
    them and serves on) is logged and its requests returned as failed, with the error."""
    if not engine.has_unfinished_requests():
        return [], []
    try:
        return engine.step(), []
    except StepError as e:
        logger.error("a step failed; its %d request(s) were aborted: %r", len(e.request_ids), e.cause,
                     exc_info=e.cause)
        return [], [(request_id, e) for request_id in e.request_ids]


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
