"""The OpenAI-compatible HTTP server: `build_app(engine, ...)` returns a FastAPI app serving
`/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/v1/responses` and Anthropic's `/v1/messages`
(JSON or Server-Sent Events; the last two as chat completions: responses_api.py, anthropic_api.py), plus
`/health`, `/metrics`, `/tokenize`, `/detokenize`, `/tokenizer_info`, `/version` and the chat page at `/`.

Every bad request gets the OpenAI error body with a 4xx status and leaves the engine untouched;
a client that goes away aborts its requests; `/v1` routes need a bearer key when keys are set.
A request is checked in order of cost: the body's size (middleware.py), its shape and counts, the
length of its text, and only then is it tokenized, in a worker thread, so no request holds the
event loop (the other streams, `/health`) for longer than parsing its JSON takes.
How engine outputs become response bodies and stream chunks lives in `replies.py`.
(About 420 lines: the routes share the checks, the submission and the error mapping defined here,
and splitting the routes from them would scatter one request's path over files.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..beam_search import BeamSearch
from ..engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineNotReadyError, EngineOverloadedError
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import InvalidRequestError
from . import chat_protocol as C
from . import protocol as P
from . import responses as R
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, ServerMetrics
from .middleware import Accounting, BodyLimit, KeyAuth
from .errors import APIError, anthropic_error, error_body
from .replies import ENGINE_ERRORS, ChatReply, CompletionReply, engine_error
from .anthropic_api import CountTokensRequest, MessagesChatRequest, MessagesReply, MessagesRequest
from .responses_api import ResponsesChatRequest, ResponsesReply, ResponsesRequest

logger = logging.getLogger("deepseek_v2")
STATIC = Path(__file__).parent / "static"
CLIENT_CLOSED = 499  # nginx's status for a client that went away; only the metrics see it
REFUSALS = (EngineOverloadedError, EngineDeadError, EngineNotReadyError)


@dataclass(frozen=True)
class Limits:
    """What one request may ask, checked before any work (the serve command's flags)."""

    max_body_bytes: int = 8 * 2**20
    body_timeout: float = 30.0  # seconds for the whole body to arrive
    max_prompts: int = 2048  # prompts in one completions request
    max_choices: int = 2048  # prompts x n


ERRORS = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model",
          408: "the body came too slowly", 413: "the body is too large", 500: "internal error",
          503: "loading, overloaded, shutting down or dead"}


def errors(*statuses: int) -> dict:
    """The OpenAPI `responses` entries of these error statuses, each with the OpenAI error body."""
    return {s: {"model": R.ErrorResponse, "description": ERRORS[s]} for s in statuses}


def generation_responses(model: type, chunk: type) -> dict:
    """JSON, or Server-Sent Events described one event at a time (OpenAPI 3.2's `itemSchema`): each
    `data` is a chunk or an error body as JSON, and the last is `[DONE]`."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}}
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}
    return {200: {"model": model, "content": {"text/event-stream": {"itemSchema": event}}},
            **errors(400, 401, 404, 408, 413, 500, 503)}


def typed_event_responses(what: str) -> dict:
    """JSON, or Server-Sent Events of typed events (`event: <type>`, then `data: <json>`), as the
    Responses API and Anthropic's stream."""
    event = {"type": "object", "required": ["event", "data"],
             "properties": {"event": {"type": "string"},
                            "data": {"type": "string", "contentMediaType": "application/json"}}}
    return {200: {"description": f"{what}, or with stream=true its events as Server-Sent Events",
                  "content": {"application/json": {"schema": {"type": "object"}},
                              "text/event-stream": {"itemSchema": event}}},
            **errors(400, 401, 404, 408, 413, 500, 503)}


def exact_bounds(node):
    """The schema with integral float bounds (minimum, maximum) as integers."""
    if isinstance(node, dict):
        return {k: int(v) if k in ("minimum", "maximum") and isinstance(v, float) and v.is_integer()
                else exact_bounds(v) for k, v in node.items()}
    if isinstance(node, list):
        return [exact_bounds(v) for v in node]
    return node


