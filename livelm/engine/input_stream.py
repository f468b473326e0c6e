"""A prompt that is still arriving: prefilled piece by piece, replied to at any time.

An :class:`InputStream` belongs to an engine (``AsyncEngine.open_stream()``), which it
reaches only through :class:`StreamEngine`; the engine thread reaches it only through its
``notify_*`` methods and :attr:`~InputStream.active_generations`. Its input grows by ``append`` (text, bytes that may split a
character, or token ids) or is revised by ``replace`` (update mode). Each change reaches
the engine at once and is prefilled in the background by an input-only request, inside
the one token budget; only tokens that can no longer change are committed (see
:mod:`livelm.engine.incremental_tokenizer`). ``generate`` replies to the input as it is at that
moment, forking the KV computed so far, and may be called before ``close_input``, and
again later ("speak while reading"). Its tokens equal those of a one-shot prompt of the
same text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from livelm.config import EngineConfig
from livelm.core.kv_policy import FULL, KVPolicy
from livelm.core.request_options import RequestOptions
from livelm.core.token_ids import common_prefix_len
from livelm.engine.incremental_tokenizer import InputUpdate, StreamingTextInput
from livelm.outputs import RequestOutput
from livelm.sampling_params import SamplingParams

Chunk = str | bytes | list[int]


class StreamEngine(Protocol):
    """What an :class:`InputStream` needs from the engine that owns it (AsyncEngine)."""

    tokenizer: Any
    config: EngineConfig

    def new_request_id(self) -> str:
        """A request id unique within the engine."""
        ...

    def check_stream_input(self, token_ids: list[int], kv_policy: KVPolicy = FULL) -> None:
        """ValueError unless a stream may hold ``token_ids`` (vocabulary and length)."""
        ...

    def update_stream(self, stream_id: str, keep: int, append: list[int], close: bool) -> None:
        """Hand a committed change of the stream's input to the engine."""
        ...

    def close_stream(self, stream_id: str) -> None:
        """Free the stream's KV (the stream has marked itself closed)."""
        ...

    def abort(self, request_id: str) -> None:
        """Cancel a request."""
        ...

    def generate_ids(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        rid: str,
        fork_from: str | None = None,
        prompt_text: str | None = None,
        options: RequestOptions | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Output deltas of one request whose prompt starts with ``fork_from``'s KV."""
        ...


class StreamClosedError(ValueError):
    """The stream was closed (by its owner, an idle timeout or engine shutdown)."""


@dataclass(frozen=True)
class StreamState:
    """Where a stream's input stands; ``num_computed_tokens`` lags while prefill runs."""

    stream_id: str
    num_input_tokens: int  # committed input tokens sent to the engine
    num_computed_tokens: int  # of those, how many have KV
    pending_text_chars: int  # text received but not yet committed as tokens
    input_closed: bool
    closed: bool
    num_generations: int  # replies in flight
    # A reply to the closed input took over the prefill the stream had not done yet.
    prefill_handed_over: bool = False

    @property
    def status(self) -> str:
        """``closed``; ``input_closed`` (no more work: all input has KV, or the rest was
        handed to a reply); ``prefilling``; or ``waiting_for_input`` (all input has KV)."""
        if self.closed:
            return "closed"
        caught_up = self.num_computed_tokens >= self.num_input_tokens
        if self.input_closed and (caught_up or self.prefill_handed_over):
            return "input_closed"
        return "waiting_for_input" if caught_up else "prefilling"

    def as_dict(self) -> dict:
        """JSON-ready form (the HTTP state events)."""
        return {
            "session_id": self.stream_id,
            "status": self.status,
            "num_input_tokens": self.num_input_tokens,
            "num_computed_tokens": self.num_computed_tokens,
            "pending_text_chars": self.pending_text_chars,
            "input_closed": self.input_closed,
            "num_generations": self.num_generations,
            "prefill_handed_over": self.prefill_handed_over,
        }


class InputStream:
    """One streamed prompt: ``append``/``replace``/``close_input`` feed it, ``generate``
    replies to it, ``close`` (or ``async with``) frees its KV.

    Feeding methods never block on the engine: they tokenize, check the limits and hand
    the change to the engine thread. Use it from one event loop.
    """

    def __init__(self, engine: StreamEngine, stream_id: str, cache_salt: str | None,
                 kv_policy: KVPolicy = FULL) -> None:
        self._engine = engine
        self.stream_id = stream_id
        self.cache_salt = cache_salt
        self.kv_policy = kv_policy  # core/kv_policy.py; its replies share it
        self._text: StreamingTextInput | None = None  # set by the first text chunk
        self._ids: list[int] = []  # committed input tokens, as sent to the engine
        self._mode: str | None = None  # "text" or "tokens", fixed by the first chunk
        self.input_closed = False
        self._prefill_handed_over = False
        self.closed_reason: str | None = None
        self._generations: set[str] = set()
        self._num_computed = 0
        self._progress = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.last_activity = time.monotonic()

    # ------------------------------------------------------------------ feeding

    def append(self, chunk: Chunk) -> None:
        """Add a piece of input: text, UTF-8 bytes (may split a character) or token ids."""
        self._check_open()
        if self.input_closed:
            raise ValueError("the stream's input is closed: no more input can be appended")
        if isinstance(chunk, str | bytes):
            text = self._text_input()
            checkpoint = text.checkpoint()
            update = text.append(chunk)
            self._apply(update, undo=lambda: text.restore(checkpoint))
        else:
            self._apply(InputUpdate(len(self._ids), self._token_input(chunk)))

    def replace(self, new_input: str | list[int]) -> None:
        """Revise the whole input (update mode): the longest common token prefix keeps its
        KV; everything from the first changed token is prefilled again."""
        self._check_open()
        if self.input_closed:
            raise ValueError("the stream's input is closed: it can no longer be replaced")
        if isinstance(new_input, str):
            text = self._text_input()
            checkpoint = text.checkpoint()
            update = text.replace(new_input)
            self._apply(update, undo=lambda: text.restore(checkpoint))
        else:
            ids = self._token_input(new_input)
            keep = common_prefix_len(self._ids, ids)
            self._apply(InputUpdate(keep, ids[keep:]))

    def close_input(self) -> None:
        """No more input: the tail held back for retokenization is committed."""
        self._check_open()
        if self.input_closed:
            return
        if self._text is not None:
            checkpoint = self._text.checkpoint()
            self._apply(self._text.close(), undo=lambda: self._text.restore(checkpoint), close=True)
        else:
            self._apply(InputUpdate(len(self._ids), []), close=True)
        self.input_closed = True

    # ---------------------------------------------------------------- replying

    def prompt_ids(self, suffix: str | list[int] | None = None) -> list[int]:
        """Token ids a reply sees now: the input as a one-shot prompt of it would tokenize
        (uncommitted tail included), then ``suffix`` (text is tokenized with the input)."""
        if self._text is not None:
            text = self._text.text
            if isinstance(suffix, str):
                return self._text.tokenizer(text + suffix).input_ids
            ids = self._text.current_ids()
        else:
            if isinstance(suffix, str):
                raise ValueError("a text suffix needs a text stream; pass token ids")
            ids = list(self._ids)
        return ids + (self._token_chunk(suffix) if suffix else [])

    def generate(
        self,
        params: SamplingParams,
        suffix: str | list[int] | None = None,
        request_id: str | None = None,
        *,
        options: RequestOptions | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Reply to the input as it is at this call (plus ``suffix``, for this reply only).

        Returns an async iterator of output deltas like :meth:`AsyncEngine.generate`; the
        prompt is fixed here, so input appended before the iteration starts is not part of
        it. The stream keeps reading input meanwhile. The reply shares the KV the stream has
        computed, so only the input's newest tokens are prefilled for it. ``options`` (the
        reply's session; default: read from ``params.extra``) take the stream's cache salt.
        """
        self._check_open()
        ids = self.prompt_ids(suffix)
        if not ids:
            raise ValueError("the stream has no input yet: append some before generating")
        prompt_text = self._text.text + (suffix if isinstance(suffix, str) else "") if self._text else None
        return self._reply(ids, params, options, request_id or self._engine.new_request_id(), prompt_text,
                           self.input_closed)

    async def _reply(self, ids: list[int], params: SamplingParams, options: RequestOptions | None, rid: str,
                     prompt_text: str | None, after_close: bool) -> AsyncIterator[RequestOutput]:
        self._check_open()
        if options is None:
            options = RequestOptions.from_extra(params.extra)
        if self.cache_salt is not None:  # the reply's own blocks join the stream's salt
            options = dataclasses.replace(options, cache_salt=self.cache_salt)
        # A reply forks the stream's KV, whose layout its policy fixes.
        options = dataclasses.replace(options, kv_policy=self.kv_policy)
        # The engine lets a reply to closed input compute what the stream has not yet.
        self._prefill_handed_over = self._prefill_handed_over or after_close
        self._generations.add(rid)
        try:
            async for out in self._engine.generate_ids(ids, params, rid, fork_from=self.stream_id,
                                                       prompt_text=prompt_text, options=options):
                self.last_activity = time.monotonic()
                yield out
        finally:
            self._generations.discard(rid)
            self.last_activity = time.monotonic()

    # ----------------------------------------------------------------- progress

    def state(self) -> StreamState:
        """A snapshot of the stream's progress."""
        return StreamState(
            stream_id=self.stream_id,
            num_input_tokens=len(self._ids),
            num_computed_tokens=min(self._num_computed, len(self._ids)),
            pending_text_chars=len(self._text.pending_text) if self._text is not None else 0,
            input_closed=self.input_closed,
            closed=self.closed_reason is not None,
            num_generations=len(self._generations),
            prefill_handed_over=self._prefill_handed_over and self._num_computed < len(self._ids),
        )

    async def wait_prefilled(self, timeout: float | None = None) -> StreamState:
        """Wait until every committed input token has KV (or the stream closes, or a
        reply to its closed input took the rest of the prefill over)."""

        async def caught_up() -> None:
            while self.state().status == "prefilling":
                self._progress.clear()
                await self._progress.wait()

        await asyncio.wait_for(caught_up(), timeout)
        return self.state()

    async def wait_progress(self) -> StreamState:
        """Wait for the next change of progress (prefill advanced, or the stream closed)."""
        self._progress.clear()
        await self._progress.wait()
        return self.state()

    # ------------------------------------------------- from the engine thread

    @property
    def active_generations(self) -> tuple[str, ...]:
        """Request ids of the replies in flight (any thread may read it)."""
        return tuple(self._generations)

    def notify_progress(self, num_computed: int) -> None:
        """The stream's prefill advanced to ``num_computed`` tokens (thread-safe: runs on
        the stream's event loop; nothing happens once that loop is closed)."""
        self._call_soon(self._on_progress, num_computed)

    def notify_closed(self, reason: str) -> None:
        """The engine closed the stream, for ``reason`` (thread-safe, like notify_progress)."""
        self._call_soon(self._on_closed, reason)

    def _call_soon(self, callback, arg) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:  # the stream's loop is gone: nobody is listening any more
            pass

    def _on_progress(self, num_computed: int) -> None:
        self._num_computed = num_computed
        self._progress.set()

    def _on_closed(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        self._progress.set()

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        """Free the stream's KV and cancel its replies in flight (idempotent)."""
        if self.closed_reason is None:
            self.closed_reason = "closed by its owner"
            for rid in list(self._generations):
                self._engine.abort(rid)
            self._engine.close_stream(self.stream_id)
        self._progress.set()

    @property
    def closed(self) -> bool:
        """True once the stream is closed."""
        return self.closed_reason is not None

    async def __aenter__(self) -> InputStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ helpers

    def _check_open(self) -> None:
        if self.closed_reason is not None:
            raise StreamClosedError(f"stream {self.stream_id!r} is closed ({self.closed_reason})")
        self.last_activity = time.monotonic()

    def _text_input(self) -> StreamingTextInput:
        if self._mode == "tokens":
            raise ValueError("this stream takes token ids (its first chunk was token ids), not text")
        if self._text is None:
            self._mode = "text"
            self._text = StreamingTextInput(self._engine.tokenizer)
        return self._text

    @staticmethod
    def _token_chunk(chunk) -> list[int]:
        if not isinstance(chunk, list | tuple) or not all(isinstance(t, int) and not isinstance(t, bool) for t in chunk):
            raise ValueError("an input chunk must be a str, bytes, or a list of token ids (ints)")
        return list(chunk)

    def _token_input(self, chunk) -> list[int]:
        ids = self._token_chunk(chunk)
        if self._mode == "text":
            raise ValueError("this stream takes text (its first chunk was text), not token ids")
        self._mode = "tokens"
        return ids

    def _check_window(self, keep: int) -> None:
        """A sinks stream keeps only its last ``window`` tokens revisable: a revision from
        further back would need KV that has rolled out."""
        window = self.kv_policy.window
        if keep < len(self._ids) and keep < len(self._ids) - window:
            raise ValueError(
                f"this replace revises the input from token {keep}, {len(self._ids) - keep} tokens back; "
                f"with kv_policy 'sinks' only the last kv_window={window} tokens may be revised"
            )

    def _apply(self, update: InputUpdate, undo=None, close: bool = False) -> None:
        """Check the revised input against the limits, then hand it to the engine."""
        new_ids = self._ids[: update.keep] + update.append
        try:
            if self.kv_policy.is_sinks:
                self._engine.check_stream_input(new_ids, self.kv_policy)
                self._check_window(update.keep)
            else:
                self._engine.check_stream_input(new_ids)
            limit = self._engine.config.max_stream_pending_tokens
            pending = len(new_ids) - min(self._num_computed, update.keep)
            if pending > limit:
                raise ValueError(
                    f"stream {self.stream_id!r} would have {pending} input tokens waiting to be prefilled, "
                    f"more than max_stream_pending_tokens={limit}: send smaller pieces, or wait for the "
                    "engine to catch up (wait_prefilled) before sending more"
                )
        except ValueError:
            if undo is not None:
                undo()
            raise
        if update.keep == len(self._ids) and not update.append and not close:
            return
        if update.keep < len(self._ids):
            # Conservative until the engine reports: a shared block is recomputed from its start.
            self._num_computed = min(self._num_computed, update.keep - update.keep % self._engine.config.block_size)
        self._ids = new_ids
        self._engine.update_stream(self.stream_id, update.keep, list(update.append), close)
