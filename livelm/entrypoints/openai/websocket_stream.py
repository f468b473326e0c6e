"""``/v1/stream``: one WebSocket carries one input session both ways.

The client sends JSON events (``open``, ``append``, ``replace``, ``close_input``,
``generate``, ``cancel``, ``close``; a binary frame appends raw UTF-8 bytes); the server
answers ``session``, ``state`` (after each input event and as prefill progresses),
``delta`` and ``done`` per reply, and ``error``. Several replies may run at once while
input keeps arriving. When the socket drops, the session is closed, which aborts its
replies and frees its KV. The protocol is documented in docs/streaming_input.md.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse

from livelm.core.kv_policy import FULL, KVPolicy
from livelm.engine.input_stream import InputStream
from livelm.entrypoints.openai.auth import invalid_api_key, key_matches
from livelm.entrypoints.openai.errors import OpenAIError
from livelm.entrypoints.openai.logprobs import append_completion_logprobs
from livelm.entrypoints.openai.protocol import CompletionLogprobs, random_id
from livelm.entrypoints.openai.request_tracker import RequestTracker
from livelm.entrypoints.openai.state import ServerState
from livelm.entrypoints.openai.streaming_protocol import (
    PreparedReply,
    SessionGenerateRequest,
    SessionInputRequest,
    SessionOpenRequest,
    decode_bytes,
    feed,
    open_session,
    parse_model,
    prepare_reply,
)

logger = logging.getLogger("livelm.server")

# Prefill progress is reported at most this often (a long input advances every step).
STATE_INTERVAL_S = 0.05
ROUTE = "/v1/stream"
_EVENTS = ("open", "append", "replace", "close_input", "generate", "cancel", "close")


class _Stop(Exception):
    """Leave the read loop: the client closed the session."""


@dataclass
class _Reply:
    """One generation in flight on the socket."""

    id: str  # the client's name for it (``generate``'s ``id``)
    engine_id: str
    prepared: PreparedReply
    started: bool = False
    cancelled: bool = False
    task: asyncio.Task | None = field(default=None, repr=False)


class StreamSocket:
    """The server side of one ``/v1/stream`` connection."""

    def __init__(self, ws: WebSocket, state: ServerState) -> None:
        self.ws = ws
        self.state = state
        self.stream: InputStream | None = None
        self.replies: dict[str, _Reply] = {}
        self._reply_numbers = itertools.count()
        self._send_lock = asyncio.Lock()
        self._gone = False  # the socket can no longer be written to
        self._closing = False  # we are closing the session ourselves
        self._last_state: dict | None = None
        self._pump: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    async def serve(self) -> None:
        """Authenticate, then read events until the client leaves; free everything after."""
        if not self._authorized():
            await self._deny()
            return
        await self.ws.accept()
        metrics = self.state.metrics
        metrics.websockets.inc()
        try:
            await self._read_loop()
        except Exception:  # a bug must not leak the session: log it, then clean up
            logger.exception("WebSocket %s failed", ROUTE)
        finally:
            await self._release()
            metrics.websockets.dec()

    def _authorized(self) -> bool:
        key = self.state.config.api_key
        if not key:
            return True
        return key_matches(key, self.ws.headers.get("authorization", "").encode(),
                           self.ws.query_params.get("api_key", ""))

    async def _deny(self) -> None:
        self.state.metrics.rejected.labels("unauthorized").inc()
        err = invalid_api_key(" or the query parameter ?api_key=<key>")
        if "websocket.http.response" in self.ws.scope.get("extensions", {}):
            await self.ws.send_denial_response(JSONResponse(err.body(), status_code=401))
        else:  # servers without the denial extension: refuse the handshake (403)
            await self.ws.close(code=1008, reason="invalid API key")

    async def _release(self) -> None:
        """Cancel the replies, close the session (frees its KV), stop the state pump."""
        self._closing = True
        self._gone = True
        tasks = [r.task for r in self.replies.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.stream is not None:
            await self.stream.close()
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)

    # -------------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        limit = self.state.config.max_body_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text, data = message.get("text"), message.get("bytes")
            reply_id = None
            try:
                size = len(data) if data is not None else len((text or "").encode())
                if size > limit:
                    raise OpenAIError(f"message of {size} bytes exceeds the limit of {limit} "
                                      "bytes (--max-body-bytes)", 413, code="message_too_large")
                if data is not None:
                    await self._on_input({"type": "append"}, raw=data)
                    continue
                event = _parse_event(text or "")
                reply_id = event.get("id") if isinstance(event.get("id"), str) else None
                await self._on_event(event)
            except OpenAIError as err:
                await self._send_error(err, reply_id)
            except _Stop:
                return

    async def _on_event(self, event: dict) -> None:
        kind = event["type"]
        if kind == "open":
            if self.stream is not None:
                raise OpenAIError("this socket's session is already open (one per socket)",
                                  409, code="already_open")
            req = parse_model(SessionOpenRequest, _fields(event))
            await self._open(req.session_id, req.cache_salt, req.policy())
        elif kind in ("append", "replace", "close_input"):
            await self._on_input(event)
        elif kind == "generate":
            await self._on_generate(event)
        elif kind == "cancel":
            self._on_cancel(event.get("id"))
        else:  # close
            self._closing = True
            if self.stream is not None:
                await self.stream.close()
                await self._send_state(self.stream.state().as_dict())
            await self._close_socket(1000, "session closed")
            raise _Stop

    async def _open(self, session_id: str | None, cache_salt: str | None,
                    kv_policy: KVPolicy = FULL) -> InputStream:
        stream = open_session(self.state, session_id, cache_salt, kv_policy)
        self.stream = stream
        await self._send({"type": "session", "session_id": stream.stream_id})
        await self._send_state(stream.state().as_dict())
        self._pump = asyncio.create_task(self._pump_state(stream))
        return stream

    async def _session(self) -> InputStream:
        """The socket's session, opened with defaults by the first event that needs one."""
        if self.stream is None:
            return await self._open(None, None)
        return self.stream

    async def _on_input(self, event: dict, raw: bytes | None = None) -> None:
        stream = await self._session()
        kind = event["type"]
        if kind == "close_input":
            feed(self.state, stream, close=True)
        elif raw is not None:
            feed(self.state, stream, data=raw)
        else:
            req = parse_model(SessionInputRequest, _fields(event, "mode"))
            data = decode_bytes(req.bytes) if req.bytes is not None else None
            feed(self.state, stream, text=req.text, tokens=req.tokens, data=data, mode=kind,
                 close=req.close)
        await self._send_state(stream.state().as_dict())

    async def _on_generate(self, event: dict) -> None:
        stream = await self._session()
        req = parse_model(SessionGenerateRequest, _fields(event, "stream", "stream_options"))
        if req.n != 1:
            raise OpenAIError("n must be 1 on /v1/stream (send several generate events for "
                              "several replies)", 400, param="n")
        reply_id = req.id or f"reply-{next(self._reply_numbers)}"
        if reply_id in self.replies:
            raise OpenAIError(f"reply {reply_id!r} is still running", 409, param="id",
                              code="reply_exists")
        prepared = await prepare_reply(self.state, stream, req)
        ticket = self.state.admission.admit(1)
        reply = _Reply(reply_id, random_id("sgen"), prepared)
        self.replies[reply_id] = reply
        reply.task = asyncio.create_task(self._run_reply(stream, reply, req, ticket))
        # Let the reply take its prompt now: the events read after this one (already
        # queued, so reading them would not yield) must not become part of it.
        while not reply.started and not reply.task.done():
            await asyncio.sleep(0)

    def _on_cancel(self, reply_id: Any) -> None:
        if reply_id is not None and reply_id not in self.replies:
            raise OpenAIError(f"no reply {reply_id!r} is running", 404, "not_found_error",
                              param="id", code="reply_not_found")
        targets = [self.replies[reply_id]] if reply_id is not None else list(self.replies.values())
        for reply in targets:
            reply.cancelled = True
            if reply.started:
                # Its request reached the engine: the abort ends it with a final delta
                # (finish_reason "abort"), which the reply task reports as usual.
                self.state.engine.abort(reply.engine_id)

    # -------------------------------------------------------------------- replies

    async def _run_reply(self, stream: InputStream, reply: _Reply, req: SessionGenerateRequest,
                         ticket: Any) -> None:
        """Stream one reply's deltas, then its done event (or an error event)."""
        params = reply.prepared.params
        tracker = RequestTracker(self.state.metrics, reply.engine_id, ROUTE, self.state.model_name,
                                 True, 1)
        tracker.prompt_tokens = len(reply.prepared.prompt_ids)
        finish, status, error = "abort", 499, "client disconnected"
        completion_tokens, offset = 0, 0
        try:
            if not reply.cancelled:
                # Set just before the generator runs, which fixes the reply's prompt before
                # it first waits (see _on_generate).
                reply.started = True
                async for out in stream.generate(params, suffix=reply.prepared.suffix,
                                                 request_id=reply.engine_id):
                    if tracker.first_token_at is None:
                        await self._send_state_if_changed(stream)  # num_generations grew
                    tracker.prompt_tokens = len(out.prompt_token_ids)
                    for delta in out.outputs:
                        completion_tokens += len(delta.token_ids)
                        tracker.on_tokens(len(delta.token_ids))
                        if delta.finish_reason is not None:
                            finish = delta.finish_reason
                        if not delta.text and not delta.token_ids:
                            continue
                        event = {"type": "delta", "id": reply.id, "text": delta.text,
                                 "token_ids": list(delta.token_ids)}
                        if req.logprobs is not None and delta.logprobs:
                            lp = CompletionLogprobs()
                            offset = append_completion_logprobs(
                                lp, delta.token_ids, list(delta.logprobs), req.logprobs,
                                self.state.token_text, offset)
                            event["logprobs"] = lp.model_dump()
                        await self._send(event)
            status, error = 200, None
            if finish == "abort":
                status, error = 499, "cancelled by the client"
        except ValueError as exc:  # the engine refused it (e.g. the session closed meanwhile)
            finish, status, error = "error", 400, str(exc)
            await self._send_error(OpenAIError(str(exc), 400), reply.id)
        except Exception as exc:  # noqa: BLE001 (reported in-band, the socket stays up)
            logger.exception("reply %s failed", reply.engine_id)
            finish, status, error = "error", 500, f"{type(exc).__name__}: {exc}"
            await self._send_error(OpenAIError(f"generation failed: {error}", 500,
                                               "server_error"), reply.id)
        finally:
            ticket.release()
            tracker.finish(finish, status, error)
            self.replies.pop(reply.id, None)
        if finish != "error":
            prompt = tracker.prompt_tokens
            await self._send({
                "type": "done", "id": reply.id, "finish_reason": finish,
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                          "total_tokens": prompt + completion_tokens},
            })
        await self._send_state_if_changed(stream)

    # -------------------------------------------------------------------- writing

    async def _pump_state(self, stream: InputStream) -> None:
        """Send a state event whenever prefill advances (throttled); when the engine closes
        the session (idle timeout, shutdown), say why and close the socket."""
        while not stream.closed:
            current = stream.state().as_dict()
            if current != self._last_state:
                await self._send_state(current)
                await asyncio.sleep(STATE_INTERVAL_S)
                continue
            # No await between the checks above and wait_progress's clearing of the
            # event, so no progress report can slip through unseen.
            await stream.wait_progress()
        if self._closing:
            return
        await self._send_state(stream.state().as_dict())
        await self._send_error(OpenAIError(f"session closed: {stream.closed_reason}", 410,
                                           code="session_closed"))
        await self._close_socket(1000, "session closed")

    async def _send_state_if_changed(self, stream: InputStream) -> None:
        # Replies starting and ending change the state without any prefill progress.
        if not stream.closed and stream.state().as_dict() != self._last_state:
            await self._send_state(stream.state().as_dict())

    async def _send_state(self, state: dict) -> None:
        self._last_state = state
        await self._send({"type": "state", **state})

    async def _send_error(self, err: OpenAIError, reply_id: str | None = None) -> None:
        event: dict[str, Any] = {"type": "error", "code": err.code or err.type,
                                 "message": err.message, "status": err.status_code}
        if err.param:
            event["param"] = err.param
        if reply_id is not None:
            event["id"] = reply_id
        await self._send(event)

    async def _send(self, event: dict) -> None:
        # One writer at a time; a slow client slows its own replies, nothing else.
        if self._gone:
            return
        async with self._send_lock:
            try:
                await self.ws.send_text(json.dumps(event, ensure_ascii=False))
            except Exception:  # the client went away: the read loop sees the disconnect
                self._gone = True

    async def _close_socket(self, code: int, reason: str) -> None:
        if self._gone:
            return
        async with self._send_lock:
            self._gone = True
            try:
                await self.ws.close(code=code, reason=reason[:120])
            except Exception:  # already closed
                pass


def _parse_event(text: str) -> dict:
    try:
        event = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OpenAIError(f"event is not valid JSON: {exc}", 400, code="invalid_json") from exc
    if not isinstance(event, dict):
        raise OpenAIError("an event must be a JSON object with a \"type\"", 400,
                          code="invalid_event")
    if event.get("type") not in _EVENTS:
        raise OpenAIError(f"unknown event type {event.get('type')!r}; expected one of "
                          f"{', '.join(_EVENTS)}", 400, param="type", code="unknown_event")
    return event


def _fields(event: dict, *drop: str) -> dict:
    """An event's fields for its request model (``type`` and ``drop`` left out)."""
    return {k: v for k, v in event.items() if k != "type" and k not in drop}


def add_websocket_route(app: FastAPI, state: ServerState) -> None:
    """Register ``/v1/stream``."""

    @app.websocket(ROUTE)
    async def stream_socket(ws: WebSocket) -> None:
        await StreamSocket(ws, state).serve()
