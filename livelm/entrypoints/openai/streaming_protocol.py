"""Streaming input over HTTP, the part both transports share: request models, opening a
session, feeding it and preparing a reply, each failure an :class:`OpenAIError` whose
status and ``code`` the REST routes answer and the WebSocket turns into an error event.

A *session* here is an :class:`~livelm.engine.input_stream.InputStream` (the engine's
streamed prompt); its id is the stream's id, so ``GET``/``DELETE /v1/sessions/{id}`` find a
stream whichever transport opened it.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, StrictInt, ValidationError

from livelm.core.kv_policy import FULL, KVPolicy, parse_kv_policy
from livelm.engine.input_stream import InputStream, StreamClosedError
from livelm.entrypoints.openai.errors import (
    OpenAIError,
    bad_request_from_value_error,
    validation_error,
)
from livelm.entrypoints.openai.protocol import (
    Bool,
    Int,
    OpenAIModel,
    SamplingRequest,
    StructuredFields,
    Text,
    random_id,
)
from livelm.entrypoints.openai.sampling import constraint_param, stream_reply_sampling_params
from livelm.entrypoints.openai.state import ServerState
from livelm.sampling_params import SamplingParams

_POLICY_PARAMS = {"kv_policy": "kv_policy", "num_sink_tokens": "num_sink_tokens", "kv_window": "kv_window"}
# Session ids travel in URLs: keep them to characters that need no escaping, and not "."
# or ".." (clients resolve those path segments away, so the session could not be named).
_SESSION_ID = re.compile(r"^(?!\.\.?$)[A-Za-z0-9._:-]{1,128}$")


class SessionOpenRequest(OpenAIModel):
    """``POST /v1/sessions`` and the WebSocket ``open`` event."""

    session_id: Text | None = None  # default: a random id (ids are not secrets, but unguessable)
    cache_salt: Text | None = None  # sessions with different salts never share KV
    # "sinks": the session keeps its first num_sink_tokens and a rolling kv_window and runs
    # without end (docs/attention_sinks.md); default "full".
    kv_policy: Literal["full", "sinks"] | None = None
    num_sink_tokens: StrictInt | None = None  # strict: "32" or 32.0 is a 400, not a window
    kv_window: StrictInt | None = None

    def policy(self) -> KVPolicy:
        """The session's KV policy (400 naming the field when malformed)."""
        try:
            return parse_kv_policy(self.kv_policy, self.num_sink_tokens, self.kv_window)
        except ValueError as exc:
            raise bad_request_from_value_error(exc, _POLICY_PARAMS, "kv_window") from exc


class SessionInputRequest(OpenAIModel):
    """``POST /v1/sessions/{id}/input``: at most one of ``text``, ``tokens`` or ``bytes``
    (base64 of UTF-8 bytes; a piece may end inside a character), then ``close`` optionally."""

    text: Text | None = None
    tokens: list[Int] | None = None
    bytes: Text | None = None
    mode: Literal["append", "replace"] = "append"
    close: Bool = False


class SessionGenerateRequest(StructuredFields, SamplingRequest):
    """A reply to the session's input as it is now: ``/v1/completions``' sampling and
    output-constraint fields, plus ``suffix`` (text or token ids added after the input for
    this reply only)."""

    suffix: Text | list[Int] | None = None
    logprobs: Int | None = Field(default=None, ge=0)
    echo: Bool = False
    id: Text | None = None  # WebSocket: names the reply in its delta/done events


def open_session(state: ServerState, session_id: str | None, cache_salt: str | None,
                 kv_policy: KVPolicy = FULL) -> InputStream:
    """Open an input stream: 409 if the id is taken, 429 past ``max_input_streams``, 400 for
    a ``kv_policy`` the engine cannot serve."""
    engine = state.engine
    if not hasattr(engine, "open_stream"):
        raise OpenAIError("this engine does not take streamed input", 501, "server_error")
    if session_id is not None and not _SESSION_ID.match(session_id):
        raise OpenAIError("session_id must be 1-128 characters of A-Z a-z 0-9 . _ : - (not . or ..)", 400,
                          param="session_id")
    sid = session_id or random_id("sess")
    if engine.get_stream(sid) is not None:
        raise OpenAIError(f"session {sid!r} is already open", 409, param="session_id",
                          code="session_exists")
    limit = engine.config.max_input_streams
    if engine.num_input_streams >= limit:
        raise _too_many(f"too many open input sessions ({limit}, the server's "
                        "--max-input-streams): close one first")
    try:
        return engine.open_stream(sid, cache_salt, kv_policy) if kv_policy.is_sinks else engine.open_stream(sid, cache_salt)
    except RuntimeError as exc:  # shutting down
        raise OpenAIError(str(exc), 503, "server_error") from exc
    except ValueError as exc:
        if "too many" in str(exc):
            raise _too_many(str(exc)) from exc
        if kv_policy.is_sinks and str(exc).split(" ", 1)[0] in _POLICY_PARAMS:
            raise bad_request_from_value_error(exc, _POLICY_PARAMS, "kv_window") from exc
        raise OpenAIError(str(exc), 400, param="session_id") from exc


