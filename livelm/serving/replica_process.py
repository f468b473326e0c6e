"""One data-parallel replica: an AsyncEngine in a child process, driven over a pipe.

``replica_main`` is the child's entry point (``multiprocessing`` spawn). It builds the
engine, says :class:`~livelm.serving.messages.Ready`, then serves the messages of
:mod:`livelm.serving.messages` until Shutdown, the pipe's end (the server went away) or
the server's process disappearing (checked every second), so a replica never outlives
its server. Input streams are mirrored: the server keeps the real InputStream (it
tokenizes), the replica an InputStream fed the same token ids, which owns the KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from typing import Any

from livelm.engine.async_engine import AsyncEngine
from livelm.engine.input_stream import InputStream
from livelm.serving import messages as m

logger = logging.getLogger("livelm.serving")

_LOAD_EVERY_S = 0.05  # a load report at most this often while the engine changes
_PARENT_CHECK_S = 1.0


class _Outbox:
    """Messages to the server, sent as one list per event-loop turn."""

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._loop = loop
        self._pending: list = []
        self.broken = False

    def put(self, message: object) -> None:
        """Queue ``message``; the list goes out when the loop next gets control."""
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(message)

    def flush(self) -> None:
        """Send what is queued (a broken pipe means the server is gone: stop sending)."""
        batch, self._pending = self._pending, []
        if batch and not self.broken:
            try:
                self._conn.send(batch)
            except (OSError, EOFError, ValueError):
                self.broken = True


class ReplicaServer:
    """The replica's side of the protocol, on the child's event loop."""

    def __init__(self, engine: AsyncEngine, outbox: _Outbox) -> None:
        self.engine = engine
        self.outbox = outbox
        self.streams: dict[str, InputStream] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.stopped = asyncio.Event()
        self._last_stats: object = None

    def handle(self, batch: list) -> None:
        """Apply one list of messages from the server, in order."""
        for msg in batch:
            try:
                self._handle(msg)
            except Exception as exc:  # noqa: BLE001 - one bad message fails only itself
                logger.exception("replica: message %s failed", type(msg).__name__)
                rid = getattr(msg, "request_id", None)
                if rid is not None:
                    self.outbox.put(m.Failed(rid, m.error_kind(exc), str(exc)))
                sid = getattr(msg, "stream_id", None)
                if sid is not None and not isinstance(msg, m.CloseStream):
                    self._drop_stream(sid, f"invalid input: {exc}")

    def _handle(self, msg: object) -> None:
        match msg:
            case m.Generate():
                self.tasks[msg.request_id] = asyncio.ensure_future(self._generate(msg))
            case m.Cancel(rid):
                self.engine.abort(rid)
            case m.OpenStream(sid, salt, policy):
                stream = self.engine.open_stream(sid, salt, policy)
                self.streams[sid] = stream
                asyncio.ensure_future(self._watch(stream))
            case m.UpdateStream(sid, keep, append, close):
                stream = self.streams.get(sid)
                if stream is None:
                    return  # closed here already; the server was told
                if stream.closed:
                    return
                current = stream.prompt_ids()
                if keep == len(current):
                    if append:
                        stream.append(append)
                else:
                    stream.replace(current[:keep] + append)
                if close:
                    stream.close_input()
            case m.CloseStream(sid):
                stream = self.streams.pop(sid, None)
                if stream is not None:
                    asyncio.ensure_future(stream.close())
            case m.Call():
                asyncio.ensure_future(self._call(msg))
            case m.Shutdown(drain):
                asyncio.ensure_future(self._shutdown(drain))
            case _:
                raise ValueError(f"unknown message {type(msg).__name__}")

    async def _generate(self, msg: m.Generate) -> None:
        rid = msg.request_id
        try:
            if msg.fork_from is not None:
                stream = self.streams.get(msg.fork_from)
                if stream is None:
                    raise ValueError(f"stream {msg.fork_from!r} is closed")
                current = stream.prompt_ids()
                ids = msg.prompt_token_ids
                if ids[: len(current)] != current:
                    raise ValueError("the reply's prompt does not extend the stream's input")
                outputs = stream.generate(msg.params, ids[len(current):] or None, rid, options=msg.options)
            else:
                outputs = self.engine.generate_ids(msg.prompt_token_ids, msg.params, rid,
                                                   prompt_text=msg.prompt_text, options=msg.options)
            async with contextlib.aclosing(outputs) as outs:
                async for out in outs:
                    self.outbox.put(m.Output(rid, out))
                    self._report_load()
        except Exception as exc:  # noqa: BLE001 - handed to the request's caller
            self.outbox.put(m.Failed(rid, m.error_kind(exc), str(exc)))
        finally:
            self.tasks.pop(rid, None)

    async def _watch(self, stream: InputStream) -> None:
        """Forward a stream's progress, then its closing, to the server."""
        sid = stream.stream_id
        reported = -1
        while True:
            state = stream.state()
            if state.num_computed_tokens != reported:
                reported = state.num_computed_tokens
                self.outbox.put(m.StreamProgress(sid, reported))
            if stream.closed:
                if self.streams.pop(sid, None) is not None:  # not closed by the server
                    self.outbox.put(m.StreamClosed(sid, stream.closed_reason or "closed"))
                return
            await stream.wait_progress()

    def _drop_stream(self, sid: str, reason: str) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None:
            asyncio.ensure_future(stream.close())
            self.outbox.put(m.StreamClosed(sid, reason))

    async def _call(self, msg: m.Call) -> None:
        try:
            if msg.method not in m.CALLABLE:
                raise ValueError(f"a replica does not answer {msg.method!r}")
            value = getattr(self.engine, msg.method)(*msg.args)
            if asyncio.iscoroutine(value):
                value = await value
            self.outbox.put(m.CallResult(msg.call_id, value))
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            self.outbox.put(m.CallResult(msg.call_id, error=(m.error_kind(exc), str(exc))))

    def _report_load(self) -> None:
        stats = self.engine.stats()
        if stats is not self._last_stats:  # AsyncEngine makes a new object per step
            self._last_stats = stats
            self.outbox.put(m.Load(stats))

    async def report_load_forever(self) -> None:
        """Load reports while nothing else is sent (a replica finishing its last request)."""
        while not self.stopped.is_set():
            self._report_load()
            await asyncio.sleep(_LOAD_EVERY_S)

    async def _shutdown(self, drain_timeout_s: float) -> None:
        await self.engine.shutdown(drain_timeout_s)
        self.stopped.set()


