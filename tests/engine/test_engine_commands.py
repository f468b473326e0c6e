"""AsyncEngine's two seams without a model: the command queue to its engine thread
(engine_commands.py) and the StreamEngine protocol an InputStream reaches it through."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from livelm.config import EngineConfig
from livelm.core.request_options import RequestOptions
from livelm.engine.engine_commands import (
    Abort,
    AddRequest,
    Batch,
    CloseStream,
    CommandQueue,
    Stop,
    UpdateStream,
)
from livelm.engine.input_stream import InputStream, StreamClosedError, StreamEngine
from livelm.outputs import CompletionOutput, RequestOutput
from livelm.sampling_params import SamplingParams

# ------------------------------------------------------------------ CommandQueue


def _add(rid: str) -> AddRequest:
    return AddRequest(rid, [1, 2], SamplingParams(), RequestOptions())


def test_commands_are_frozen_and_matched_by_type():
    cmd = UpdateStream("s", 3, [4], True)
    with pytest.raises(AttributeError):
        cmd.keep = 0  # type: ignore[misc]
    match cmd:
        case UpdateStream(sid, keep, append, close):
            assert (sid, keep, append, close) == ("s", 3, [4], True)
        case _:
            pytest.fail("no match")


def test_plain_commands_reach_the_engine_at_once_in_order():
    q = CommandQueue()
    q.send(Abort("a"))
    q.send(Stop())
    q.send(Abort("b"), batch=True)  # no running event loop: nothing to wait for
    assert list(q.drain()) == [Abort("a"), Stop(), Abort("b")]
    assert list(q.drain()) == []


def test_a_batch_waits_for_the_loop_and_gathers_what_follows():
    q = CommandQueue()

    async def main():
        q.send(UpdateStream("s", 0, [5], True), batch=True)
        q.send(_add("reply"))  # not a batch command, but it joins the one waiting
        q.send(CloseStream("s"))
        held = list(q.drain())  # the engine thread looks before the loop got control
        await asyncio.sleep(0)
        return held, list(q._queue.get_nowait() for _ in range(q._queue.qsize()))

    held, queued = asyncio.run(main())
    assert held == []
    # One queue item: the engine applies all three between two steps.
    assert queued == [Batch((UpdateStream("s", 0, [5], True), _add("reply"), CloseStream("s")))]


def test_a_command_from_another_thread_sends_the_waiting_batch_first():
    q = CommandQueue()

    async def main():
        q.send(UpdateStream("s", 0, [5], False), batch=True)
        t = threading.Thread(target=q.send, args=(Abort("x"),))
        t.start()
        t.join()
        now = list(q.drain())
        await asyncio.sleep(0)  # the loop's flush finds nothing left
        return now, list(q.drain())

    now, later = asyncio.run(main())
    assert now == [UpdateStream("s", 0, [5], False), Abort("x")] and later == []


def test_drain_unpacks_batches_and_stops_where_the_caller_stops():
    q = CommandQueue()
    q._queue.put(Batch((Abort("a"), Stop(), Abort("b"))))
    q.send(Abort("c"))
    seen = []
    for cmd in q.drain():
        seen.append(cmd)
        if isinstance(cmd, Stop):
            break
    assert seen == [Abort("a"), Stop()]
    assert list(q.drain()) == [Abort("c")]  # later items stay queued


def test_wait_wakes_on_a_command_and_rearms():
    q = CommandQueue()
    threading.Timer(0.05, q.send, args=(Abort("a"),)).start()
    t0 = time.monotonic()
    q.wait(10)
    assert time.monotonic() - t0 < 5
    t0 = time.monotonic()
    q.wait(0.05)  # the event was cleared: this one times out
    assert time.monotonic() - t0 >= 0.04


# --------------------------------------------------------- InputStream <-> engine


class FakeEngine:
    """A StreamEngine that records what the stream asks of it."""

    def __init__(self, pending_limit: int = 8) -> None:
        self.tokenizer = None  # token-id streams only
        self.config = EngineConfig(block_size=4, max_stream_pending_tokens=pending_limit)
        self.updates: list[tuple] = []
        self.closed: list[str] = []
        self.aborted: list[str] = []
        self.replies: list[tuple] = []
        self.release = asyncio.Event()
        self._ids = 0

    def new_request_id(self) -> str:
        self._ids += 1
        return f"req-{self._ids}"

    def check_stream_input(self, token_ids: list[int]) -> None:
        if any(t >= 100 for t in token_ids):
            raise ValueError("outside the vocabulary")

    def update_stream(self, stream_id, keep, append, close) -> None:
        self.updates.append((stream_id, keep, append, close))

    def close_stream(self, stream_id) -> None:
        self.closed.append(stream_id)

    def abort(self, request_id) -> None:
        self.aborted.append(request_id)

    async def generate_ids(self, prompt, params, rid, fork_from=None, prompt_text=None, options=None):
        self.replies.append((prompt, rid, fork_from, options))
        await self.release.wait()
        yield RequestOutput(rid, None, prompt, [CompletionOutput(0, "x", [7], finish_reason="length")], True)


async def _waiting_for_progress(stream: InputStream, notify, arg):
    """Wait for progress, then have another thread call ``notify(arg)``."""
    waiter = asyncio.ensure_future(stream.wait_progress())
    await asyncio.sleep(0)  # the waiter is now waiting
    threading.Thread(target=notify, args=(arg,)).start()
    return await asyncio.wait_for(waiter, 5)


def test_async_engine_implements_the_stream_engine_protocol():
    import inspect

    from livelm.engine.async_engine import AsyncEngine

    methods = [n for n, v in vars(StreamEngine).items() if not n.startswith("_") and callable(v)]
    assert {"update_stream", "close_stream", "check_stream_input", "generate_ids"} <= set(methods)
    for name in methods:
        want = list(inspect.signature(getattr(StreamEngine, name)).parameters)
        got = list(inspect.signature(getattr(AsyncEngine, name)).parameters)
        assert got[: len(want)] == want, name
    # The attributes the stream reads are set on every AsyncEngine.
    init = inspect.getsource(AsyncEngine.__init__)
    assert all(f"self.{attr} =" in init for attr in StreamEngine.__annotations__)


def test_feeding_sends_committed_changes_to_the_engine():
    async def main():
        eng = FakeEngine()
        stream = InputStream(eng, "s", None)
        stream.append([1, 2, 3])
        stream.append([4])
        stream.replace([1, 2, 9, 9])
        with pytest.raises(ValueError, match="vocabulary"):
            stream.append([100])
        stream.close_input()
        return eng, stream

    eng, stream = asyncio.run(main())
    assert eng.updates == [("s", 0, [1, 2, 3], False), ("s", 3, [4], False), ("s", 2, [9, 9], False),
                           ("s", 4, [], True)]
    assert stream.input_closed and stream.state().num_input_tokens == 4


def test_the_pending_limit_refuses_input_until_progress_is_notified():
    async def main():
        eng = FakeEngine(pending_limit=8)
        stream = InputStream(eng, "s", None)
        stream.append(list(range(6)))
        with pytest.raises(ValueError, match="max_stream_pending_tokens=8"):
            stream.append([1, 2, 3])
        # The engine thread reports progress; it lands on the stream's loop.
        state = await _waiting_for_progress(stream, stream.notify_progress, 6)
        stream.append([1, 2, 3])
        return eng, state

    eng, state = asyncio.run(main())
    assert state.num_computed_tokens == 6 and state.status == "waiting_for_input"
    assert eng.updates[-1] == ("s", 6, [1, 2, 3], False) and len(eng.updates) == 2


def test_a_reply_forks_the_stream_with_its_salt_and_the_params_session():
    async def main():
        eng = FakeEngine()
        stream = InputStream(eng, "s", "tenant")
        stream.append([1, 2, 3])
        params = SamplingParams(extra={"session_id": "conv", "cache_salt": "ignored"})
        gen = stream.generate(params, suffix=[4])
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.01)
        during = stream.active_generations
        eng.release.set()
        out = await task
        await gen.aclose()
        return eng, during, out, stream.active_generations

    eng, during, out, after = asyncio.run(main())
    prompt, rid, fork_from, options = eng.replies[0]
    assert prompt == [1, 2, 3, 4] and fork_from == "s" and rid == "req-1"
    assert options == RequestOptions(session_id="conv", cache_salt="tenant")
    assert during == ("req-1",) and after == () and out.finished


def test_closing_aborts_replies_and_frees_the_stream_once():
    async def main():
        eng = FakeEngine()
        stream = InputStream(eng, "s", None)
        stream.append([1, 2])
        gen = stream.generate(SamplingParams())
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.01)
        await stream.close()
        await stream.close()
        task.cancel()
        with pytest.raises(StreamClosedError, match="closed by its owner"):
            stream.append([3])
        return eng, stream

    eng, stream = asyncio.run(main())
    assert eng.aborted == ["req-1"] and eng.closed == ["s"] and stream.closed


def test_an_engine_side_close_reaches_the_stream_from_another_thread():
    async def main():
        eng = FakeEngine()
        stream = InputStream(eng, "s", None)
        stream.append([1])
        state = await _waiting_for_progress(stream, stream.notify_closed, "idle for too long")
        return eng, stream, state

    eng, stream, state = asyncio.run(main())
    assert state.closed and stream.closed_reason == "idle for too long"
    assert eng.closed == []  # the engine closed it: the stream does not send it back


def test_notifications_after_the_loop_closed_are_dropped():
    async def make():
        return InputStream(FakeEngine(), "s", None)

    stream = asyncio.run(make())  # asyncio.run closes the loop
    stream.notify_progress(3)
    stream.notify_closed("gone")
    assert stream.closed_reason is None
