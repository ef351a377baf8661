"""The ASGI middleware around the app, outermost first. Pure ASGI (no BaseHTTPMiddleware), so
streaming and disconnects pass through.

- `Accounting` counts every response in the metrics by API key name, route and status, and answers
  an exception that escaped the app with a 500 in the OpenAI error body (so no response, the
  framework's own error page included, goes out uncounted or in another shape);
- `KeyAuth` checks the bearer key on `/v1` routes in constant time and names the key for accounting;
- `BodyLimit` reads a request's body before the app sees it: 413 past `max_bytes` (keeping none of
  it), 408 when the whole body has not arrived within `timeout` seconds, so a client that sends half
  a body and waits holds nothing for long.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Sequence

from fastapi.responses import JSONResponse
from starlette.routing import Match, Router

from .metrics import ServerMetrics
from .errors import anthropic_error, error_body, scrubbed

logger = logging.getLogger("deepseek_v2")
ANONYMOUS, UNAUTHORIZED = "anonymous", "unauthorized"


class Accounting:
    def __init__(self, app, metrics: ServerMetrics, router: Router):
        self.app, self.metrics, self.router = app, metrics, router

    def handler(self, scope) -> str:
        """The route's path template (a bounded set of label values), or "other" (404s)."""
        for route in self.router.routes:
            if route.matches(scope)[0] is not Match.NONE:
                return getattr(route, "path", "other")
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                key = scope.get("state", {}).get("api_key_name", ANONYMOUS)
                self.metrics.observe_http(key, self.handler(scope), message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception as e:  # noqa: BLE001 - the last place an error can become a response
            logger.exception("internal error on %s %s", scope["method"], scope["path"])
            if not started:
                response = JSONResponse(error_body(500, scrubbed(f"internal error: {e!r}")), 500)
                await response(scope, receive, counting_send)


class KeyAuth:
    def __init__(self, app, api_keys: Sequence[str]):
        self.app = app
        self.keys = [(f"key-{i + 1}", hashlib.sha256(k.encode()).digest()) for i, k in enumerate(api_keys)]

    def key_name(self, headers: dict[bytes, bytes]) -> str | None:
        """The name of the key sent as `Authorization: Bearer <key>`, or as Anthropic's `x-api-key: <key>`."""
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            token = headers.get(b"x-api-key", b"").decode("latin-1")
        digest = hashlib.sha256(token.strip().encode("latin-1")).digest()
        found = None
        for name, key_digest in self.keys:  # no early exit: the time does not depend on which key matched
            if secrets.compare_digest(digest, key_digest):
                found = name
        return found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        if self.keys and scope["method"] != "OPTIONS":
            name = self.key_name(dict(scope["headers"]))
            if name is None:
                state["api_key_name"] = UNAUTHORIZED
                body = error_body(401, "invalid or missing API key: send 'Authorization: Bearer <key>' "
                                       "(or 'x-api-key: <key>')", code="invalid_api_key")
                if scope["path"].startswith("/v1/messages"):
                    body = anthropic_error(401, body)
                return await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            state["api_key_name"] = name
        else:
            state["api_key_name"] = ANONYMOUS
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    def refusal(self, status: int) -> JSONResponse:
        message = (f"the request body is larger than {self.max_bytes} bytes" if status == 413
                   else f"the request body did not arrive within {self.timeout:g} s")
        code = "request_too_large" if status == 413 else "request_timeout"
        return JSONResponse(error_body(status, message, code=code), status, headers={"Connection": "close"})

    async def read(self, receive) -> bytes | None:
        """The whole body; None if it is larger than max_bytes. A body too large is still read to its
        end (and dropped), as an HTTP server must: a client sends all of it before it reads the
        answer, and closing the connection under it would reset it before the 413 is read."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionResetError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_bytes:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks) if size <= self.max_bytes else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        too_large = length.isdigit() and int(length) > self.max_bytes
        if too_large and headers.get(b"expect", b"").lower() == b"100-continue":
            return await self.refusal(413)(scope, receive, send)  # the client waits for a go-ahead to send it
        try:
            body = await asyncio.wait_for(self.read(receive), self.timeout)
        except asyncio.TimeoutError:
            return await self.refusal(413 if too_large else 408)(scope, receive, send)
        except ConnectionResetError:
            return  # the client went away: nobody to answer
        if body is None:
            return await self.refusal(413)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # from here on only the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
