"""The asyncio API: a step loop on its own thread, output deltas as async iterators.

Callers' requests reach the engine thread as typed commands (:mod:`livelm.engine.engine_commands`),
applied between two steps of the :class:`~livelm.engine.engine.Engine`; input streams
(:mod:`livelm.engine.input_stream`) reach it through their ``StreamEngine`` protocol,
which AsyncEngine implements.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from livelm.core.kv_policy import FULL, KVPolicy
from livelm.core.request_options import RequestOptions
from livelm.engine.engine import Engine, EngineStats, make_engine_config
from livelm.engine.engine_commands import (
    Abort,
    AbortAll,
    AddRequest,
    CloseSession,
    CloseStream,
    Command,
    CommandQueue,
    Fork,
    Join,
    OpenStream,
    SetPaused,
    Stop,
    UpdateStream,
    UpdateWeights,
)
from livelm.engine.errors import EngineDeadError
from livelm.engine.fork import Branch, ForkResult
from livelm.engine.input_stream import InputStream, StreamClosedError
from livelm.kernels.cpu_memory import release_free_memory
from livelm.models.weight_update import check_mode
from livelm.outputs import RequestOutput
from livelm.runner.tensor_parallel import TensorParallelError
from livelm.sampling_params import SamplingParams
from livelm.structured_output import StructuredOutput

logger = logging.getLogger("livelm")

# The longest idle wait of the engine thread: a far-off wakeup (a session TTL of 1e10 s)
# must not overflow the wait, and waking once an hour to recompute costs nothing.
_MAX_IDLE_WAIT_S = 3600.0
_RECOVERY_PAUSE_S = 0.05  # after a loop iteration failed: never spin on a failure
# Iterations failing in a row (the first ended everything in flight) that mean the loop
# itself is broken: it stops then, and says so (EngineDeadError, /health 503).
_MAX_FAILED_ITERATIONS = 3
# Idle this long after a step, the engine thread gives free heap memory back to the OS;
# while it stays idle it trims again this often, for memory freed by requests that never
# reached the engine (a huge prompt tokenized in a server thread and refused).
_IDLE_TRIM_AFTER_S = 1.0
_IDLE_TRIM_EVERY_S = 30.0
# An engine that never goes idle (steady traffic) trims between two steps this often: a
# 30-minute soak at load 3-4 never idled and its RSS grew 8.4% until the first idle trim
# took it back to 1.3% above the 5-minute mark. A trim costs 8-44 ms, once a minute.
_BUSY_TRIM_EVERY_S = 60.0


class _IdleTrim:
    """When the idle engine thread should call :func:`release_free_memory`."""

    def __init__(self) -> None:
        self.idle_since: float | None = None  # when the engine last ran out of work
        self.trimmed_at = time.monotonic()
        self.stepped = False  # a step ran since the last trim

    def busy(self) -> None:
        """A step is about to run."""
        self.idle_since, self.stepped = None, True

    def seconds_to_trim(self, now: float) -> float:
        """Seconds until the next trim is due (<= 0: now); the idle wait wakes by then."""
        if self.idle_since is None:
            self.idle_since = now
        due = max(self.idle_since + _IDLE_TRIM_AFTER_S,
                  now if self.stepped else self.trimmed_at + _IDLE_TRIM_EVERY_S)
        return due - now

    def due_while_busy(self, now: float) -> bool:
        """True when steps have run without a trim for ``_BUSY_TRIM_EVERY_S``."""
        return self.stepped and now - self.trimmed_at >= _BUSY_TRIM_EVERY_S

    def trim(self) -> None:
        """Release free memory now."""
        release_free_memory()
        self.trimmed_at, self.stepped = time.monotonic(), False


class _Failure:
    """Marks a request the engine could not run; the consumer re-raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


