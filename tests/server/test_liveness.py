"""Liveness that tells the truth (issue 23): a request cannot kill the engine loop, and if the
loop dies anyway, /health says so and every request gets a 503 at once instead of hanging.

Values that admission now refuses (a session TTL of 1e10 s) are put past it on purpose:
these tests are about what the loop does should one get through.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
from server_utils import scrape, serve, start_engine, stop_engine, wait_until

from livelm import SamplingParams
from livelm.core.request_options import RequestOptions
from livelm.engine.errors import EngineDeadError

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = [5, 6, 7, 8]


class _Fatal(BaseException):
    """Not an Exception: nothing in the loop may swallow it, so the thread ends."""


def _huge_ttl_options(session_id: str) -> RequestOptions:
    options = RequestOptions(session_id=session_id, session_ttl=60.0)
    object.__setattr__(options, "session_ttl", 1e10)  # past RequestOptions' own check
    return options


async def _tokens(engine, prompt, params, rid: str | None = None, options=None) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate_ids(prompt, params, rid or engine.new_request_id(), options=options):
        tokens += out.outputs[0].token_ids
    return tokens


def test_a_session_ttl_of_1e10_does_not_kill_the_loop(llama_dir, caplog):
    engine = start_engine(llama_dir)
    caplog.set_level(logging.WARNING, logger="livelm")
    try:
        async def run():
            first = await _tokens(engine, PROMPT, GREEDY, options=_huge_ttl_options("forever"))
            await asyncio.sleep(0.3)  # the loop goes idle and waits for that pin's expiry
            assert engine.is_alive, engine.dead_reason
            assert engine.stats().num_sessions == 1
            assert await _tokens(engine, PROMPT, GREEDY) == first  # and still serves
            assert await engine.close_session("forever")

        asyncio.run(run())
        # Not even one failed loop iteration (the generic recovery would hide it otherwise).
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        with serve(engine) as srv:
            r = httpx.get(f"{srv.url}/health")
            assert (r.status_code, r.json()) == (200, {"status": "ok"})
            assert scrape(srv.url)["livelm_engine_alive"] == 1
    finally:
        stop_engine(engine)


def test_a_dead_loop_turns_health_and_requests_into_503s(llama_dir):
    engine = start_engine(llama_dir)
    real_step = engine._engine.step
    steps = {"n": 0}

    def dying_step():
        steps["n"] += 1
        if steps["n"] == 5:
            raise _Fatal("injected fatal error")
        return real_step()

    engine._engine.step = dying_step
    with serve(engine) as srv:
        m = scrape(srv.url)
        assert m["livelm_engine_alive"] == 1 and m["livelm_last_step_timestamp_seconds"] == 0
        # A request in flight when the loop dies gets a 503 at once, not a hang.
        t0 = time.monotonic()
        r = httpx.post(f"{srv.url}/v1/completions", timeout=30,
                       json={"prompt": "hello there", "max_tokens": 50, "temperature": 0})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_stopped"
        assert "injected fatal error" in r.json()["error"]["message"]
        assert not engine.is_alive and "_Fatal" in engine.dead_reason

        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503
        assert health.json()["status"] == "error" and "injected fatal error" in health.json()["message"]

        # New requests: 503 JSON errors, promptly.
        for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 4}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 4})):
            r = httpx.post(f"{srv.url}{path}", json=body, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
        # Streamed: refused before the stream starts, with the same 503.
        with httpx.stream("POST", f"{srv.url}/v1/completions", timeout=30,
                          json={"prompt": "hi", "max_tokens": 4, "stream": True}) as r:
            body = r.read().decode()
            assert r.status_code == 503, body
        assert "engine_stopped" in body
        assert time.monotonic() - t0 < 20
        m = scrape(srv.url)
        assert m["livelm_engine_alive"] == 0 and m["livelm_last_step_timestamp_seconds"] > 0

        async def direct():
            with pytest.raises(EngineDeadError, match="the engine stopped"):
                await _tokens(engine, PROMPT, GREEDY)

        asyncio.run(direct())
    stop_engine(engine)  # harmless on a dead engine


def test_an_exception_in_the_loop_ends_what_is_in_flight_and_the_loop_goes_on(llama_dir):
    engine = start_engine(llama_dir)
    real = engine._engine.scheduler.has_pending_work
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected loop fault")
        return real()

    try:
        async def run():
            expected = await _tokens(engine, PROMPT, GREEDY)
            engine._engine.scheduler.has_pending_work = flaky
            calls["n"] = 0
            with pytest.raises(RuntimeError, match="injected loop fault"):
                await _tokens(engine, PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
            assert engine.is_alive
            assert await _tokens(engine, PROMPT, GREEDY) == expected

        asyncio.run(run())
    finally:
        engine._engine.scheduler.__dict__.pop("has_pending_work", None)
        stop_engine(engine)


def test_a_loop_that_keeps_failing_stops_and_says_so(llama_dir):
    engine = start_engine(llama_dir)

    def broken():
        raise RuntimeError("injected persistent fault")

    engine._engine.scheduler.has_pending_work = broken
    engine.abort("nothing")  # wakes the idle loop
    assert wait_until(lambda: not engine.is_alive)
    assert "injected persistent fault" in engine.dead_reason
    with serve(engine) as srv:
        r = httpx.get(f"{srv.url}/health")
        assert r.status_code == 503 and "injected persistent fault" in r.json()["message"]
    engine._engine.scheduler.__dict__.pop("has_pending_work")
    stop_engine(engine)


def test_a_look_alike_engine_without_is_alive_is_healthy(llama_dir):
    engine = start_engine(llama_dir)

    class LookAlike:
        def __getattr__(self, name: str):  # noqa: ANN204
            if name in ("is_alive", "dead_reason"):
                raise AttributeError(name)
            return getattr(engine, name)

    try:
        with serve(LookAlike()) as srv:
            r = httpx.get(f"{srv.url}/health")
            assert (r.status_code, r.json()) == (200, {"status": "ok"})
    finally:
        stop_engine(engine)


def test_idle_input_streams_do_not_count_as_running(llama_dir):
    engine = start_engine(llama_dir)
    try:
        with serve(engine) as srv:
            async def run():
                async with engine.open_stream() as stream:
                    stream.append([5, 6, 7, 8, 9, 10])
                    await stream.wait_prefilled(timeout=10)
                    assert wait_until(lambda: engine.stats().num_input_streams == 1)  # stats of the idle loop
                    assert engine.stats().num_input_streams == 1
                    assert engine.stats().num_running == 0
                    m = await asyncio.to_thread(scrape, srv.url)
                    assert m["livelm_num_requests_running"] == 0 and m["livelm_input_streams"] == 1

            asyncio.run(run())
            assert wait_until(lambda: engine.stats().num_input_streams == 0)
    finally:
        stop_engine(engine)
