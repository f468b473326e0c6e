"""The asyncio API: a step loop on its own thread, output deltas as async iterators."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from livelm.engine.engine_core import EngineStats
from livelm.engine.frontend import Frontend, make_engine_config, with_session
from livelm.outputs import RequestOutput
from livelm.sampling_params import SamplingParams

logger = logging.getLogger("livelm")


class _Failure:
    """Marks a request the engine could not run; the consumer re-raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


class AsyncEngine:
    """Serve many concurrent requests from asyncio code.

    The engine's steps run continuously on a background thread while requests come and
    go; each ``generate()`` call receives its outputs through an asyncio queue, so the
    event loop is never blocked by model computation. Keyword arguments are
    :class:`livelm.config.EngineConfig` fields.
    """

    def __init__(self, model: str | None = None, served_model_name: str | None = None, **kwargs) -> None:
        self._frontend = Frontend(make_engine_config(model, kwargs), served_model_name)
        self.tokenizer = self._frontend.tokenizer
        self.model_name = self._frontend.model_name
        self.max_model_len = self._frontend.max_model_len
        self.config = self._frontend.config
        self.max_num_seqs = self.config.max_num_seqs
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = self._frontend.stats()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="livelm-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- public API

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Prompt token ids of a conversation, through the model's chat template."""
        return self._frontend.chat_ids(messages)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt."""
        return self._frontend.prompt_ids(prompt)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        session_id: str | None = None,
        session_ttl: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield output deltas of one request; the last one has ``finished=True``.

        Invalid requests raise ValueError before anything is yielded. Leaving the loop
        early (break, cancellation, a closed client connection) aborts the request.
        ``session_id`` makes the request a turn of that session: its KV stays pinned for
        ``session_ttl`` seconds (default: the engine's ``session_ttl_s``) after it
        finishes, so the next turn prefills only what it adds (the same as
        ``SamplingParams.extra["session_id"]`` / ``["session_ttl"]``).
        """
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        params = with_session(params, session_id, session_ttl)
        rid = request_id or self._frontend.new_request_id()
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (loop, stream)
        self._send(("add", rid, prompt, params))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, _Failure):
                    finished = True
                    raise item.error
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.abort(rid)

    async def close_session(self, session_id: str) -> bool:
        """Release a session's pinned KV now; False when the session is unknown."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._send(("close_session", session_id, loop, done))
        return await done

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe, idempotent); its KV blocks are freed next step."""
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        """Load as of the last engine step."""
        return self._stats

    async def shutdown(self) -> None:
        """Abort what is in flight and stop the engine thread."""
        self._stopping = True
        self._send(("stop",))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # ------------------------------------------------------------- engine thread

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self._frontend.abort(rid)

    def _drain_commands(self) -> bool:
        fe = self._frontend
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                if rid not in self._streams:
                    continue  # the caller already gave up
                try:
                    fe.add(rid, prompt, params)
                except Exception as e:  # validation errors go back to the caller
                    self._deliver(rid, _Failure(e))
            elif cmd[0] == "abort":
                out = fe.abort(cmd[1])
                if out is not None:
                    self._deliver(cmd[1], out)
            elif cmd[0] == "close_session":
                _, session_id, loop, done = cmd
                closed = fe.close_session(session_id)
                try:
                    loop.call_soon_threadsafe(_resolve, done, closed)
                except RuntimeError:  # the caller's loop is gone
                    pass
            elif cmd[0] == "stop":
                for rid in list(fe.states):
                    out = fe.abort(rid)
                    if out is not None:
                        self._deliver(rid, out)
                return False

    def _loop(self) -> None:
        fe = self._frontend
        while True:
            if not self._drain_commands():
                self._stats = fe.stats()
                return
            if not fe.has_unfinished():
                fe.core.expire_sessions()
                self._stats = fe.stats()
                # Idle with session pins: wake when the next one expires, so its blocks
                # (and the stats) are released on time even if no request arrives.
                timeout = fe.core.seconds_to_next_pin_expiry()
                self._wakeup.wait(None if timeout is None else max(timeout, 0.01))
                self._wakeup.clear()
                continue
            try:
                moved = fe.step()
            except Exception as e:  # a failed step must not leave callers hanging
                logger.exception("engine step failed; aborting in-flight requests")
                for rid in list(fe.states):
                    fe.abort(rid)
                    self._deliver(rid, _Failure(RuntimeError(f"engine step failed: {e}")))
                self._stats = fe.stats()
                continue
            for state, out in moved:
                self._deliver(state.request_id, out)
            self._stats = fe.stats()
