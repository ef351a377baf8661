"""The OpenAI-compatible HTTP server: `build_app(engine, ...)` returns a FastAPI app serving
`/v1/models`, `/v1/completions` and `/v1/chat/completions` (JSON or Server-Sent Events), plus
`/health`, `/metrics`, `/tokenize`, `/detokenize`, `/tokenizer_info`, `/version` and the chat page at `/`.

Every bad request gets the OpenAI error body with a 4xx status and leaves the engine untouched;
a client that goes away aborts its requests; `/v1` routes need a bearer key when keys are set.
How engine outputs become response bodies and stream chunks lives in `replies.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineNotReadyError, EngineOverloadedError
from ..sampling_params import InvalidRequestError
from . import protocol as P
from . import responses as R
from .metrics import ServerMetrics
from .protocol import APIError, error_body
from .replies import ChatReply, CompletionReply

logger = logging.getLogger("deepseek_v2")
STATIC = Path(__file__).parent / "static"
ANONYMOUS = "anonymous"


class KeyAuth:
    """Pure ASGI middleware (no BaseHTTPMiddleware, so streaming and disconnects pass through):
    checks the bearer key on `/v1` routes in constant time, names the key for accounting
    ("key-1", "key-2", ... in the order given) and counts `/v1` responses per key and status."""

    def __init__(self, app, api_keys: Sequence[str], metrics: ServerMetrics):
        self.app = app
        self.keys = [(f"key-{i + 1}", hashlib.sha256(k.encode()).digest()) for i, k in enumerate(api_keys)]
        self.metrics = metrics

    def key_name(self, header: bytes) -> str | None:
        scheme, _, token = header.decode("latin-1").partition(" ")
        digest = hashlib.sha256(token.strip().encode("latin-1")).digest()
        found = None
        for name, key_digest in self.keys:  # no early exit: the time does not depend on which key matched
            if secrets.compare_digest(digest, key_digest) and scheme.lower() == "bearer":
                found = name
        return found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        name = ANONYMOUS
        if self.keys and scope["method"] != "OPTIONS":
            name = self.key_name(dict(scope["headers"]).get(b"authorization", b""))
            if name is None:
                self.metrics.observe_http("unauthorized", 401)
                body = error_body(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")
                return await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        scope.setdefault("state", {})["api_key_name"] = name

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.observe_http(name, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


async def merge(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as they come, tagged with the iterator's index. Stopping
    early cancels the pending reads, which aborts the engine requests behind them."""
    pending = {asyncio.ensure_future(it.__anext__()): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(iterators[i].__anext__())] = i
                yield i, item
    finally:
        for task in pending:
            task.cancel()


async def until_disconnect(request: Request, coro):
    """Run a non-streaming handler, cancelling it (and so aborting its requests) if the client
    disconnects first (vLLM's `with_cancellation`; Starlette does this itself for streams)."""
    handler = asyncio.ensure_future(coro)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not handler.done():
            handler.cancel()
    if handler.cancelled():
        return Response(status_code=499)  # the client is gone; nobody reads this
    return handler.result()


def build_app(engine: AsyncLLMEngine, served_model_name: str | Sequence[str] = "deepseek-v2",
              api_keys: Sequence[str] = (), model_path: str | None = None) -> FastAPI:
    """The server around one AsyncLLMEngine, which the app's lifespan starts and shuts down.
    served_model_name: the name(s) clients may send as `model` (the first is reported);
    api_keys: bearer keys required on `/v1` routes (none: open)."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    metrics = ServerMetrics(names[0])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(title="DeepSeek-V2 OpenAI-compatible server", version=__version__, lifespan=lifespan)
    app.add_middleware(KeyAuth, api_keys=list(api_keys), metrics=metrics)
    app.state.engine, app.state.metrics = engine, metrics

    # ---- errors -----------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(APIError.from_validation(exc.errors()).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_internal_error(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        message = re.sub(r"0x[0-9a-fA-F]+", "0x...", f"internal error: {exc!r}")  # no addresses out
        return JSONResponse(error_body(500, message), 500)

    def llm():
        """The loaded LLMEngine (for its tokenizer and limits), or a 503."""
        if engine.is_dead:
            raise APIError(503, f"the engine is dead: {engine.error!r}", code="engine_dead")
        if engine.engine is None:
            raise APIError(503, "the model is still loading", code="not_ready", headers={"Retry-After": "5"})
        return engine.engine

    def check_model(model: str | None) -> None:
        if model is not None and model not in names:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {names[0]!r}",
                           param="model", code="model_not_found")

    def submit(body, prompt_ids: list[int], params, request_id: str) -> AsyncIterator:
        try:
            return engine.generate(prompt_ids, params, request_id)
        except InvalidRequestError as e:
            raise body.invalid(e) from None
        except EngineOverloadedError as e:
            raise APIError(503, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineDeadError as e:
            raise APIError(503, str(e), code="engine_dead") from None
        except EngineNotReadyError as e:
            raise APIError(503, str(e), code="not_ready", headers={"Retry-After": "5"}) from None

    def abort_all(request_ids: list[str]) -> None:
        for rid in request_ids:
            engine.abort(rid)

    async def serve(request: Request, body, reply_cls):
        check_model(body.model)
        core = llm()
        prompts = body.prompts(core.tokenizer)
        params = body.to_sampling_params()
        body.check_lengths(prompts, core.max_model_len)
        reply = reply_cls(body, names[0], core.tokenizer, prompts)
        rids = [f"{reply.id}-{i}" for i in range(len(prompts))]
        try:
            outputs = merge([submit(body, ids, params, rid) for (_, ids), rid in zip(prompts, rids)])
        except APIError:
            abort_all(rids)  # give back the places the earlier prompts took
            raise
        key = request.scope.get("state", {}).get("api_key_name", ANONYMOUS)
        if body.stream:
            return StreamingResponse(reply.stream(outputs, metrics, key), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(abort_all, rids))

        async def collect():
            try:
                return JSONResponse(await reply.collect(outputs, metrics, key))
            finally:
                abort_all(rids)

        return await until_disconnect(request, collect())

    # ---- OpenAI routes ----------------------------------------------------------------------------
    def model_card(name: str) -> R.ModelCard:
        return R.ModelCard(id=name, root=model_path or name, max_model_len=llm().max_model_len)

    @app.get("/v1/models")
    async def list_models() -> R.ModelList:
        return R.ModelList(data=[model_card(n) for n in names])

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> R.ModelCard:
        check_model(model)
        return model_card(model)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        return await serve(request, body, CompletionReply)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        return await serve(request, body, ChatReply)

    # ---- service routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine.is_ready:
            return {"status": "ok"}
        state = "dead" if engine.is_dead else "draining" if engine.draining else "loading"
        detail = f": {engine.error!r}" if engine.is_dead else ""
        return JSONResponse(error_body(503, f"the engine is {state}{detail}", code=state), 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        check_model(body.model)
        core = llm()
        tok = core.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        if body.messages is not None:
            ids = P.tokenize("messages", tok.apply_chat_template, P.conversation(body.messages),
                             add_generation_prompt=body.add_generation_prompt)
        else:
            ids = P.tokenize("prompt", tok.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        out = {"count": len(ids), "max_model_len": core.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = tok.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        check_model(body.model)
        core = llm()
        try:
            core.check_token_ids(body.tokens, "tokens")
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        return {"prompt": core.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        core = llm()
        tok = core.tokenizer
        return {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
                "model_max_length": core.max_model_len, "tokenizer_class": "PreTrainedTokenizerFast"}

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
