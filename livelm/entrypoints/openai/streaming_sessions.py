"""Streaming input over plain HTTP, for clients without WebSocket: a session is opened,
fed and replied to by separate requests (``/v1/sessions``; see docs/streaming_input.md).

``POST /v1/sessions/{id}/generate`` answers exactly like ``/v1/completions`` (a
``text_completion`` object, or with ``"stream": true`` its SSE chunks ending in
``data: [DONE]``), so OpenAI-style clients parse it unchanged.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from livelm.engine.input_stream import InputStream
from livelm.entrypoints.openai.generation import EngineStream
from livelm.entrypoints.openai.protocol import random_id
from livelm.entrypoints.openai.request_tracker import RequestTracker
from livelm.entrypoints.openai.serving_completions import respond_completion
from livelm.entrypoints.openai.state import ServerState
from livelm.entrypoints.openai.streaming_protocol import (
    SessionGenerateRequest,
    SessionInputRequest,
    SessionOpenRequest,
    decode_bytes,
    feed,
    find_session,
    open_session,
    prepare_reply,
)
from livelm.sampling_params import SamplingParams


class StreamReply(EngineStream):
    """One reply to an input session, as an :class:`EngineStream` (closing it unfinished
    aborts the engine request), so the completions response code serves it."""

    def __init__(self, engine: Any, stream: InputStream, params: SamplingParams,
                 suffix: str | list[int] | None, request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        self._gen = stream.generate(params, suffix=suffix, request_id=request_id)
        self.finished = False


def add_session_routes(app: FastAPI, state: ServerState) -> None:
    """``POST /v1/sessions``, ``GET /v1/sessions/{id}``, ``POST /v1/sessions/{id}/input``
    and ``POST /v1/sessions/{id}/generate`` (``DELETE`` lives with the pinned sessions'
    route in api_server.py: it closes an input session first)."""

    @app.post("/v1/sessions")
    async def open_input_session(req: SessionOpenRequest) -> dict:
        """Open a session (an input stream); returns its state."""
        return open_session(state, req.session_id, req.cache_salt, req.policy()).state().as_dict()

    @app.get("/v1/sessions/{session_id}")
    async def input_session_state(session_id: str) -> dict:
        """Where the session's input stands (how much of it is prefilled)."""
        return find_session(state, session_id).state().as_dict()

    @app.post("/v1/sessions/{session_id}/input")
    async def input_session_feed(session_id: str, req: SessionInputRequest) -> dict:
        """Append or replace input, or close it; returns the state."""
        stream = find_session(state, session_id)
        data = decode_bytes(req.bytes) if req.bytes is not None else None
        feed(state, stream, text=req.text, tokens=req.tokens, data=data, mode=req.mode,
             close=req.close)
        return stream.state().as_dict()

    @app.post("/v1/sessions/{session_id}/generate")
    async def input_session_generate(session_id: str, req: SessionGenerateRequest,
                                     raw: Request) -> Response:
        """Reply to the input as it is now; the session keeps taking input meanwhile."""
        stream = find_session(state, session_id)
        reply = await prepare_reply(state, stream, req)
        response_id = random_id("cmpl")
        ticket = state.admission.admit(reply.params.n)
        tracker = RequestTracker(state.metrics, response_id, "/v1/sessions/generate",
                                 state.model_name, req.stream, reply.params.n)
        streams = [StreamReply(state.engine, stream, reply.params, reply.suffix, response_id)]
        return await respond_completion(state, req, raw, reply.params, [reply.prompt_ids],
                                        streams, ticket, tracker, response_id)
