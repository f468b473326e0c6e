"""OpenAI-style errors: one exception type and the handlers that render every failure as
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("livelm.server")

_FIRST_WORD = re.compile(r"^([a-z_]+)\b")
_CONTEXT_WORDS = ("max_model_len", "context", "too long")
_TYPE_NAME = re.compile(r"^(str|int|float|bool|dict\[.*|list\[.*|function-.*|[A-Z]\w*)$")


class OpenAIError(Exception):
    """An error answered to the client with an HTTP status and an OpenAI-shaped body."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        """The JSON body OpenAI clients parse."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """``{"error": {...}}`` as OpenAI returns it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: OpenAIError) -> JSONResponse:
    """Render an :class:`OpenAIError` as a JSON response."""
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


def bad_request_from_value_error(
    exc: ValueError, param_names: dict[str, str], prompt_param: str
) -> OpenAIError:
    """Turn a ValueError from SamplingParams or the engine into a 400 naming the parameter.

    SamplingParams messages start with the offending field's name ("top_p must be ..."),
    mapped to the request field through ``param_names``; an engine message about the
    context length names the prompt (``prompt_param``) as OpenAI does.
    """
    message = str(exc)
    match = _FIRST_WORD.match(message)
    if match and match.group(1) in param_names:
        return OpenAIError(message, 400, param=param_names[match.group(1)])
    if any(word in message for word in _CONTEXT_WORDS):
        return OpenAIError(message, 400, param=prompt_param, code="context_length_exceeded")
    return OpenAIError(message, 400)


def _validation_param(loc: tuple) -> str | None:
    # FastAPI locations look like ("body", "temperature") or ("body", "messages", 0, "role").
    parts = [str(p) for p in loc if p != "body"]
    if not parts:
        return None
    # Union members show up in the path as type names ("str", "list[int]",
    # "TextContentPart"); field names are lower case, so drop the rest.
    parts = [p for p in parts if not _TYPE_NAME.match(p)]
    return ".".join(parts) if parts else None


def validation_error(errors: list) -> OpenAIError:
    """The 400 of a pydantic validation failure: the first error's field and message."""
    first = errors[0] if errors else {}
    # A value that fits none of a union's types fails once per member; a member's
    # complaint about the value itself (a lone surrogate, a bound) beats "not a str".
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), first)
    param = _validation_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid request"))
    if param:
        msg = f"{param}: {msg}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error(s))"
    return OpenAIError(msg, 400, param=param)


_REJECT_REASONS = {400: "invalid", 404: "unknown_model", 503: "queue_full"}


def install_error_handlers(app: FastAPI, on_reject: Callable[[str], None] | None = None) -> None:
    """Make validation failures 400s and every other failure an OpenAI-shaped body.

    ``on_reject(reason)`` is told of each request refused before reaching the engine.
    """

    def note(status: int) -> None:
        if on_reject is not None and status in _REJECT_REASONS:
            on_reject(_REJECT_REASONS[status])

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        note(exc.status_code)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        note(400)
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            err = OpenAIError(
                f"Request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}",
                400,
                code="invalid_json",
            )
            return error_response(err)
        return error_response(validation_error(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        note(exc.status_code)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = OpenAIError(str(exc.detail), exc.status_code, kind)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        err = OpenAIError(f"internal server error: {type(exc).__name__}", 500, "server_error")
        return error_response(err)
