"""The engine in a process of its own, for the server: `serve --engine-process`.
`AsyncEngineProcess` is the server's `AsyncLLMEngine` for it; `RemoteEngine` its end of the pipe.

In one process the server's event loop (HTTP, one streamed chunk per token and request) and the
engine's thread (scheduling, kernel launches, sampling, outputs) run Python under one GIL, and each
waits for the other. Here the child process owns the `LLMEngine` and steps it back to back; the
server's process keeps the tokenizer and the request checks (`RemoteEngine`, the same
`RequestChecks` as the engine's) and exchanges one message per step with it over a pipe: the
requests to add and abort one way, the step's outputs and the engine's statistics the other.
(vLLM's API server and engine core are split the same way.)

Messages to the child: ("work", adds, aborts) with adds as (request_id, prompt_token_ids, params,
arrival_time); ("stop",). From it: ("ready", info); ("step", outputs, failed, stats, num_added) with
failed as (request_id, error); ("dead", error) before it exits on an error it cannot serve on.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import pickle
import signal
import threading
from collections.abc import Callable

from ..tokenizer import Tokenizer
from .async_engine import AsyncLLMEngine, freeze_loaded_heap, step_failing_alone, take_work
from .request_checks import RequestChecks

logger = logging.getLogger("deepseek_v2")


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(repr(error))


def _child(conn, model: str | None, dtype, device, load_format: str, knobs: dict, log_level: int) -> None:
    """The engine process: build the engine, then step while there is work, else wait for some."""
    from .llm_engine import LLMEngine
    # Ctrl-C in a terminal reaches the whole process group: the server drains, then stops this process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a spawned process starts without the server's logging: the same format, level and stream
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(log_level)
    try:
        engine = LLMEngine.from_pretrained(model, dtype=dtype, device=device, load_format=load_format, **knobs)
        engine.max_prompt_chars  # computed once here and sent, not by the server's first request
        freeze_loaded_heap()
        conn.send(("ready", {"config": engine.config, "max_model_len": engine.max_model_len,
                             "vocab_size": engine.vocab_size, "max_prompt_chars": engine.max_prompt_chars,
                             "stats": engine.stats()}))
    except BaseException as e:
        conn.send(("dead", _portable(e)))
        return
    added = 0
    try:
        while True:
            if not engine.has_unfinished_requests():
                conn.poll(None)  # idle: sleep until the server sends something
            failed, received = [], False
            while conn.poll():
                received = True
                message = conn.recv()
                if message[0] == "stop":
                    engine.close()
                    return
                _, adds, aborts = message
                added += len(adds)
                failed += take_work(engine, adds, aborts)  # message by message: an abort may follow its add
            outputs, step_failed = step_failing_alone(engine)
            failed = [(request_id, _portable(e)) for request_id, e in failed + step_failed]
            if outputs or failed or received:  # (a step that could schedule nothing says nothing)
                conn.send(("step", outputs, failed, engine.stats(), added))
    except BaseException as e:
        logger.exception("the engine died")
        try:
            conn.send(("dead", _portable(e)))
        finally:
            engine.close()


class RemoteEngine(RequestChecks):
    """The server's view of the engine in the child process: its tokenizer, limits and request checks,
    and the pipe to it."""

    def __init__(self, model: str | None, dtype="auto", device: str | None = None, load_format: str = "auto",
                 **knobs):
        from ..config import DEFAULT_MODEL
        self.model_path = str(model or DEFAULT_MODEL)
        self.tokenizer = Tokenizer.from_pretrained(self.model_path)
        context = multiprocessing.get_context("spawn")  # nothing of this process (threads, CUDA) is inherited
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_child, name="engine", daemon=True,
                                       args=(child_conn, model, dtype, device, load_format, knobs,
                                             logger.getEffectiveLevel()))
        self.process.start()
        child_conn.close()
        self.send_lock = threading.Lock()  # the event loop sends work, shutdown sends stop
        self.closing = False  # set by close(): the child's end is then no death

    def wait_ready(self) -> dict:
        """Block until the child has built the engine; its limits become this object's. Raises the
        child's error if it could not."""
        try:
            kind, info = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited with code {self.process.exitcode}") from None
        if kind == "dead":
            raise info
        self.config, self.max_model_len, self.vocab_size = info["config"], info["max_model_len"], info["vocab_size"]
        self.__dict__["max_prompt_chars"] = info["max_prompt_chars"]  # RequestChecks' cached value
        return info

    def send(self, message) -> None:
        with self.send_lock:
            self.conn.send(message)

    def receive(self):
        """The child's next message; ("dead", error) when it is gone."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return "dead", RuntimeError(f"the engine process exited with code {self.process.exitcode}")

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to stop (it closes the other tensor-parallel ranks), then make sure it has."""
        self.closing = True
        if self.process.is_alive():
            try:
                self.send(("stop",))
            except OSError:
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class AsyncEngineProcess(AsyncLLMEngine):
    """AsyncLLMEngine (the same admission in turns, streams and drain) with the engine in a child process:
    its loop sends the requests that take their turn and the aborts, and a reader thread hands the
    child's step messages (outputs, failures, statistics) to the event loop."""

    LOWER_SWITCH_INTERVAL = False  # no engine thread in this process to hand the interpreter to

    def __init__(self, make_remote: Callable[[], RemoteEngine]):
        super().__init__(loader=make_remote)  # (run by _run below, in the executor: it starts the child)
        self._in_flight: list[int] = []  # sequences of the requests sent, not yet taken by the child
        self._num_taken = 0  # requests the child has taken so far
        self._wakeup: asyncio.Event | None = None  # a request, an abort, or room

    @classmethod
    def from_pretrained(cls, model: str | None = None, dtype="auto", device: str | None = None,
                        load_format: str = "auto", **knobs) -> AsyncEngineProcess:
        """An engine whose child process loads the checkpoint once `start()` is called."""
        return cls(lambda: RemoteEngine(model, dtype=dtype, device=device, load_format=load_format, **knobs))

    async def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
        await super().start()

    def _notify(self) -> None:
        super()._notify()
        if self._wakeup is not None:
            self._wakeup.set()

    def _sequences_sent(self) -> int:
        return sum(self._in_flight)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            remote = await loop.run_in_executor(self._executor, self._loader)
            info = await loop.run_in_executor(self._executor, remote.wait_ready)
            self.engine, self._stats = remote, info["stats"]
            logger.info("engine ready (in its own process, pid %d)", remote.process.pid)
            threading.Thread(target=self._read, args=(remote, loop), name="engine-reader", daemon=True).start()
            while not self.is_dead:
                adds = self._take_turns() if self._pending else []
                aborts, self._aborts = self._aborts, []
                if not adds and not aborts:  # nothing to send, or no room: a request, an abort or a step wakes this
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._in_flight += [a.params.n for a in adds]
                remote.send(("work", [a.as_work() for a in adds], aborts))
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._die(e)

    def _read(self, remote: RemoteEngine, loop: asyncio.AbstractEventLoop) -> None:
        """The reader thread: each message of the engine process, handed to the event loop."""
        while True:
            message = remote.receive()
            try:
                if message[0] == "step":
                    loop.call_soon_threadsafe(self._on_step, *message[1:])
                else:
                    if not remote.closing:  # (after close() the child's end is the one asked for)
                        loop.call_soon_threadsafe(self._die, message[1])
                    return
            except RuntimeError:  # the event loop is closed: nobody listens any more
                return

    def _on_step(self, outputs, failed, stats: dict, num_added: int) -> None:
        self._stats = stats
        del self._in_flight[:num_added - self._num_taken]
        self._num_taken = num_added
        self._deliver_step(outputs, failed)
        if self._pending:
            self._wakeup.set()  # there may be room now

    def _die(self, error: BaseException) -> None:
        super()._die(error)
        self._wakeup.set()
