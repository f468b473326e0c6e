"""The server's handle on one replica process: send requests, receive their deltas.

A reader thread takes each list of messages off the replica's pipe and hands every item
to the caller's event loop: output deltas into per-request queues, stream progress to the
server-side :class:`~livelm.engine.input_stream.InputStream` objects, call results to
their futures, load reports into :attr:`ReplicaClient.stats`. When the pipe breaks (the
process died) every request in flight ends with :class:`ReplicaFailedError`, every open
stream is closed with the reason, and ``on_death`` tells the supervisor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from livelm.core.kv_policy import FULL, KVPolicy
from livelm.core.request_options import RequestOptions
from livelm.engine.errors import ReplicaFailedError
from livelm.engine.input_stream import InputStream
from livelm.outputs import RequestOutput
from livelm.sampling_params import SamplingParams
from livelm.serving import messages as m

logger = logging.getLogger("livelm.serving")

_CALL_TIMEOUT_S = 60.0


class _Failure:
    """Queued for a request that ended with an error (re-raised by its consumer)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ReplicaClient:
    """One live replica process (a restarted replica is a new client in the same slot).

    Implements the ``StreamEngine`` protocol, so the server's InputStreams of this replica
    talk to it as they would to a local AsyncEngine.
    """

    def __init__(self, index: int, process: Any, conn: Any, info: m.ReplicaInfo, tokenizer: Any,
                 new_request_id: Callable[[], str], on_death: Callable[[ReplicaClient], None]) -> None:
        self.index = index
        self.process = process
        self.info = info
        self.tokenizer = tokenizer
        self.config = info.config
        self.new_request_id = new_request_id
        self.started_at = time.time()
        self.stats: Any = None  # the last EngineStats the replica reported
        self.unreported_tokens = 0  # routed here since that report
        self.dead_reason: str | None = None
        self._conn = conn
        self._on_death = on_death
        self._send_lock = threading.Lock()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams: dict[str, InputStream] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._lock = threading.Lock()  # _queues, _streams, _calls against the reader thread
        self._reader = threading.Thread(target=self._read, name=f"livelm-replica-{index}-client", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ state

    @property
    def alive(self) -> bool:
        """True until the replica's pipe broke (it died or was stopped)."""
        return self.dead_reason is None

    @property
    def pid(self) -> int:
        """The replica's process id."""
        return self.info.pid

    def load_tokens(self) -> int:
        """Waiting + running tokens as last reported, plus what was routed here since."""
        s = self.stats
        reported = (s.num_waiting_tokens + s.num_running_tokens) if s is not None else 0
        return reported + self.unreported_tokens

    @property
    def num_in_flight(self) -> int:
        """Requests sent here that have not ended."""
        return len(self._queues)

    @property
    def num_input_streams(self) -> int:
        """Input streams open on this replica."""
        return len(self._streams)

    # --------------------------------------------------------------- requests

    def send(self, *messages: object) -> None:
        """Send messages now (thread-safe); a dead replica raises ReplicaFailedError."""
        if not self.alive:
            raise ReplicaFailedError(self._failure_text())
        try:
            with self._send_lock:
                self._conn.send(list(messages))
        except (OSError, EOFError, ValueError) as exc:
            self._died(f"its pipe broke ({exc})")
            raise ReplicaFailedError(self._failure_text()) from exc

    async def generate_ids(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        rid: str,
        fork_from: str | None = None,
        prompt_text: str | None = None,
        options: RequestOptions | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Output deltas of one request run on this replica (``prompt``: token ids)."""
        if options is None:
            options = RequestOptions.from_extra(params.extra)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._queues:
                raise ValueError(f"request id {rid!r} is already in use")
            self._queues[rid] = (loop, queue)
        finished = False
        try:
            self.send(m.Generate(rid, list(prompt), prompt_text, params, options, fork_from))
            while True:
                item = await queue.get()
                if isinstance(item, _Failure):
                    finished = True
                    raise item.error
                if prompt_text is not None and item.prompt is None:
                    item.prompt = prompt_text  # a stream's reply: the text the server knows
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._queues.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Cancel a request (idempotent; nothing to do on a dead replica)."""
        if self.alive:
            with contextlib.suppress(ReplicaFailedError):
                self.send(m.Cancel(request_id))

    def call(self, method: str, *args: object) -> concurrent.futures.Future:
        """Call an AsyncEngine method of the replica (``messages.CALLABLE``)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._call_ids)
        with self._lock:
            self._calls[call_id] = future
        try:
            self.send(m.Call(call_id, method, args))
        except ReplicaFailedError as exc:
            with self._lock:
                self._calls.pop(call_id, None)
            future.set_exception(exc)
        return future

    def call_sync(self, method: str, *args: object, timeout: float = _CALL_TIMEOUT_S) -> Any:
        """:meth:`call` and wait for its answer (from a worker thread, not the event loop)."""
        return self.call(method, *args).result(timeout)

    # ----------------------------------------------------------- input streams

    def open_stream(self, stream_id: str, cache_salt: str | None, kv_policy: KVPolicy = FULL) -> InputStream:
        """Open an input stream whose KV lives on this replica (call from the event loop)."""
        stream = InputStream(self, stream_id, cache_salt, kv_policy)
        with self._lock:
            self._streams[stream_id] = stream
        self.send(m.OpenStream(stream_id, cache_salt, kv_policy))
        return stream

    def get_stream(self, stream_id: str) -> InputStream | None:
        """The open stream of that id on this replica, if any."""
        return self._streams.get(stream_id)

    def check_stream_input(self, token_ids: list[int], kv_policy: KVPolicy = FULL) -> None:
        """The replica engine's check, from what it reported (vocabulary, length)."""
        limit = self.info.vocab_size
        bad = [t for t in token_ids if not 0 <= t < limit]
        if bad:
            raise ValueError(f"input token ids must be in [0, {limit}); got {bad[:5]}")
        if kv_policy.is_sinks:
            return
        most = min(self.info.max_model_len, self.info.kv_capacity_tokens) - 1
        if len(token_ids) > most:
            raise ValueError(
                f"the streamed input ({len(token_ids)} tokens) exceeds the {most} tokens a stream may "
                f"hold (context length {self.info.max_model_len}, KV cache {self.info.kv_capacity_tokens} "
                "tokens, one token left for a reply)"
            )

    def update_stream(self, stream_id: str, keep: int, append: list[int], close: bool) -> None:
        """A stream's committed change, sent on (InputStream calls it)."""
        self.send(m.UpdateStream(stream_id, keep, append, close))

    def close_stream(self, stream_id: str) -> None:
        """Free a stream's KV (InputStream.close calls it)."""
        with self._lock:
            self._streams.pop(stream_id, None)
        if self.alive:
            with contextlib.suppress(ReplicaFailedError):
                self.send(m.CloseStream(stream_id))

    # ---------------------------------------------------------------- lifetime

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Ask the replica to finish (in-flight requests get ``drain_timeout_s``) and exit."""
        if self.alive:
            with contextlib.suppress(ReplicaFailedError):
                self.send(m.Shutdown(drain_timeout_s))

    def join(self, timeout: float) -> None:
        """Wait for the process to exit; kill it past ``timeout`` (never leave an orphan)."""
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("replica %d did not stop in %.0fs: killing it", self.index, timeout)
            self.process.kill()
            self.process.join(5.0)
        self._reader.join(5.0)

    def _failure_text(self) -> str:
        return (f"replica {self.index} (pid {self.pid}) failed: {self.dead_reason}; the other "
                "replicas still serve, retry the request")

    def _died(self, reason: str) -> None:
        with self._lock:
            if self.dead_reason is not None:
                return
            self.dead_reason = reason
            queues, self._queues = dict(self._queues), {}
            streams, self._streams = dict(self._streams), {}
            calls, self._calls = dict(self._calls), {}
        error = ReplicaFailedError(self._failure_text())
        for loop, queue in queues.values():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, _Failure(error))
        for stream in streams.values():
            stream.notify_closed(f"its replica {self.index} failed")
        for future in calls.values():
            if not future.done():
                future.set_exception(error)
        self._on_death(self)

    # ------------------------------------------------------------- reader thread

    def _read(self) -> None:
        while True:
            try:
                batch = self._conn.recv()
            except (EOFError, OSError):
                break
            for msg in batch:
                try:
                    self._dispatch(msg)
                except Exception:  # noqa: BLE001 - a bad message must not stop the reader
                    logger.exception("replica %d: message %s", self.index, type(msg).__name__)
        self.process.join(1.0)
        code = self.process.exitcode
        self._died(f"its process exited (exit code {code})" if code is not None else "its pipe closed")

    def _deliver(self, rid: str, item: object) -> None:
        target = self._queues.get(rid)
        if target is not None:
            loop, queue = target
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                loop.call_soon_threadsafe(queue.put_nowait, item)

    def _dispatch(self, msg: object) -> None:
        match msg:
            case m.Output(rid, out):
                self._deliver(rid, out)
            case m.Failed(rid, kind, message):
                self._deliver(rid, _Failure(m.rebuild_error(kind, message)))
            case m.Load(stats):
                self.stats, self.unreported_tokens = stats, 0
            case m.StreamProgress(sid, num):
                stream = self._streams.get(sid)
                if stream is not None:
                    stream.notify_progress(num)
            case m.StreamClosed(sid, reason):
                with self._lock:
                    stream = self._streams.pop(sid, None)
                if stream is not None:
                    stream.notify_closed(reason)
            case m.CallResult(call_id, value, error):
                with self._lock:
                    future = self._calls.pop(call_id, None)
                if future is not None and not future.done():
                    if error is None:
                        future.set_result(value)
                    else:
                        future.set_exception(m.rebuild_error(*error))
