"""Sessions: a turn's KV stays pinned for a TTL, so the next turn prefills only what it adds."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from oracle import hf_greedy, load_hf_model
from server_utils import scrape, serve, start_engine, stop_engine, wait_until

from livelm import SamplingParams
from livelm.config import CacheConfig, SchedulerConfig
from livelm.core.request import Request
from livelm.core.scheduler import Scheduler
from livelm.core.scheduler_output import ModelRunnerOutput, SampledToken
from livelm.engine.llm import LLM

BLOCK = 4


class FakeClock:
    """A clock tests move by hand (no sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------- the scheduler alone


def _scheduler(blocks=64, caching=True, ttl=30.0, clock=None) -> Scheduler:
    s = Scheduler(SchedulerConfig(64, 8, 512), CacheConfig(BLOCK, blocks, caching, ttl))
    if clock is not None:
        s.clock = clock
    return s


def _turn(rid, tokens, session="s", max_tokens=3, ttl=None, salt=None) -> Request:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(tokens), params, session_id=session, session_ttl=ttl, cache_salt=salt)


def _step(s: Scheduler, token: int = 7):
    out = s.schedule()
    s.update(out, ModelRunnerOutput({c.request_id: SampledToken(token) for c in out.chunks if c.sample}))
    return out


def _run(s: Scheduler, req: Request) -> list:
    """Run ``req`` to the end; returns its chunks (request id, start, tokens)."""
    s.add_request(req)
    chunks = []
    while s.has_unfinished():
        chunks += [(c.request_id, c.start_position, c.num_tokens) for c in _step(s).chunks]
    return [c for c in chunks if c[0] == req.request_id]


@pytest.mark.parametrize("caching", [True, False])
def test_next_turn_prefills_only_its_new_tokens(caching):
    s = _scheduler(caching=caching)
    first = _turn("t1", range(1, 11))  # 10 prompt tokens, 3 outputs
    _run(s, first)
    history = first.all_token_ids  # 13 tokens; the KV of the first 12 is pinned
    assert s.kv.sessions.num_sessions == 1 and s.kv.sessions.num_pinned_blocks == 3
    new = [50, 51, 52, 53, 54]
    chunks = _run(s, _turn("t2", history + new))
    # The last output token (never fed to the model) and the new tokens: 6, from 12 on,
    # even though 12 ends inside a block that the pin let this turn continue.
    assert chunks[0] == ("t2", 12, 6)
    assert s.close_session("s") and not s.close_session("s")
    assert s.kv.num_free_blocks == 64


@pytest.mark.parametrize("caching, reused", [(False, 6), (True, 4)])
def test_diverging_turn_reuses_the_common_prefix(caching, reused):
    s = _scheduler(caching=caching)
    _run(s, _turn("t1", range(1, 11)))
    # Diverges after 6 tokens. Without the cache the pinned block holding tokens 4..7 has
    # no other reader, so the turn continues it; with the cache that block is a shared
    # full block and must not be written: the hit stops at its start.
    chunks = _run(s, _turn("t2", [1, 2, 3, 4, 5, 6, 90, 91, 92]))
    assert chunks[0][1] == reused
    s.close_session("s")
    assert s.kv.num_free_blocks == 64


def test_pins_expire_by_ttl_and_per_request_override():
    clock = FakeClock()
    s = _scheduler(ttl=30.0, clock=clock)
    _run(s, _turn("a", range(1, 11), session="a"))
    _run(s, _turn("b", range(21, 31), session="b", ttl=100.0))
    assert s.kv.sessions.num_sessions == 2
    clock.now += 29.0
    s.schedule()
    assert s.kv.sessions.num_sessions == 2
    clock.now += 2.0  # "a" is past its 30 s, "b" has 100 s
    s.schedule()
    assert s.kv.sessions.num_sessions == 1 and s.kv.sessions.num_expired == 1
    assert s.kv.sessions.get("b") is not None
    clock.now += 100.0
    assert s.expire_sessions() == 1
    assert s.kv.num_free_blocks == 64


def test_ttl_zero_pins_nothing():
    s = _scheduler(ttl=0.0)
    _run(s, _turn("a", range(1, 11)))
    assert s.kv.sessions.num_sessions == 0
    _run(s, _turn("b", range(1, 11), ttl=5.0))  # a request may still ask for a pin
    assert s.kv.sessions.num_sessions == 1
    s.close_session("s")


