"""What both completion endpoints do once their engine streams are open: stream SSE chunks,
or wait for the whole response, then finalize the request either way.

An endpoint brings its own :class:`ChoiceBuilder` (its chunk object, its delta shape, its
opening and echo chunks); the order of events, usage, ``[DONE]`` and in-band errors are
the same for both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from livelm.entrypoints.openai.choices import ResponseState
from livelm.entrypoints.openai.generation import (
    EngineStream,
    finalize_request,
    merge_streams,
    run_to_completion,
    stream_error,
)
from livelm.entrypoints.openai.protocol import UsageInfo
from livelm.entrypoints.openai.request_tracker import RequestTracker
from livelm.entrypoints.openai.sse import DONE, SSEResponse, sse_error
from livelm.outputs import RequestOutput


class ChoiceBuilder(Protocol):
    """Turns one endpoint's engine outputs into its choices (chunks or a whole response)."""

    req: Any  # has ``stream`` and ``include_usage``
    resp: ResponseState

    def chunk(self, choices: list, usage: UsageInfo | None = None) -> str:
        """One SSE event of the endpoint's chunk object."""
        ...

    def opening(self) -> list:
        """Choices sent before any output (chat: each choice's role)."""
        ...

    def start(self, prompt_index: int, out: RequestOutput) -> list:
        """Record a prompt's first output; choices sent before its deltas (completions'
        echo), if any."""
        ...

    def deltas(self, prompt_index: int, out: RequestOutput) -> list:
        """Fold in one engine output; the choices it produced."""
        ...

    def usage(self) -> UsageInfo:
        """Token counts of the whole response."""
        ...

    def whole(self) -> BaseModel:
        """The non-streamed response."""
        ...


async def respond(raw: Request, builder: ChoiceBuilder, streams: list[EngineStream],
                  ticket: Any, tracker: RequestTracker, prompt_param: str) -> Response:
    """SSE chunks when ``builder.req.stream``, else one JSON response; the request is
    finalized (engine streams closed, admission released, metrics recorded) either way."""

    async def finalize(status: int = 499, error: str | None = "client disconnected") -> None:
        await finalize_request(streams, ticket, tracker, builder.resp, status, error)

    if builder.req.stream:
        return SSEResponse(_stream(builder, streams, tracker, finalize), finalize)
    await run_to_completion(raw, _consume(builder, streams, tracker), finalize, prompt_param)
    return JSONResponse(builder.whole().model_dump(mode="json"))


def _deltas(builder: ChoiceBuilder, prompt_index: int, out: RequestOutput,
            tracker: RequestTracker) -> list:
    before = builder.resp.completion_tokens
    choices = builder.deltas(prompt_index, out)
    tracker.on_tokens(builder.resp.completion_tokens - before)
    return choices


async def _consume(builder: ChoiceBuilder, streams: list[EngineStream],
                   tracker: RequestTracker) -> None:
    async for i, out in merge_streams(streams):
        builder.start(i, out)
        _deltas(builder, i, out, tracker)


async def _stream(builder: ChoiceBuilder, streams: list[EngineStream], tracker: RequestTracker,
                  finalize: Callable[[int, str | None], Awaitable[None]]) -> AsyncIterator[str]:
    status, error = 499, "client disconnected"
    try:
        for choice in builder.opening():
            yield builder.chunk([choice])
        async for i, out in merge_streams(streams):
            for choice in builder.start(i, out):
                yield builder.chunk([choice])
            for choice in _deltas(builder, i, out, tracker):
                yield builder.chunk([choice])
        if builder.req.include_usage:
            yield builder.chunk([], builder.usage())
        yield DONE
        status, error = 200, None
    except Exception as exc:  # the stream has started: report in-band, then end it
        err = stream_error(exc)  # 503 when cut off by shutdown, else 500
        status, error = err.status_code, f"{type(exc).__name__}: {exc}"
        yield sse_error(err)
        yield DONE
    finally:
        await finalize(status, error)
