"""The engine in a process of its own, for the server: `serve --engine-process`.

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

import logging
import multiprocessing
import pickle
import signal
import threading

from ..tokenizer import Tokenizer
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
    from .llm_engine import LLMEngine, StepError
    # Ctrl-C in a terminal reaches the whole process group: the server drains, then stops this process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a spawned process starts without the server's logging: the same format, level and stream
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(log_level)
    try:
        engine = LLMEngine.from_pretrained(model, dtype=dtype, device=device, load_format=load_format, **knobs)
        engine.max_prompt_chars  # computed once here and sent, not by the server's first request
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
                for request_id in aborts:
                    engine.abort(request_id)
                for request_id, ids, params, arrival in adds:
                    added += 1
                    try:
                        engine.enqueue(request_id, None, ids, params, arrival_time=arrival)
                    except Exception as e:  # only this request fails
                        failed.append((request_id, _portable(e)))
            outputs = []
            if engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except StepError as e:  # the engine aborted the step's requests and serves on
                    logger.error("a step failed; its %d request(s) were aborted: %r", len(e.request_ids), e.cause)
                    failed += [(request_id, e) for request_id in e.request_ids]
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