async def merge(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as they come, tagged with the iterator's index. Stopping
    early cancels the pending reads, which aborts the engine requests behind them."""
    if len(iterators) == 1:  # one prompt, one sample (the usual request): no task per item
        it = iterators[0]
        try:
            async for item in it:
                yield 0, item
        finally:
            await it.aclose()  # stopping early closes it, which aborts its request
        return
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
    """Run a handler, cancelling it (and so aborting its requests) if the client disconnects first
    (vLLM's `with_cancellation`; once a stream has started, Starlette watches for this itself)."""
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
            await asyncio.wait({handler})  # let it unwind (abort, count) before looking at it
    if handler.cancelled():
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the metrics count it
    return handler.result()


def build_app(engine: AsyncLLMEngine, served_model_name: str | Sequence[str] = "deepseek-v2",
              api_keys: Sequence[str] = (), model_path: str | None = None, limits: Limits = Limits()) -> FastAPI:
    """The server around one AsyncLLMEngine, which the app's lifespan starts and shuts down.
    served_model_name: the name(s) clients may send as `model` (the first is reported);
    api_keys: bearer keys required on `/v1` routes (none: open); limits: what one request may ask."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    metrics = ServerMetrics(names[0])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(title="DeepSeek-V2 OpenAI-compatible server", version=__version__, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout)
    app.add_middleware(KeyAuth, api_keys=list(api_keys))
    app.add_middleware(Accounting, metrics=metrics, router=app.router)  # the last added is the outermost
    app.state.engine, app.state.metrics = engine, metrics

    def openapi() -> dict:
        """FastAPI's schema, made to tell the truth: this server answers 400 with the OpenAI error
        body where FastAPI documents a 422 with its own; integer bounds stay exact integers
        (FastAPI writes them as floats, and 2^63 - 2^16 printed as a float reads as a smaller
        number); `model` is one of the served names (others get 404)."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for request in ("CompletionRequest", "ChatCompletionRequest", "ResponsesRequest", "MessagesRequest",
                            "CountTokensRequest", "TokenizeRequest", "DetokenizeRequest"):
                components[request]["properties"]["model"]["anyOf"][0]["enum"] = names
            chunk = R.ChatCompletionChunk.model_json_schema(mode="serialization",
                                                            ref_template="#/components/schemas/{model}")
            components.update({**chunk.pop("$defs"), "ChatCompletionChunk": chunk})  # the stream's events
            app.openapi_schema = exact_bounds(schema)
        return app.openapi_schema

    app.openapi = openapi

    # ---- errors -----------------------------------------------------------------------------------
    def error_response(request: Request, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        """An error body, in Anthropic's envelope on its routes."""
        if request.url.path.startswith("/v1/messages"):
            body = anthropic_error(status, body)
        return JSONResponse(body, status, headers=headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(request, exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return error_response(request, 400, APIError.from_validation(exc.errors()).body())

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc.status_code, error_body(exc.status_code, str(exc.detail)), exc.headers)

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

    def check_counts(body, waiting_limit: int | None) -> None:
        """Prompts per request and prompts x n, against the limits and the waiting queue's size."""
        prompts = len(body.batch)
        if prompts > limits.max_prompts:
            raise APIError(400, f"the request has {prompts} prompts; at most {limits.max_prompts} are allowed",
                           param="prompt", code="too_many_prompts")
        choices, param = prompts * body.n, "n" if body.n > 1 else "prompt"
        if choices > limits.max_choices:
            raise APIError(400, f"the request asks for {choices} choices (prompts x n); at most "
                                f"{limits.max_choices} are allowed", param=param, code="too_many_choices")
        if waiting_limit is not None and choices > waiting_limit:  # it could never be accepted: not a 503
            raise APIError(400, f"the request asks for {choices} choices (prompts x n) but this server lets at "
                                f"most {waiting_limit} wait; send fewer prompts or a smaller n",
                           param=param, code="too_many_choices")

    async def off_loop(body, fn, *args):
        """fn(*args) in a worker thread (tokenizing, building big bodies), with the engine's request
        rules that it raises (e.g. a text too long for the context) as 400s naming the field."""
        try:
            return await asyncio.to_thread(fn, *args)
        except InvalidRequestError as e:
            raise body.invalid(e) from None

    def refusal(e: Exception) -> APIError:
        """The engine's refusal of a new request (one of REFUSALS), as the client's 503."""
        if isinstance(e, EngineOverloadedError):
            return APIError(503, str(e), code="queue_full", headers={"Retry-After": "1"})
        if isinstance(e, EngineDeadError):
            return APIError(503, str(e), code="engine_dead")
        return APIError(503, str(e), code="not_ready", headers={"Retry-After": "5"})

    def submit(body, prompt_ids: list[int], params, request_id: str, group: str) -> AsyncIterator:
        try:
            return engine.generate(prompt_ids, params, request_id, group=group)
        except InvalidRequestError as e:
            raise body.invalid(e) from None
        except REFUSALS as e:
            raise refusal(e) from None

    def abort_all(request_ids: list[str]) -> None:
        for rid in request_ids:
            engine.abort(rid)

    async def serve(request: Request, body, reply_cls):
        check_model(body.model)
        core = llm()
        check_counts(body, core.config.max_waiting_requests)
        params = body.to_sampling_params(core.tokenizer)
        # a prompt cut to its end (truncate_prompt_tokens) may be longer than the context before the cut
        check_chars = core.check_prompt_chars if params.truncate_prompt_tokens is None else lambda n, param: None
        try:
            body.check_chars(check_chars)  # before the text is tokenized
        except InvalidRequestError as e:
            raise body.invalid(e) from None
        prompts = await off_loop(body, body.prompts, core.tokenizer, check_chars)
        if params.bad_words:  # spelled in tokens here, not in the engine's thread
            await asyncio.to_thread(params.tokenize_bad_words, core.tokenizer)
        prompts = body.truncated(prompts, params, core.max_model_len)
        body.check_lengths(prompts, core.max_model_len)
        reply = await off_loop(body, reply_cls, body, names[0], core.tokenizer, prompts)
        if body.use_beam_search:
            beam = body.beam_search_params(params.max_tokens, prompts, core.max_model_len)
            finals = await beam_search(BeamSearch([ids for _, ids in prompts], beam, core.tokenizer.eos_token_id),
                                       body, reply.id, core.tokenizer)
            return JSONResponse(await asyncio.to_thread(reply.body_of, finals))
        rids = [f"{reply.id}-{i}" for i in range(len(prompts))]
        try:
            engine.check_room(len(prompts) * body.n)  # all the request's prompts are accepted, or none
        except EngineOverloadedError as e:
            raise refusal(e) from None
        try:
            outputs = merge([submit(body, ids, params, rid, reply.id) for (_, ids), rid in zip(prompts, rids)])
        except APIError:
            abort_all(rids)  # give back the places the earlier prompts took
            raise
        key = request.scope.get("state", {}).get("api_key_name", "anonymous")
        if body.stream:
            return StreamingResponse(reply.stream(outputs, metrics, key), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(abort_all, rids))
        try:
            return JSONResponse(await reply.collect(outputs, metrics, key))
        finally:
            abort_all(rids)

    async def beam_search(search: BeamSearch, body, group: str, tokenizer) -> list[RequestOutput]:
        """use_beam_search: `search` run on the engine, each step every live beam a request of one token
        (the prefix cache keeps the beams' shared tokens computed); then each prompt's best sequences as
        one RequestOutput of n outputs, best first."""
        async def last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
            final = None
            async for final in outputs:
                pass
            if final is None or not final.finished:
                raise APIError(503, "the request was aborted: the server is shutting down", code="aborted")
            return final

        while not search.done:
            batch = search.step_prompts()
            rids = [f"{group}-beam{search.steps}-{k}" for k in range(len(batch))]
            try:
                search.advance(await asyncio.gather(*(last(submit(body, ids, search.step_params, rid, group))
                                                      for ids, rid in zip(batch, rids))))
            except ENGINE_ERRORS as e:
                raise engine_error(e) from None
            finally:
                abort_all(rids)
        results = search.results(lambda tokens: tokenizer.decode(tokens, skip_special_tokens=body.skip_special_tokens))
        return [RequestOutput(group, None, prompt, finished=True, outputs=[
            CompletionOutput(k, s.text, s.tokens[len(prompt):], s.cum_logprob, finish_reason="stop" if s.finished
                             else "length") for k, s in enumerate(result.sequences)])
            for prompt, result in zip(search.prompts, results)]

    # ---- OpenAI routes ----------------------------------------------------------------------------
    def model_card(name: str) -> R.ModelCard:
        return R.ModelCard(id=name, root=model_path or name, max_model_len=llm().max_model_len)

    @app.get("/v1/models", responses=errors(401, 503))
    async def list_models() -> R.ModelList:
        return R.ModelList(data=[model_card(n) for n in names])

    @app.get("/v1/models/{model:path}", responses=errors(401, 404, 503))
    async def get_model(model: str) -> R.ModelCard:
        check_model(model)
        return model_card(model)

    @app.post("/v1/completions", response_model=None,
              responses=generation_responses(R.CompletionResponse, R.CompletionResponse))
    async def completions(body: P.CompletionRequest, request: Request):
        return await until_disconnect(request, serve(request, body, CompletionReply))

    @app.post("/v1/chat/completions", response_model=None,
              responses=generation_responses(R.ChatCompletionResponse, R.ChatCompletionChunk))
    async def chat_completions(body: C.ChatCompletionRequest, request: Request):
        return await until_disconnect(request, serve(request, body, ChatReply))

    async def serve_as_chat(request: Request, body, chat_cls: type[C.TranslatedChatRequest], reply_cls):
        """Another API's request served as the chat completion it means (body.to_chat()), its refusals
        naming that API's fields."""
        check_model(body.model)
        try:
            return await until_disconnect(request, serve(request, body.to_chat(), partial(reply_cls, request=body)))
        except APIError as e:
            raise chat_cls.renamed(e) from None

    @app.post("/v1/responses", response_model=None, responses=typed_event_responses("a Response object"))
    async def create_response(body: ResponsesRequest, request: Request):
        return await serve_as_chat(request, body, ResponsesChatRequest, ResponsesReply)

    @app.get("/v1/responses/{response_id}", responses=errors(401, 404))
    async def get_response(response_id: str):
        raise APIError(404, f"there is no response {response_id[:100]!r}: this server stores no responses",
                       param="response_id", code="not_found")

    @app.post("/v1/messages", response_model=None, responses=typed_event_responses("a Message"))
    async def create_message(body: MessagesRequest, request: Request):
        return await serve_as_chat(request, body, MessagesChatRequest, MessagesReply)

    @app.post("/v1/messages/count_tokens", responses=errors(400, 401, 404, 503))
    async def count_message_tokens(body: CountTokensRequest) -> dict:
        check_model(body.model)
        core = llm()
        chat = body.to_chat()
        chat.to_sampling_params(core.tokenizer)  # the same refusals as the request itself
        try:
            [(_, ids)] = await off_loop(chat, chat.prompts, core.tokenizer, core.check_prompt_chars)
        except APIError as e:
            raise MessagesChatRequest.renamed(e) from None
        return {"input_tokens": len(ids)}

    # ---- service routes ---------------------------------------------------------------------------
    @app.get("/health", responses=errors(503))
    async def health() -> R.HealthResponse:
        if engine.is_ready:
            return R.HealthResponse()
        state = "dead" if engine.is_dead else "draining" if engine.draining else "loading"
        detail = f": {engine.error!r}" if engine.is_dead else ""
        return JSONResponse(error_body(503, f"the engine is {state}{detail}", code=state), 503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format 0.0.4"}})
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(engine.stats()), media_type=METRICS_CONTENT_TYPE)

    @app.get("/version")
    async def version() -> R.VersionResponse:
        return R.VersionResponse(version=__version__)

    @app.post("/tokenize", response_model_exclude_none=True, responses=errors(400, 404, 408, 413, 503))
    async def tokenize(body: C.TokenizeRequest) -> R.TokenizeResponse:
        check_model(body.model)
        core = llm()
        tok = core.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        try:  # a text that cannot fit the context is refused before it is tokenized (this route needs no key)
            if body.messages is not None:
                core.check_prompt_chars(sum(len(m.text()) for m in body.messages), "messages")
                ids = await asyncio.to_thread(C.encode_chat, tok, core.check_prompt_chars, body, body.tool_dicts(tok))
            else:
                core.check_prompt_chars(len(body.prompt), "prompt")
                ids = await asyncio.to_thread(P.tokenize, "prompt", tok.encode, body.prompt,
                                              add_special_tokens=body.add_special_tokens)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=e.param, code="context_length_exceeded") from None
        strs = await asyncio.to_thread(tok.convert_ids_to_tokens, ids) if body.return_token_strs else None
        return R.TokenizeResponse(count=len(ids), max_model_len=core.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize", responses=errors(400, 404, 408, 413, 503))
    async def detokenize(body: P.DetokenizeRequest) -> R.DetokenizeResponse:
        check_model(body.model)
        core = llm()

        def decode() -> str:
            core.check_token_ids(body.tokens, "tokens")
            return core.tokenizer.decode(body.tokens)

        try:
            return R.DetokenizeResponse(prompt=await asyncio.to_thread(decode))
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None

    @app.get("/tokenizer_info", responses=errors(503))
    async def tokenizer_info() -> R.TokenizerInfo:
        core = llm()
        tok = core.tokenizer
        return R.TokenizerInfo(bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token,
                               model_max_length=core.max_model_len)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # browsers ask for it; an SVG under that name is shown by every current one
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    return app