async def _in_own_thread(fn, *args):
    """``fn(*args)`` on a thread of its own that ends with it (not asyncio's executor): torch
    work there makes an OpenMP thread pool, which must not outlive the call, or every later
    step pays for a process with more pool threads than CPUs (see AsyncEngine.__init__)."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def work() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised by the awaiting caller
            done.set_exception(e)

    thread = threading.Thread(target=work, name="livelm-weights", daemon=True)
    thread.start()
    try:
        return await asyncio.wrap_future(done)
    finally:
        if done.done():
            thread.join()


class AsyncEngine:
    """Serve many concurrent requests from asyncio code.

    The engine's steps run continuously on a background thread while requests come and
    go; each ``generate()`` call receives its outputs through an asyncio queue, so the
    event loop is never blocked by model computation. Keyword arguments are
    :class:`livelm.config.EngineConfig` fields.
    """

    def __init__(self, model: str | None = None, served_model_name: str | None = None, **kwargs) -> None:
        config = make_engine_config(model, kwargs)
        if config.data_parallel_size > 1:
            raise ValueError("AsyncEngine is one engine: for data_parallel_size > 1 use "
                             "livelm.serving.DataParallelEngine (or livelm.serving.make_async_engine)")
        self._commands = CommandQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # Open input streams, by id: created on the caller's loop, read by the engine thread
        # (progress and idle checks), removed by whichever side closes them.
        self._input_streams: dict[str, InputStream] = {}
        # Engine thread only: streams open in the core -> last computed count reported.
        self._open_in_core: dict[str, int] = {}
        self._stream_ids = iter(range(1 << 62))
        self._stopping = False
        self._idle_trim = _IdleTrim()  # engine thread only
        self._dead_reason: str | None = None  # set once the engine thread stopped
        # RL serving (docs/rl.md). One update at a time (staging reads the live weights);
        # engine thread only: paused generation, and a "wait" update held until drained.
        self._update_lock = threading.Lock()
        self._paused = False
        self._pending_update: UpdateWeights | None = None
        # The engine is built on the thread that runs its steps, so all of its torch work
        # (load, packing, warm-up, steps) runs on one OpenMP thread pool: libgomp throttles
        # the spin-wait of every pool once a process has more pool threads than CPUs, and a
        # second pool made by loading on the caller's thread doubled the time of a decode
        # step (measured: 7.2 ms on one pool, 14.5 ms with two; docs/serving.md).
        built: concurrent.futures.Future[Engine] = concurrent.futures.Future()
        self._start_stepping = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(config, served_model_name, built),
                                        name="livelm-engine", daemon=True)
        self._thread.start()
        self._engine = built.result()  # the engine's own errors (bad model, bad config) raise here
        self.tokenizer = self._engine.tokenizer
        self.model_name = self._engine.model_name
        self.max_model_len = self._engine.max_model_len
        self.config = self._engine.config
        self.max_num_seqs = self.config.max_num_seqs
        self._stats = self._engine.stats()
        self._start_stepping.set()

    # ---------------------------------------------------------------- public API

    @property
    def model_dir(self) -> str:
        """The local directory the model (and its tokenizer) was loaded from."""
        return str(self._engine.model_dir)

    @property
    def token_id_limit(self) -> int:
        """Token ids the engine accepts are below this (the larger of the model's
        embedding rows and the tokenizer's vocabulary, as ``Engine.validate`` checks)."""
        return max(self._engine.model_config.vocab_size, len(self.tokenizer))

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV cache holds."""
        return self._engine.scheduler.kv_capacity_tokens

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Prompt token ids of a conversation, through the model's chat template."""
        return self._engine.chat_ids(messages)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt."""
        return self._engine.prompt_ids(prompt)

    async def generate(
        self,
        prompt: str | list[int] | AsyncIterable[str | bytes | list[int]],
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

        ``prompt`` may also be an async iterable of chunks (text, UTF-8 bytes or token
        ids): each chunk is prefilled as it arrives, and the reply starts when the iterable
        ends (see :meth:`open_stream` for replying before the input ends).
        """
        options = RequestOptions.from_extra(params.extra, session_id, session_ttl)
        if isinstance(prompt, AsyncIterable):
            async with self.open_stream(cache_salt=options.cache_salt, kv_policy=options.kv_policy) as stream:
                async for chunk in prompt:
                    stream.append(chunk)
                stream.close_input()
                async for out in stream.generate(params, request_id=request_id, options=options):
                    yield out
            return
        async for out in self.generate_ids(prompt, params, request_id or self.new_request_id(), options=options):
            yield out

    def new_request_id(self) -> str:
        """A request id unique within this engine (thread-safe)."""
        return self._engine.new_request_id()

    async def generate_ids(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        rid: str,
        fork_from: str | None = None,
        prompt_text: str | None = None,
        options: RequestOptions | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """:meth:`generate` for one request id; ``fork_from`` names the input stream whose
        KV the prompt (token ids) starts with, ``prompt_text`` the text to report for it,
        ``options`` its session and salt (default: read from ``params.extra``)."""
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        self._check_alive()
        if options is None:
            options = RequestOptions.from_extra(params.extra)
        if params.structured is not None and fork_from is None:
            # Compiled here, in a worker thread (cached for the engine thread's own check),
            # so a large new schema does not stall every other request's step. Not for a
            # reply to streamed input: its prompt is the input as it is at this call.
            await asyncio.to_thread(self.check_structured, params.structured)
        if rid in self._streams:
            # Checked here, not only by the engine thread: the output queue is keyed by the
            # id, and a second request under it would take the first one's outputs.
            raise ValueError(f"request id {rid!r} is already in use")
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (loop, stream)
        if self._dead_reason is not None:  # it died meanwhile, maybe before seeing this stream
            self._streams.pop(rid, None)
            self._check_alive()
        # A reply rides in the same batch as the stream updates made just before it.
        self._commands.send(AddRequest(rid, prompt, params, options, fork_from, prompt_text),
                            batch=fork_from is not None)
        # aclosing: leaving this iterator early closes the inner one at once (its finally
        # aborts the request and frees its KV), not whenever it is garbage-collected.
        async with contextlib.aclosing(self._outputs(rid, stream)) as outputs:
            async for item in outputs:
                yield item

    async def close_session(self, session_id: str) -> bool:
        """Release a session's pinned KV now; False when the session is unknown."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._commands.send(CloseSession(session_id, loop, done))
        return await done

    # ------------------------------------------------------------ input streams

    def open_stream(self, stream_id: str | None = None, cache_salt: str | None = None,
                    kv_policy: KVPolicy = FULL) -> InputStream:
        """Open a streamed prompt (call from a running event loop); see :class:`InputStream`.
        Under ``kv_policy`` "sinks" the stream keeps its sink tokens and a rolling window
        and runs without end (docs/attention_sinks.md); replies to it share its policy.

        Raises ValueError when ``max_input_streams`` streams are already open, the id is
        taken or the engine cannot serve ``kv_policy``. Close it (``await stream.close()`` or ``async with``) to free its KV; an
        idle stream is closed after ``stream_idle_timeout_s`` seconds.
        """
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        self._check_alive()
        limit = self.config.max_input_streams
        if len(self._input_streams) >= limit:
            raise ValueError(
                f"too many open input streams ({limit}, the max_input_streams limit): close one first"
            )
        sid = stream_id or f"stream-{next(self._stream_ids)}"
        if sid in self._input_streams:
            raise ValueError(f"input stream id {sid!r} is already in use")
        self._engine.check_kv_policy(kv_policy)  # reads the configuration only: any thread
        stream = InputStream(self, sid, cache_salt, kv_policy)
        self._input_streams[sid] = stream
        self._commands.send(OpenStream(sid, cache_salt, kv_policy))
        return stream

    def get_stream(self, stream_id: str) -> InputStream | None:
        """The open input stream with that id, if any."""
        return self._input_streams.get(stream_id)

    @property
    def num_input_streams(self) -> int:
        """Input streams open now."""
        return len(self._input_streams)

    def check_structured(self, structured: StructuredOutput | None) -> None:
        """Raise ValueError (saying what is wrong) unless the constraint compiles for this
        model. Cached, and safe from any thread while the engine thread runs: the server
        calls it off its event loop (``asyncio.to_thread``) before a response starts, so a
        large schema compiles there and the engine thread finds it in the cache."""
        self._engine.check_structured(structured)

    def check_kv_policy(self, policy: KVPolicy) -> None:
        """ValueError unless the engine can serve ``policy`` (reads the configuration only)."""
        self._engine.check_kv_policy(policy)

    def check_stream_input(self, token_ids: list[int], kv_policy: KVPolicy = FULL) -> None:
        """ValueError unless a stream may hold ``token_ids`` (vocabulary and length)."""
        self._engine.check_stream_input(token_ids, kv_policy)

    def update_stream(self, stream_id: str, keep: int, append: list[int], close: bool) -> None:
        """An input stream's change, sent on by :class:`InputStream` (use its methods)."""
        self._commands.send(UpdateStream(stream_id, keep, append, close), batch=True)

    def close_stream(self, stream_id: str) -> None:
        """Free a closed input stream's KV; called by ``InputStream.close`` (use that)."""
        self._input_streams.pop(stream_id, None)
        self._commands.send(CloseStream(stream_id))

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe, idempotent); its KV blocks are freed next step."""
        self._commands.send(Abort(request_id))

    def stats(self) -> EngineStats:
        """Load as of the last engine step."""
        return self._stats

    @property
    def is_alive(self) -> bool:
        """True while the engine thread runs its step loop; False once it stopped (shut
        down, or died: then every request in flight got an :class:`EngineDeadError`, and
        new ones are refused with one)."""
        return self._dead_reason is None and self._thread.is_alive()

    @property
    def dead_reason(self) -> str | None:
        """Why the engine thread stopped; None while it runs."""
        if self._dead_reason is None and not self._thread.is_alive():
            return "the engine thread is not running"
        return self._dead_reason

    def _check_alive(self) -> None:
        if not self.is_alive:
            raise EngineDeadError(f"the engine stopped: {self.dead_reason}")

    @property
    def stopping(self) -> bool:
        """True once :meth:`shutdown` began: new requests are refused (RuntimeError), and
        a request that ends with ``finish_reason="abort"`` from then on was ended by it."""
        return self._stopping

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop taking requests, let those in flight finish for up to ``drain_timeout_s``
        seconds, then abort the rest (their last output has ``finish_reason="abort"``),
        close the input streams and stop the engine thread. Calling it again is harmless."""
        self._stopping = True
        deadline = time.monotonic() + drain_timeout_s
        while self._streams and time.monotonic() < deadline and self._thread.is_alive():
            await asyncio.sleep(0.01)
        if self._thread.is_alive():
            self._commands.send(Stop())
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # ------------------------------------------------------------- RL serving

    @property
    def weight_version(self) -> int:
        """Version of the weights in use: 0 as loaded, one more per update."""
        return self._engine.weight_version

    @property
    def paused(self) -> bool:
        """True while generation is paused (:meth:`pause`)."""
        return self._paused

    async def update_weights(self, weights: str | Path | Mapping | Iterable, mode: str = "continue") -> int:
        """Load new weights without a restart; returns the new weight version.

        ``weights``: a path (model directory, ``.safetensors`` or ``.gguf`` file of the same
        architecture) or a name -> tensor mapping (a subset is fine). They are read and
        checked off the engine thread while it keeps serving; a malformed update raises
        ValueError and changes nothing. ``mode`` (docs/rl.md): ``"continue"`` recomputes
        the KV of the requests in flight with the new weights and goes on, ``"wait"`` lets
        started requests finish on the old weights (new ones wait), ``"abort"`` ends them
        (``finish_reason="abort"``, ``stop_reason="weight_update"``).
        """
        check_mode(mode)
        self._check_alive()
        return await _in_own_thread(self._update_blocking, lambda: self._engine.stage_weights(weights), mode)

    async def join_update_group(self, host: str, port: int, rank: int = 1, world_size: int = 2,
                                backend: str = "gloo", timeout_s: float = 600.0) -> None:
        """Join a trainer's weight-update group (models/weight_transfer.py: the trainer is
        rank 0, a ``WeightSender``); returns once every rank joined."""
        self._check_alive()
        await _in_own_thread(self._engine.join_update_group, host, port, rank, world_size, backend, timeout_s)

    async def update_weights_from_group(self, mode: str = "continue") -> int:
        """Receive one update the trainer broadcasts (``WeightSender.send``) and apply it
        like :meth:`update_weights`. Received into staging buffers: a trainer that dies
        mid-broadcast raises here and leaves the weights as they were."""
        check_mode(mode)
        self._check_alive()
        return await _in_own_thread(self._update_blocking, self._engine.receive_weights, mode)

    def _update_blocking(self, stage, mode: str) -> int:
        with self._update_lock:
            staged = stage()
            done: concurrent.futures.Future = concurrent.futures.Future()
            self._commands.send(UpdateWeights(staged, mode, done))
            if not self.is_alive:
                self._resolve_lost(done)
            return done.result()

    def _resolve_lost(self, done: concurrent.futures.Future) -> None:
        if not done.done():
            done.set_exception(EngineDeadError(f"the engine stopped: {self.dead_reason}"))

    async def pause(self) -> None:
        """Pause generation: no engine step runs once this returns (requests stay, new ones
        queue). Weight updates and aborts still apply."""
        await self._ask(lambda done: SetPaused(True, done))

    async def resume(self) -> None:
        """Resume generation after :meth:`pause`."""
        await self._ask(lambda done: SetPaused(False, done))

    async def abort_all(self) -> int:
        """Abort every request in flight (``finish_reason="abort"``); returns how many."""
        return await self._ask(AbortAll)

    async def fork(
        self, request_id: str, branches: list[Branch], branch_ids: list[str] | None = None
    ) -> tuple[ForkResult, list[AsyncIterator[RequestOutput]]]:
        """Fork a running request into branches at its current position (docs/rl.md).

        Returns the fork (the parent's tokens at the fork point, the branch ids) and one
        output iterator per branch (like :meth:`generate`'s: leaving one early aborts that
        branch). The branches start on the parent's KV (nothing recomputed); the parent's
        own iterator waits until :meth:`join`. ValueError for a request that is not running
        (unknown, finished, forked already), a branch count out of range or a bad branch.
        """
        self._check_alive()
        if branch_ids is None:
            tag = self.new_request_id()
            count = len(branches) if isinstance(branches, list | tuple) else 1
            branch_ids = [f"{request_id}.{tag}.{i}" for i in range(count)]
        loop = asyncio.get_running_loop()
        queues = []
        for bid in branch_ids:
            if not isinstance(bid, str) or bid in self._streams:
                raise ValueError(f"branch id {bid!r} is already in use")
        for bid in branch_ids:
            queue: asyncio.Queue = asyncio.Queue()
            self._streams[bid] = (loop, queue)
            queues.append(queue)
        try:
            result = await self._ask(lambda done: Fork(request_id, branches, list(branch_ids), done))
        except BaseException:
            for bid in branch_ids:
                self._streams.pop(bid, None)
            raise
        return result, [self._outputs(bid, q) for bid, q in zip(branch_ids, queues, strict=True)]

    async def join(
        self,
        request_id: str,
        branch_ids: list[str] | None = None,
        separator: str | list[int] = "",
        prefix: str | list[int] = "",
        suffix: str | list[int] = "",
        include_branch_prompts: bool = True,
    ) -> list[int]:
        """Resume a forked request: ``prefix``, each branch's suffix prompt and output (in
        ``branch_ids`` order, ``separator`` between two), then ``suffix`` are appended to its
        context, and its :meth:`generate` iterator goes on. A branch still running is
        aborted first. Only the appended tokens are computed. Returns their ids."""
        options = dict(branch_ids=branch_ids, separator=separator, prefix=prefix, suffix=suffix,
                       include_branch_prompts=include_branch_prompts)
        return await self._ask(lambda done: Join(request_id, options, done))

    async def _outputs(self, rid: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """The deltas of request ``rid`` from its queue (already registered in _streams)."""
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

    async def _ask(self, make):
        self._check_alive()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.send(make(done))
        if not self.is_alive:
            self._resolve_lost(done)
        return await asyncio.wrap_future(done)

    # ------------------------------------------------------------- engine thread

    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self._engine.abort(rid)

    def _abort_in_engine(self, rid: str) -> None:
        out = self._engine.abort(rid)
        if out is not None:
            self._deliver(rid, out)

    def _apply_command(self, cmd: Command) -> bool:
        """One command (engine thread); False for stop."""
        engine = self._engine
        match cmd:
            case AddRequest(rid, prompt, params, options, fork_from, prompt_text):
                if rid not in self._streams:
                    return True  # the caller already gave up
                try:
                    if fork_from is not None and fork_from not in self._open_in_core:
                        raise StreamClosedError(f"stream {fork_from!r} is closed")
                    if prompt_text is None:
                        engine.add(rid, prompt, params, fork_from=fork_from, options=options)
                    else:
                        engine.add(rid, prompt_text, params, prompt_token_ids=prompt, fork_from=fork_from,
                                   options=options)
                except Exception as e:  # validation errors go back to the caller
                    self._deliver(rid, _Failure(e))
            case OpenStream(sid, salt, kv_policy):
                engine.open_input_stream(sid, salt, kv_policy)
                self._open_in_core[sid] = 0
            case UpdateStream(sid, keep, append, close):
                if sid in self._open_in_core:
                    try:
                        engine.update_input_stream(sid, keep, append, close)
                    except ValueError as e:  # checked by the caller already; never expected
                        logger.error("closing input stream %s: %s", sid, e)
                        self._close_stream_in_core(sid, f"invalid input: {e}")
            case CloseStream(sid):
                self._close_stream_in_core(sid, None)
            case Abort(rid):
                self._abort_in_engine(rid)
            case CloseSession(session_id, loop, done):
                closed = engine.scheduler.close_session(session_id)
                try:
                    loop.call_soon_threadsafe(_resolve, done, closed)
                except RuntimeError:  # the caller's loop is gone
                    pass
            case UpdateWeights(_, mode, done):
                if self._pending_update is not None:
                    raise RuntimeError("a weight update is pending already")  # the lock prevents it
                self._pending_update = cmd
                if mode == "wait":
                    engine.scheduler.hold_new_requests = True
                self._apply_pending_update()
            case Fork(rid, branches, branch_ids, done):
                try:
                    result = engine.fork(rid, branches, branch_ids)
                except ValueError as e:
                    done.set_exception(e)
                else:
                    done.set_result(result)
            case Join(rid, options, done):
                try:
                    appended, moved = engine.join(rid, **options)
                except (ValueError, TypeError) as e:
                    done.set_exception(ValueError(str(e)) if isinstance(e, TypeError) else e)
                else:
                    for state, out in moved:
                        self._deliver(state.request_id, out)
                    done.set_result(appended)
            case SetPaused(paused, done):
                self._paused = paused
                done.set_result(None)
            case AbortAll(done):
                rids = list(engine.states)
                for rid in rids:
                    self._abort_in_engine(rid)
                done.set_result(len(rids))
            case Stop():
                for rid in list(engine.states):
                    self._abort_in_engine(rid)
                for sid in list(self._open_in_core):
                    self._close_stream_in_core(sid, "the engine shut down")
                return False
        return True

    def _apply_pending_update(self) -> None:
        """Apply the pending weight update once its mode allows (engine thread): at once,
        or for ``"wait"`` when no started request is left."""
        cmd = self._pending_update
        if cmd is None:
            return
        engine = self._engine
        if cmd.mode == "wait" and engine.scheduler.has_started_requests():
            return
        self._pending_update = None
        engine.scheduler.hold_new_requests = False
        try:
            moved = engine.apply_weights(cmd.staged, cmd.mode)
        except BaseException as e:
            cmd.done.set_exception(e)
            raise
        for state, out in moved:
            self._deliver(state.request_id, out)
        self._stats = engine.stats()
        cmd.done.set_result(engine.weight_version)

    def _close_stream_in_core(self, sid: str, reason: str | None) -> None:
        """Free a stream's KV (engine thread); ``reason`` tells its owner why, if not asked."""
        if self._open_in_core.pop(sid, None) is None:
            return
        self._engine.scheduler.finish_request(sid)
        stream = self._input_streams.pop(sid, None) if reason is not None else None
        if stream is not None:
            for rid in stream.active_generations:
                self._abort_in_engine(rid)
            stream.notify_closed(reason)

    def _publish_stream_progress(self) -> None:
        """Tell each stream whose prefill advanced how far it got (engine thread)."""
        engine = self._engine
        for sid, reported in self._open_in_core.items():
            stream = self._input_streams.get(sid)
            if stream is None:
                continue
            computed = engine.input_stream_progress(sid)
            if computed != reported:
                self._open_in_core[sid] = computed
                stream.notify_progress(computed)

    def _expire_idle_streams(self) -> float | None:
        """Close streams idle too long; returns seconds until the next could expire."""
        timeout = self.config.stream_idle_timeout_s
        now = time.monotonic()
        soonest: float | None = None
        for sid in list(self._open_in_core):
            stream = self._input_streams.get(sid)
            if stream is None or stream.active_generations:
                continue  # a reply in flight counts as activity
            left = stream.last_activity + timeout - now
            if left <= 0:
                logger.info("closing input stream %s: idle for %.0fs", sid, timeout)
                self._close_stream_in_core(sid, f"idle for more than {timeout:g}s (stream_idle_timeout_s)")
            elif soonest is None or left < soonest:
                soonest = left
        return soonest

    def _run(self, config, served_model_name: str | None, built: concurrent.futures.Future) -> None:
        """The engine thread: build the engine (its error goes to the constructor), then
        the step loop until Stop; should it ever end otherwise, everyone in flight gets an
        error at once and new requests are refused."""
        try:
            engine = Engine(config, served_model_name)
        except BaseException as e:  # noqa: BLE001 - raised again by the constructor
            built.set_exception(e)
            return
        built.set_result(engine)
        self._start_stepping.wait()
        try:
            self._loop()
            reason = "the engine shut down"
        except BaseException as e:  # noqa: BLE001 - the thread ends here either way
            logger.critical("the engine loop died; failing every request", exc_info=True)
            reason = f"the engine loop died: {type(e).__name__}: {e}"
        self._die(reason)
        engine.close()  # its tensor-parallel workers, if any

    def _loop(self) -> None:
        failed = 0
        while True:
            try:
                if not self._turn():
                    return
                failed = 0
            except TensorParallelError:
                raise  # a rank is gone: the engine stops, everyone in flight is told why
            except Exception as e:
                # Nothing to blame a request for (Engine.step already isolates the requests
                # a step fails for): end all in flight, so no broken state stays, and go on,
                # unless that did not help.
                failed += 1
                if failed >= _MAX_FAILED_ITERATIONS:
                    raise
                logger.exception("engine loop failed; aborting in-flight requests")
                self._fail_in_flight(RuntimeError(f"engine step failed: {e}"), f"the engine step failed: {e}")
                self._commands.wait(_RECOVERY_PAUSE_S)

    def _turn(self) -> bool:
        """Commands, then one step (or an idle wait); False once told to stop."""
        engine, commands, scheduler = self._engine, self._commands, self._engine.scheduler
        for cmd in commands.drain():
            if not self._apply_command_safely(cmd):
                self._stats = engine.stats()
                return False
        if self._pending_update is not None:
            self._apply_pending_update()
        if self._paused:
            self._stats = engine.stats()
            commands.wait(_MAX_IDLE_WAIT_S)  # a command (resume) wakes it
            return True
        if self._open_in_core:
            self._publish_stream_progress()
        stream_timeout = self._expire_idle_streams() if self._open_in_core else None
        if not scheduler.has_pending_work():
            scheduler.expire_sessions()
            self._stats = engine.stats()
            # Idle with session pins or open streams: wake when the next one expires,
            # so its blocks (and the stats) are released on time even if nothing comes.
            timeouts = [t for t in (scheduler.seconds_to_next_pin_expiry(), stream_timeout) if t is not None]
            trim = self._idle_trim
            if trim.seconds_to_trim(time.monotonic()) <= 0:
                trim.trim()
            timeouts.append(trim.seconds_to_trim(time.monotonic()))
            commands.wait(min(max(min(timeouts), 0.01), _MAX_IDLE_WAIT_S))
            return True
        if self._idle_trim.due_while_busy(time.monotonic()):
            self._idle_trim.trim()
        self._idle_trim.busy()
        moved = engine.step()
        if engine.failed_streams:
            failed, engine.failed_streams = engine.failed_streams, []
            for sid, error in failed:
                self._close_stream_in_core(sid, f"the input stream failed: {error}")
        if engine.last_step_was_empty:
            # Waiting requests that cannot start yet (KV full, a fork waiting for its
            # stream) and nothing running: do not spin, a command or an output wakes us.
            commands.wait(0.005)
        self._stats = engine.stats()  # first, so a caller woken by its output sees it
        for state, out in moved:
            self._deliver(state.request_id, _Failure(state.error) if state.error is not None else out)
        if self._open_in_core:
            self._publish_stream_progress()
        return True

    def _apply_command_safely(self, cmd: Command) -> bool:
        """:meth:`_apply_command`; a command that fails is answered to its sender, if any."""
        try:
            return self._apply_command(cmd)
        except Exception as e:
            logger.exception("engine command %s failed", type(cmd).__name__)
            match cmd:
                case Stop():
                    return False  # _run ends what is left
                case OpenStream(sid, _):  # not in the core: only its owner to tell
                    stream = self._input_streams.pop(sid, None)
                    if stream is not None:
                        stream.notify_closed(f"the input stream could not be opened: {e}")
                case UpdateStream(sid, _, _, _):
                    self._close_stream_in_core(sid, f"the input stream failed: {e}")
                case CloseSession(_, loop, done):
                    try:
                        loop.call_soon_threadsafe(_resolve, done, False)
                    except RuntimeError:
                        pass
                case UpdateWeights(_, _, done) | SetPaused(_, done) | AbortAll(done) | Fork(_, _, _, done) | Join(
                    _, _, done
                ):
                    if self._pending_update is cmd:
                        self._pending_update = None
                        self._engine.scheduler.hold_new_requests = False
                    if not done.done():
                        done.set_exception(e)
            return True

    def _fail_in_flight(self, error: Exception, stream_reason: str) -> None:
        """End every request (``error`` to its caller) and input stream (engine thread)."""
        for rid in list(self._engine.states):
            self._engine.abort(rid)
            self._deliver(rid, _Failure(error))
        for sid in list(self._open_in_core):
            self._close_stream_in_core(sid, stream_reason)
        self._stats = self._engine.stats()

    def _die(self, reason: str) -> None:
        """The engine thread is ending: refuse new work and fail everything still waiting
        (best effort: the engine's state may be what broke)."""
        self._dead_reason = reason
        self._stats = replace(self._stats, engine_alive=False)
        error = EngineDeadError(f"the engine stopped: {reason}")
        try:
            self._fail_in_flight(error, f"the engine stopped: {reason}")
            self._stats = replace(self._stats, engine_alive=False)
        except BaseException:  # noqa: BLE001
            logger.exception("could not free the requests of the stopped engine")
        if self._pending_update is not None:
            self._resolve_lost(self._pending_update.done)
        for cmd in self._commands.drain():  # unanswered questions get an answer
            if isinstance(cmd, CloseSession):
                try:
                    cmd.loop.call_soon_threadsafe(_resolve, cmd.done, False)
                except RuntimeError:
                    pass
            elif isinstance(cmd, UpdateWeights | SetPaused | AbortAll | Fork | Join):
                self._resolve_lost(cmd.done)
        for rid in list(self._streams):  # requests the engine never saw
            self._deliver(rid, _Failure(error))
        for stream in list(self._input_streams.values()):
            stream.notify_closed(f"the engine stopped: {reason}")
