"""The idle engine gives free heap memory back to the OS: when it trims, and that it does."""

from __future__ import annotations

import asyncio
import time

from livelm import SamplingParams
from livelm.engine import async_engine
from livelm.engine.async_engine import (
    _BUSY_TRIM_EVERY_S,
    _IDLE_TRIM_AFTER_S,
    _IDLE_TRIM_EVERY_S,
    AsyncEngine,
    _IdleTrim,
)
from livelm.kernels.cpu_memory import release_free_memory


def test_release_free_memory_runs_on_glibc():
    assert release_free_memory() is True  # these machines run glibc


def test_trim_is_due_soon_after_a_step_then_rarely():
    trim = _IdleTrim()
    t0 = trim.trimmed_at
    # Idle since start, no step yet: the next trim is a full period after the last one.
    assert trim.seconds_to_trim(t0) == _IDLE_TRIM_EVERY_S
    trim.busy()  # a step ran
    assert trim.seconds_to_trim(t0 + 5.0) == _IDLE_TRIM_AFTER_S  # idle from now on
    assert trim.seconds_to_trim(t0 + 5.0 + _IDLE_TRIM_AFTER_S) <= 0
    trim.trim()
    now = trim.trimmed_at
    assert abs(trim.seconds_to_trim(now) - _IDLE_TRIM_EVERY_S) < 1e-6
    trim.busy()  # work again: the idle clock restarts
    assert trim.seconds_to_trim(now + 0.5) == _IDLE_TRIM_AFTER_S


def test_an_engine_that_never_idles_trims_between_steps_once_a_period():
    trim = _IdleTrim()
    t0 = trim.trimmed_at
    assert not trim.due_while_busy(t0 + 10 * _BUSY_TRIM_EVERY_S)  # no step ran: nothing freed
    trim.busy()
    assert not trim.due_while_busy(t0 + _BUSY_TRIM_EVERY_S - 1.0)
    assert trim.due_while_busy(t0 + _BUSY_TRIM_EVERY_S)
    trim.trim()
    assert not trim.due_while_busy(trim.trimmed_at + 1.0)  # the period restarts


def test_the_engine_trims_once_idle_after_work(llama_dir, monkeypatch):
    calls: list[float] = []
    monkeypatch.setattr(async_engine, "release_free_memory", lambda: calls.append(time.monotonic()) or True)

    async def main() -> None:
        engine = AsyncEngine(str(llama_dir))
        try:
            async for out in engine.generate("hello there", SamplingParams(max_tokens=4, temperature=0)):
                last = out
            assert last.finished
            done = time.monotonic()
            deadline = done + _IDLE_TRIM_AFTER_S + 5.0
            while not calls and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert calls, "the idle engine never released free memory"
            assert calls[-1] >= done + _IDLE_TRIM_AFTER_S - 0.1
        finally:
            await engine.shutdown()

    asyncio.run(main())
