"""Running the engine requests of one HTTP request: merge their streams, notice a client
that left, abort whatever is unfinished on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request

from livelm.engine.errors import EngineDeadError
from livelm.entrypoints.openai.errors import OpenAIError, bad_request_from_value_error
from livelm.outputs import RequestOutput
from livelm.sampling_params import SamplingParams

T = TypeVar("T")
logger = logging.getLogger("livelm.server")


class ClientDisconnected(Exception):
    """The client went away before the response started."""


class ServerShutdown(RuntimeError):
    """The server shut down (its drain timeout passed) before the request finished."""

    MESSAGE = "the server is shutting down: the request did not finish in time"

    def __init__(self, message: str = MESSAGE) -> None:
        super().__init__(message)

    def error(self) -> OpenAIError:
        """The 503 a non-streamed request gets (a stream gets it as its last event)."""
        return OpenAIError(str(self), 503, "service_unavailable", code="server_shutdown",
                           headers={"Connection": "close"})


def engine_stopped(exc: EngineDeadError) -> OpenAIError:
    """The 503 of a request the engine cannot serve because its thread stopped."""
    return OpenAIError(str(exc), 503, "service_unavailable", code=getattr(exc, "code", "engine_stopped"))


def stream_error(exc: Exception) -> OpenAIError:
    """The error event that ends a stream which failed after it started: a 503
    ``server_shutdown`` when the drain timeout cut it off, a 503 ``engine_stopped`` when
    the engine thread stopped, else a 500."""
    if isinstance(exc, ServerShutdown):
        return exc.error()
    if isinstance(exc, EngineDeadError):
        return engine_stopped(exc)
    return OpenAIError(f"generation failed: {type(exc).__name__}: {exc}", 500, "server_error")


def _stopping(engine: Any) -> bool:
    return bool(getattr(engine, "stopping", False))


class EngineStream:
    """One engine request: its id and its stream of output deltas.

    The request reaches the engine when iteration starts. Closing the stream (or leaving
    it unfinished) aborts the engine request, which frees its KV blocks within one step.
    """

    def __init__(self, engine: Any, prompt: str | list[int], params: SamplingParams,
                 request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        self._gen = engine.generate(prompt, params, request_id=request_id)
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        """The outputs; :class:`ServerShutdown` instead of the abort that ends a request
        when the engine shuts down (or of the refusal of one that arrives too late)."""
        try:
            async for out in self._gen:
                self.finished = out.finished
                if out.finished and _stopping(self.engine) and any(
                        o.finish_reason == "abort" for o in out.outputs):
                    raise ServerShutdown()
                yield out
                if out.finished:
                    return
        except RuntimeError as exc:
            if isinstance(exc, ServerShutdown) or not _stopping(self.engine):
                raise
            self.finished = True
            raise ServerShutdown() from exc

    async def close(self) -> None:
        """Abort the request unless it finished, and close the engine's generator."""
        if not self.finished:
            self.engine.abort(self.request_id)
        with contextlib.suppress(Exception):
            await self._gen.aclose()


def open_streams(engine: Any, prompts: list[str | list[int]], params: SamplingParams,
                 base_id: str) -> list[EngineStream]:
    """One engine stream per prompt (ids ``base_id``, or ``base_id-i`` for several)."""
    ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
    return [EngineStream(engine, p, params, rid) for rid, p in zip(ids, prompts, strict=True)]


async def close_all(streams: list[EngineStream]) -> None:
    """Close every stream (aborting unfinished ones)."""
    for stream in streams:
        await stream.close()


async def merge_streams(streams: list[EngineStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield ``(stream index, output)`` from several streams as outputs arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None | BaseException]] = asyncio.Queue()

    async def pump(i: int, stream: EngineStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, None))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    # After the body is read, the next ASGI message is the disconnect (or never comes).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but cancel it (and raise :class:`ClientDisconnected`) if the client
    closes the connection first, so a dropped non-streamed request stops using the engine."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientDisconnected()


async def finalize_request(streams: list[EngineStream], ticket: Any, tracker: Any,
                           resp: Any, status: int = 200, error: str | None = None) -> None:
    """Abort what is unfinished, give back the admission places, count and log the request.

    Safe to call more than once (only the first call counts): a streamed response calls it
    from its generator and again from the response wrapper, because a generator that a
    disconnect cancels before its first step never runs its ``finally``.
    """
    await close_all(streams)
    ticket.release()
    tracker.prompt_tokens = sum(resp.prompt_tokens)
    if status == 200:
        reason = resp.finish_reason
    else:
        reason = "abort" if status in (499, 503) else "error"  # 503: cut off by shutdown
    tracker.finish(reason, status, error)


async def run_to_completion(raw: Request, work: Awaitable[None],
                            finalize: Callable[[int, str | None], Awaitable[None]],
                            prompt_param: str) -> None:
    """Run a non-streamed generation to its end, finalizing the request however it ends.

    The engine's ValueErrors become 400s; any other failure a 500 in OpenAI's shape (raised
    as OpenAIError so that it is answered, not re-raised to the ASGI server).
    """
    try:
        await unless_disconnected(raw, work)
    except ServerShutdown as exc:  # the drain timeout passed: a 503, not a failure
        err = exc.error()
        await finalize(err.status_code, err.message)
        raise err from exc
    except EngineDeadError as exc:  # the engine thread stopped: a 503 for everyone
        err = engine_stopped(exc)
        await finalize(err.status_code, err.message)
        raise err from exc
    except ValueError as exc:  # the engine refused the request
        err = bad_request_from_value_error(exc, {}, prompt_param)
        await finalize(400, err.message)
        raise err from exc
    except Exception as exc:
        if isinstance(exc, ClientDisconnected):
            await finalize(499, "client disconnected")
            raise
        logger.exception("generation failed")
        await finalize(500, f"{type(exc).__name__}: {exc}")
        raise OpenAIError(f"generation failed: {type(exc).__name__}: {exc}", 500,
                          "server_error") from exc
    except BaseException:  # cancelled: the server is shutting down
        await finalize(499, "cancelled")
        raise
    await finalize(200, None)