def test_pins_are_dropped_before_a_running_request_is_preempted():
    # 10 blocks of 4. Two sessions pin 3 blocks each; a long request then grows into them.
    clock = FakeClock()
    s = _scheduler(blocks=10, caching=False, clock=clock)
    _run(s, _turn("a", range(1, 11), session="a", ttl=50.0))
    _run(s, _turn("b", range(21, 31), session="b", ttl=20.0))
    assert s.kv.num_free_blocks == 4
    long = Request("long", list(range(40, 47)), SamplingParams(temperature=0, max_tokens=26, ignore_eos=True))
    s.add_request(long)
    _step(s)
    assert s.kv.sessions.num_sessions == 2  # it fits without touching the pins
    while s.has_unfinished() and s.kv.sessions.num_dropped == 0:
        _step(s)
    # The pin expiring soonest ("b") went first, and nothing was preempted.
    assert s.kv.sessions.get("b") is None and s.kv.sessions.get("a") is not None
    while s.has_unfinished():
        _step(s)
    assert long.num_output_tokens == 26 and long.num_preemptions == 0
    assert s.num_preemptions == 0 and s.kv.sessions.num_dropped == 2
    assert s.kv.num_free_blocks == 10


def test_closing_a_session_mid_turn_pins_nothing():
    s = _scheduler()
    s.add_request(_turn("t1", range(1, 11)))
    _step(s)
    assert s.close_session("s")  # in flight: found, and it will not be pinned
    while s.has_unfinished():
        _step(s)
    assert s.kv.sessions.num_sessions == 0 and s.kv.num_free_blocks == 64
    assert not s.close_session("unknown")


def test_a_pin_serves_only_its_salt():
    s = _scheduler(caching=False)
    first = _turn("t1", range(1, 11), salt="x")
    _run(s, first)
    chunks = _run(s, _turn("t2", first.all_token_ids + [5], salt="y"))
    assert chunks[0][1] == 0
    s.close_session("s")


# ----------------------------------------------------------------- the engine, end to end


def _record_chunks(llm: LLM) -> list[tuple[str, int, int]]:
    """(request id, start position, tokens) of every chunk the runner computes from now on."""
    runner = llm.engine.runner
    seen: list[tuple[str, int, int]] = []
    execute = runner.execute

    def recording(sched):
        seen.extend((c.request_id, c.start_position, c.num_tokens) for c in sched.chunks)
        return execute(sched)

    runner.execute = recording
    return seen


@pytest.fixture(scope="module")
def hf(llama_dir):
    return load_hf_model(llama_dir)


@pytest.mark.parametrize("caching", [True, False])
def test_session_turns_match_transformers_and_prefill_only_new_tokens(llama_dir, hf, caching):
    rng = random.Random(5)
    llm = LLM(str(llama_dir), enable_prefix_caching=caching)
    seen = _record_chunks(llm)
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    history = [rng.randrange(3, 400) for _ in range(37)]
    for turn in range(3):
        seen.clear()
        out = llm.generate(history, params, session_id="chat", use_tqdm=False)[0]
        assert out.outputs[0].token_ids == hf_greedy(hf, history, 9)
        prefilled = seen[0][2]
        if turn == 0:
            assert prefilled == len(history)
        else:
            assert prefilled == len(new) + 1  # noqa: F821 - the new user tokens + last output
        new = [rng.randrange(3, 400) for _ in range(rng.randint(3, 20))]
        history = history + out.outputs[0].token_ids + new
    stats = llm.engine.stats()
    assert stats.num_sessions == 1 and stats.num_pinned_blocks > 0
    assert llm.close_session("chat")
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_total_blocks


def test_expired_session_is_recomputed_correctly(llama_dir, hf):
    clock = FakeClock()
    llm = LLM(str(llama_dir), enable_prefix_caching=False, session_ttl_s=10.0)
    llm.engine.scheduler.clock = clock
    seen = _record_chunks(llm)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompt = list(range(10, 40))
    out = llm.generate(prompt, params, session_id="s", use_tqdm=False)[0]
    clock.now += 11.0
    assert llm.engine.scheduler.expire_sessions() == 1
    assert llm.engine.stats().num_session_pins_expired == 1
    nxt = prompt + out.outputs[0].token_ids + [7, 8]
    seen.clear()
    out = llm.generate(nxt, params, session_id="s", use_tqdm=False)[0]
    assert seen[0][1:] == (0, len(nxt))  # nothing was kept: the whole history is prefilled
    assert out.outputs[0].token_ids == hf_greedy(hf, nxt, 5)
    llm.close_session("s")