def _too_many(message: str) -> OpenAIError:
    return OpenAIError(message, 429, "rate_limit_error", code="too_many_sessions")


def find_session(state: ServerState, session_id: str) -> InputStream:
    """The open stream with that id, or 404 (unknown, closed or expired)."""
    get = getattr(state.engine, "get_stream", None)
    stream = get(session_id) if get is not None else None
    if stream is None or stream.closed:
        raise OpenAIError(f"no open input session {session_id!r} (unknown, closed or idle too long)",
                          404, "not_found_error", code="session_not_found")
    return stream


def decode_bytes(data: str, param: str = "bytes") -> bytes:
    """Base64 (standard alphabet) to bytes, or 400."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise OpenAIError(f"{param} must be base64: {exc}", 400, param=param) from exc


def feed(state: ServerState, stream: InputStream, *, text: str | None = None,
         tokens: list[int] | None = None, data: bytes | None = None,
         mode: str = "append", close: bool = False) -> None:
    """Append or replace (``mode``) one piece of input, then close the input if asked.

    Errors: 400 for malformed or too long input, 409 once the input (or session) is
    closed, 429 when the piece would leave more than ``max_stream_pending_tokens`` input
    tokens waiting to be prefilled (send smaller pieces, or retry once the state shows the
    engine caught up).
    """
    pieces = [(name, v) for name, v in (("text", text), ("tokens", tokens), ("bytes", data))
              if v is not None]
    if len(pieces) > 1:
        raise OpenAIError("give at most one of text, tokens or bytes", 400, param=pieces[1][0])
    if not pieces and not close:
        raise OpenAIError("give text, tokens or bytes (or close: true)", 400, param="text")
    if mode not in ("append", "replace"):
        raise OpenAIError("mode must be 'append' or 'replace'", 400, param="mode")
    if stream.closed:
        raise _closed(stream)
    param = pieces[0][0] if pieces else "close"
    if pieces:
        if stream.input_closed:
            raise OpenAIError(f"the input of session {stream.stream_id!r} is closed: no more "
                              "input can be added", 409, param=param, code="input_closed")
        if mode == "replace" and data is not None:
            raise OpenAIError("replace takes text or tokens, not bytes", 400, param="bytes")
        if tokens is not None:
            state.check_token_ids(tokens, "tokens")
    try:
        if pieces:
            value = pieces[0][1]
            if mode == "append":
                stream.append(value)
            else:
                stream.replace(value)
        if close:
            stream.close_input()
    except StreamClosedError as exc:
        raise _closed(stream) from exc
    except ValueError as exc:
        if "max_stream_pending_tokens" in str(exc):
            raise _pending_error(str(exc)) from exc
        raise bad_request_from_value_error(exc, {}, param) from exc


def _closed(stream: InputStream) -> OpenAIError:
    return OpenAIError(f"session {stream.stream_id!r} is closed ({stream.closed_reason})", 409,
                       code="session_closed")


def _pending_error(message: str) -> OpenAIError:
    return OpenAIError(message, 429, "rate_limit_error", code="pending_input_limit",
                       headers={"Retry-After": "1"})


@dataclass
class PreparedReply:
    """A validated reply: its sampling parameters and the prompt size it will have."""

    params: SamplingParams
    suffix: str | list[int] | None
    prompt_ids: list[int]  # the input as it is now, then the suffix


async def prepare_reply(state: ServerState, stream: InputStream,
                        req: SessionGenerateRequest) -> PreparedReply:
    """Validate a generate request against the session as it is now (400 when the input is
    empty, the reply would not fit the context or its output constraint does not
    compile)."""
    state.check_model(req.model)
    params = stream_reply_sampling_params(req)
    state.check_params(params)
    await state.check_structured(params, constraint_param(req))
    if stream.closed:
        raise _closed(stream)
    if isinstance(req.suffix, list):
        state.check_token_ids(req.suffix, "suffix")
    try:
        ids = stream.prompt_ids(req.suffix or None)
    except ValueError as exc:
        raise OpenAIError(str(exc), 400, param="suffix") from exc
    if not ids:
        raise OpenAIError("the session has no input yet: append some before generating", 400,
                          code="empty_input")
    state.check_context(len(ids), params.max_tokens, "prompt", rolling=stream.kv_policy.is_sinks)
    return PreparedReply(params, req.suffix or None, ids)


def parse_model(model: type[OpenAIModel], data: Any) -> Any:
    """Validate ``data`` as ``model`` outside FastAPI's request parsing (WebSocket events),
    with the same 400 message shape the REST routes give."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
