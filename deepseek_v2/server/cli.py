"""`deepseek-v2 serve`: arguments and the run loop of the OpenAI-compatible server.

The server listens at once and loads the checkpoint in the engine's worker thread (`/health` answers
503 until it is ready); a load failure exits with status 1, and so does a fatal engine error later
(a tensor-parallel rank lost, a device error), after a log line saying why. SIGTERM or Ctrl+C stops
accepting connections, lets running requests finish for `--shutdown-timeout` seconds, then aborts
the rest (a 503 `aborted` error, or that error as the stream's last event before `[DONE]`) and exits
with status 0; a second Ctrl+C exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

import socket

import uvicorn  # imported here, so that `deepseek-v2 serve` without the server extra says which to install

from ..flags import add_engine_arguments, add_model_arguments, check_device, check_model, engine_kwargs
from .app import Limits

API_KEY_ENV = "DEEPSEEK_V2_API_KEY"  # comma-separated keys, kept out of `ps` output
# After the grace period the requests left are aborted; their handlers then need a moment to send the
# 503 or the stream's last events before uvicorn cancels what is still running.
ABORT_MARGIN_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes; repeat for several keys "
                             f"(also ${API_KEY_ENV}, comma-separated). Metrics name them key-1, key-2, ...")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="model name(s) clients send; the first is reported (default: --model as given)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds running requests may take to finish after SIGTERM; the rest are aborted")
    limits = Limits()
    parser.add_argument("--max-request-body-mib", type=float, default=limits.max_body_bytes / 2**20,
                        help="larger request bodies get 413 (default: %(default)s)")
    parser.add_argument("--request-body-timeout", type=float, default=limits.body_timeout,
                        help="seconds a request body may take to arrive, else 408 (default: %(default)s)")
    parser.add_argument("--max-prompts-per-request", type=int, default=limits.max_prompts,
                        help="prompts in one completions request (default: %(default)s)")
    parser.add_argument("--max-choices-per-request", type=int, default=limits.max_choices,
                        help="prompts x n in one request (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                        help="dummy: random weights of --model's config.json with its tokenizer, no weight files "
                             "read (to benchmark a shape without its weights; vLLM's flag)")
    parser.add_argument("--engine-process", action="store_true",
                        help="run the engine in a process of its own, apart from the HTTP server's (so that the "
                             "two do not share one Python interpreter lock)")
    add_model_arguments(parser)
    add_engine_arguments(parser, server=True)


def run(args: argparse.Namespace) -> None:
    """Serve until SIGTERM / Ctrl+C; raises FileNotFoundError or ValueError for a missing or broken
    checkpoint or a bad flag, OSError for an address in use, and EngineDeadError (a RuntimeError) when
    loading fails."""
    from ..config import DEFAULT_MODEL, EngineConfig
    from ..engine.async_engine import AsyncLLMEngine, EngineDeadError, freeze_loaded_heap
    from ..engine.engine_process import AsyncEngineProcess
    from .app import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("deepseek_v2")
    log.setLevel(args.log_level.upper())
    model = args.model or DEFAULT_MODEL
    # Everything that can be refused is refused before the model loads: the checkpoint, the device,
    # the engine flags and the port.
    check_model(model, weights=args.load_format != "dummy")
    check_device(args.device)
    EngineConfig(**engine_kwargs(args))
    check_port(args.host, args.port)
    keys = list(args.api_key) + [k for k in os.environ.get(API_KEY_ENV, "").split(",") if k]
    names = args.served_model_name or [args.model or "deepseek-v2-default"]
    make = AsyncEngineProcess.from_pretrained if args.engine_process else AsyncLLMEngine.from_pretrained
    engine = make(model, dtype=args.dtype, device=args.device, load_format=args.load_format, **engine_kwargs(args))
    limits = Limits(max_body_bytes=int(args.max_request_body_mib * 2**20), body_timeout=args.request_body_timeout,
                    max_prompts=args.max_prompts_per_request, max_choices=args.max_choices_per_request)
    app = build_app(engine, names, keys, model_path=model, limits=limits)
    drains: list[asyncio.Task] = []  # keeps the drain's task referenced until it ends

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not engine.draining:  # /health and new requests answer 503 from now on
                drains.append(asyncio.get_running_loop().create_task(engine.drain(args.shutdown_timeout)))
            engine.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                # uvicorn raises a caught SIGTERM again once it has stopped, which would end a clean
                # drain with status 143: the drain is the answer to SIGTERM, so it ends with 0.
                while signal.SIGTERM in self._captured_signals:
                    self._captured_signals.remove(signal.SIGTERM)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=args.shutdown_timeout + ABORT_MARGIN_S)
    server = Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while engine._task is None and not task.done():  # the app's lifespan starts the engine
            await asyncio.sleep(0.02)
        if not task.done():
            try:
                await engine.wait_until_loaded()
                freeze_loaded_heap()  # this process's (an engine process froze its own)
                log.info("serving %r (%d API key(s)) on http://%s:%d  -  chat page at /, API at /v1",
                         names[0], len(keys), args.host, args.port)
            except Exception:
                server.should_exit = True
                await task
                raise
            watch = asyncio.create_task(engine.wait_until_dead())
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done():  # a fatal engine error: stop serving rather than answer 503 forever
                log.error("the engine failed and cannot serve: %r; shutting down", watch.result())
                server.should_exit = True
            watch.cancel()
        await task  # stopped, or could not start (port in use, ...): uvicorn has said why
        if engine.is_dead:
            raise EngineDeadError(f"the engine died: {engine.error!r}")

    asyncio.run(serve())


def check_port(host: str, port: int) -> None:
    """Raise OSError, in one line, if the address is taken (uvicorn would say so only after loading)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror} (another server? choose one with "
                          "--port)") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepseek-v2 serve", description="OpenAI-compatible server")
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        print(f"deepseek-v2 serve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl+C: uvicorn raises it again after its shutdown
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