def test_pressure_drops_pins_without_failing_running_requests(llama_dir, hf):
    rng = random.Random(9)
    # 12 blocks of 16 tokens: two sessions pin 3 blocks each; then two requests that need
    # 5 blocks each can only finish if both pins go (and neither may be preempted).
    llm = LLM(str(llama_dir), num_kv_blocks=12, session_ttl_s=60.0)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for sid in ("a", "b"):
        llm.generate([rng.randrange(3, 400) for _ in range(40)], params, session_id=sid, use_tqdm=False)
    assert llm.engine.stats().num_sessions == 2
    batch = [[rng.randrange(3, 400) for _ in range(40)] for _ in range(2)]
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outs = llm.generate(batch, long, use_tqdm=False)
    for prompt, out in zip(batch, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 30)
        assert out.outputs[0].finish_reason == "length"
    stats = llm.engine.stats()
    assert stats.num_session_pins_dropped == 2 and stats.num_sessions == 0
    assert stats.num_preemptions == 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_async_engine_sessions(llama_dir):
    async def main():
        engine = start_engine(llama_dir)
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        prompt = list(range(5, 45))
        tokens = []
        async for out in engine.generate(prompt, params, session_id="s1"):
            tokens += out.outputs[0].token_ids
        hits = engine.stats().prefix_cache_hit_tokens
        async for _ in engine.generate(prompt + tokens + [9], params, session_id="s1"):
            pass
        # Stats are a snapshot the engine thread takes right after delivering outputs.
        for _ in range(500):
            if engine.stats().num_sessions == 1:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().prefix_cache_hit_tokens - hits == len(prompt) + len(tokens) - 1
        assert engine.stats().num_sessions == 1
        assert await engine.close_session("s1") is True
        assert await engine.close_session("s1") is False
        await engine.shutdown()

    asyncio.run(main())


def test_http_session_field_delete_route_and_metrics(llama_dir):
    engine = start_engine(llama_dir)
    try:
        with serve(engine) as server:
            prompt = list(range(5, 45))
            body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                    "session_id": "conv-1", "session_ttl": 120}
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert wait_until(lambda: scrape(server.url).get("livelm_sessions") == 1)
            assert scrape(server.url)["livelm_session_pinned_blocks"] >= 3
            text = r.json()["choices"][0]["text"]
            body["prompt"] = prompt + engine.encode(text)[:2] + [7]
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert scrape(server.url)["livelm_prefix_cache_hit_tokens_total"] >= len(prompt)
            bad = httpx.post(f"{server.url}/v1/completions", json={**body, "session_ttl": -1}, timeout=30)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "session_ttl"
            r = httpx.delete(f"{server.url}/v1/sessions/conv-1", timeout=30)
            assert r.json() == {"id": "conv-1", "object": "session", "deleted": True}
            r = httpx.delete(f"{server.url}/v1/sessions/conv-1", timeout=30)
            assert r.json()["deleted"] is False
            assert wait_until(lambda: scrape(server.url).get("livelm_sessions") == 0)
            m = scrape(server.url)
            assert m['livelm_session_pins_released_total{reason="closed"}'] == 1
    finally:
        stop_engine(engine)


def test_cli_flags_reach_the_engine_options():
    from livelm.entrypoints.cli import _engine_kwargs, build_parser
    from livelm.entrypoints.openai.api_server import engine_kwargs_from_args

    parser = build_parser()
    serve = parser.parse_args(["serve", "--no-prefix-caching", "--session-ttl", "5"])
    assert engine_kwargs_from_args(serve) == {"enable_prefix_caching": False, "session_ttl_s": 5.0}
    assert engine_kwargs_from_args(parser.parse_args(["serve"])) == {}
    gen = parser.parse_args(["generate", "--no-prefix-caching", "hi"])
    assert _engine_kwargs(gen)["enable_prefix_caching"] is False
    assert "enable_prefix_caching" not in _engine_kwargs(parser.parse_args(["generate", "hi"]))
