"""The error bodies: `APIError`, a request the server refuses, and what the client is told of it:
OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`, or Anthropic's on its Messages API
routes; a pydantic validation error as the 400 that names its field (FastAPI would answer 422)."""

from __future__ import annotations

import re

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               408: "invalid_request_error", 413: "invalid_request_error", 500: "internal_server_error",
               501: "not_implemented_error", 503: "service_unavailable_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error envelope: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
                         429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}


def anthropic_error(status: int, body: dict) -> dict:
    """An error body (error_body's) in Anthropic's envelope, {"type": "error", "error": {"type", "message",
    ...}}, for its Messages API routes; OpenAI's other fields are kept."""
    return {"type": "error", "error": {**body["error"], "type": ANTHROPIC_ERROR_TYPES.get(status, "api_error")}}


def scrubbed(message: str) -> str:
    """A message fit for a client: no memory addresses."""
    return re.sub(r"0x[0-9a-fA-F]+", "0x...", message)


class APIError(Exception):
    """A request the server refuses; becomes `error_body` with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    @classmethod
    def from_validation(cls, errors: list[dict]) -> APIError:
        """The first pydantic error as a 400 naming its field (FastAPI would answer 422)."""
        if not errors:
            return cls(400, "invalid request body")
        e = errors[0]
        if e.get("type") == "json_invalid":
            return cls(400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}",
                       code="invalid_json")
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if not loc:
            return cls(400, "the request body must be a JSON object", code="invalid_request")
        field = loc[0]
        if field == "prompt":  # a union: the per-member messages would only confuse
            return cls(400, "prompt must be a non-empty string, a list of strings, a list of token ids "
                            "or a list of lists of token ids", param="prompt", code="invalid_type")
        if field == "input":  # the Responses API's union
            return cls(400, "input must be a non-empty string or a non-empty list of items: messages ({role, content}), "
                            "function_call and function_call_output", param="input", code="invalid_type")
        # union members show up in the location ('str', 'list[TextPart]', 'ChatMessage', ...): keep the field
        # names (snake_case) and indices
        path = ".".join(x for x in loc if x.isdigit() or (x.isidentifier() and not x[0].isupper()
                                                            and x not in _TYPE_TAGS))
        return cls(400, f"{path}: {e['msg']}", param=field, code=e.get("type"))



_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic's names of builtin union members
