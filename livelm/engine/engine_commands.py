"""What callers of AsyncEngine ask its engine thread to do, and the queue that carries it.

Each command is a frozen dataclass; the engine thread applies them between two steps,
matching on their type. :class:`CommandQueue` is thread-safe and can hold commands back
so that those sent together reach the engine together (see :meth:`CommandQueue.send`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from livelm.core.kv_policy import FULL, KVPolicy
from livelm.core.request_options import RequestOptions
from livelm.engine.fork import Branch
from livelm.models.weight_update import StagedUpdate
from livelm.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class AddRequest:
    """Queue a request. ``prompt`` is text or token ids; with ``prompt_text`` set, ``prompt``
    holds the token ids and ``prompt_text`` the text to report. ``fork_from`` names the
    input stream whose KV the prompt starts with."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    options: RequestOptions
    fork_from: str | None = None
    prompt_text: str | None = None


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Start an input stream's input-only request."""

    stream_id: str
    cache_salt: str | None
    kv_policy: KVPolicy = FULL


@dataclass(frozen=True, slots=True)
class UpdateStream:
    """Keep the stream's first ``keep`` input tokens, append ``append``; ``close`` ends its input."""

    stream_id: str
    keep: int
    append: list[int]
    close: bool


@dataclass(frozen=True, slots=True)
class CloseStream:
    """Free an input stream's KV (its owner closed it)."""

    stream_id: str


@dataclass(frozen=True, slots=True)
class Abort:
    """Cancel a request (idempotent)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class CloseSession:
    """Release a session's pinned KV; the answer resolves ``done`` on ``loop``."""

    session_id: str
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future


@dataclass(frozen=True, slots=True)
class UpdateWeights:
    """Swap staged weights in (docs/rl.md) with ``mode`` for the requests in flight; the new
    weight version (or the error) resolves ``done``, a concurrent.futures.Future."""

    staged: StagedUpdate
    mode: str
    done: Future


@dataclass(frozen=True, slots=True)
class SetPaused:
    """Pause (no steps; commands still apply) or resume generation; resolves ``done``."""

    paused: bool
    done: Future


@dataclass(frozen=True, slots=True)
class AbortAll:
    """Abort every request in flight; the count resolves ``done``."""

    done: Future


@dataclass(frozen=True, slots=True)
class Fork:
    """Fork a running request into branches (``Engine.fork``); the ForkResult resolves ``done``."""

    request_id: str
    branches: list[Branch]
    branch_ids: list[str]
    done: Future


@dataclass(frozen=True, slots=True)
class Join:
    """Resume a forked request (``Engine.join``, its keyword arguments in ``options``); the
    appended token ids resolve ``done``."""

    request_id: str
    options: dict
    done: Future


@dataclass(frozen=True, slots=True)
class Stop:
    """Abort everything in flight and end the engine thread."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Commands applied in order between two steps, none of them with a step in between."""

    commands: tuple[Command, ...]


Command = (
    AddRequest | OpenStream | UpdateStream | CloseStream | Abort | CloseSession
    | UpdateWeights | SetPaused | AbortAll | Fork | Join | Stop
)


class CommandQueue:
    """Commands from any thread to the engine thread, with a wakeup for its idle waits."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Command | Batch] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        # Commands held back until the sender's event loop gets control again, then queued
        # as one batch: a stream's last piece, its close and the reply to it reach the
        # engine together, so the reply prefills that piece itself in one step.
        self._outbox: list[Command] = []
        self._outbox_loop: asyncio.AbstractEventLoop | None = None
        self._outbox_lock = threading.Lock()

    def send(self, command: Command, batch: bool = False) -> None:
        """Queue a command for the engine thread (thread-safe).

        ``batch`` holds it back until the running event loop next gets control, and every
        command sent meanwhile (from any thread, so their order holds) joins it: they are
        queued as one item, which the engine thread applies between two steps. Without
        it, a step could start between a stream's last piece and the reply sent right
        after it, and the reply would wait for that step and then need one of its own.
        """
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._outbox_lock:
            if self._outbox:
                if loop is self._outbox_loop:
                    self._outbox.append(command)
                    return
                # Another thread or loop: send what waits, then this, in order, now.
                commands, self._outbox = [*self._outbox, command], []
                self._queue.put(Batch(tuple(commands)))
                self._wakeup.set()
                return
            if batch and loop is not None:
                self._outbox, self._outbox_loop = [command], loop
                loop.call_soon(self._flush_outbox)
                return
        self._queue.put(command)
        self._wakeup.set()

    def _flush_outbox(self) -> None:
        with self._outbox_lock:  # held while queueing, so no later command overtakes these
            commands, self._outbox = self._outbox, []
            if commands:
                self._queue.put(Batch(tuple(commands)))
                self._wakeup.set()

    def drain(self) -> Iterator[Command]:
        """Every command queued so far, batches unpacked, in order (engine thread)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Batch):
                yield from item.commands
            else:
                yield item

    def wait(self, timeout: float | None) -> None:
        """Sleep until a command arrives (or ``timeout`` seconds pass), then re-arm."""
        self._wakeup.wait(timeout)
        self._wakeup.clear()