def _read_forever(conn: Any, loop: asyncio.AbstractEventLoop, server: ReplicaServer) -> None:
    """Reader thread: each received list goes to the loop; the pipe's end stops the replica."""
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            break
        loop.call_soon_threadsafe(server.handle, batch)
    with contextlib.suppress(RuntimeError):  # the loop may be closed already
        loop.call_soon_threadsafe(server.handle, [m.Shutdown(0.0)])


async def _watch_parent(parent_pid: int, server: ReplicaServer) -> None:
    """Stop when the server's process is gone (its pipe may outlive it in a grandchild)."""
    while not server.stopped.is_set():
        await asyncio.sleep(_PARENT_CHECK_S)
        if os.getppid() != parent_pid:
            logger.warning("replica: the server process is gone; stopping")
            server.handle([m.Shutdown(0.0)])
            return


async def _serve(conn: Any, model: str | None, engine_kwargs: dict, parent_pid: int | None) -> None:
    loop = asyncio.get_running_loop()
    outbox = _Outbox(conn, loop)
    try:
        engine = await asyncio.to_thread(AsyncEngine, model, **engine_kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported, then the process exits
        outbox.put(m.StartFailed(f"{type(exc).__name__}: {exc}"))
        outbox.flush()
        return
    info = m.ReplicaInfo(
        pid=os.getpid(),
        model_dir=engine.model_dir,
        model_name=engine.model_name,
        max_model_len=engine.max_model_len,
        vocab_size=engine.token_id_limit,
        kv_capacity_tokens=engine.kv_capacity_tokens,
        config=engine.config,
    )
    server = ReplicaServer(engine, outbox)
    outbox.put(m.Ready(info))
    outbox.flush()
    threading.Thread(target=_read_forever, args=(conn, loop, server), name="livelm-replica-reader",
                     daemon=True).start()
    background = [asyncio.ensure_future(server.report_load_forever())]
    if parent_pid is not None:  # a Ray actor's parent is Ray's: its socket's end stops it
        background.append(asyncio.ensure_future(_watch_parent(parent_pid, server)))
    await server.stopped.wait()
    for task in background:
        task.cancel()
    outbox.flush()


def replica_main(conn: Any, index: int, model: str | None, engine_kwargs: dict, parent_pid: int | None,
                 log_level: str = "WARNING") -> None:
    """The replica process: serve one engine over ``conn`` until told to stop (or until
    process ``parent_pid``, the server, is gone; None: only the connection's end)."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s replica-{index} %(name)s: %(message)s")
    asyncio.run(_serve(conn, model, engine_kwargs, parent_pid))
    conn.close()
