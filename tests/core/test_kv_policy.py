"""kv_policy "sinks" in the scheduler and KV manager alone (no model): whole blocks roll
out of the window, sink blocks never do, memory stays bounded, the prefix cache keeps
the layouts apart, and every block comes back."""

from __future__ import annotations

import math

import pytest

from livelm import SamplingParams
from livelm.config import CacheConfig, SchedulerConfig
from livelm.core.kv_policy import FULL, KVPolicy, parse_kv_policy
from livelm.core.request import Request
from livelm.core.request_options import RequestOptions
from livelm.core.scheduler import Scheduler
from livelm.core.scheduler_output import ModelRunnerOutput, SampledToken

BS = 4


def _scheduler(blocks: int = 64, budget: int = 16) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, 8, 64), CacheConfig(BS, blocks, True, 0.0))


def _step(s: Scheduler, token: int = 7):
    out = s.schedule()
    s.update(out, ModelRunnerOutput({c.request_id: SampledToken(token) for c in out.chunks if c.sample}))
    return out


def _req(rid: str, n: int, policy: KVPolicy, max_tokens: int = 5) -> Request:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(range(10, 10 + n)), params, kv_policy=policy)


def _text_slots(req: Request) -> dict[int, int]:
    """Text block -> pool block of every block the request holds."""
    nsb = req.kv_policy.num_sink_blocks(BS)
    held = {i: b for i, b in enumerate(req.block_ids[:nsb])}
    for j, b in enumerate(req.block_ids[nsb:]):
        held[nsb + req.num_evicted_blocks + j] = b
    return held


def test_policy_fields_are_checked():
    assert parse_kv_policy() == FULL
    assert parse_kv_policy("sinks", None, 32) == KVPolicy("sinks", 4, 32)
    for bad in [("sinks", None, None), ("sinks", None, 0), ("sinks", None, -3), ("sinks", None, 2**40),
                ("sinks", None, 3.5), ("sinks", None, math.nan), ("sinks", None, "32"), ("sinks", None, True),
                ("sinks", -1, 32), ("sinks", 33, 32), ("sinks", 1.0, 32), ("bogus", None, 32), (5, None, 32),
                (None, None, 32), (None, 4, None), ("full", None, 32), ("full", 4, None)]:
        with pytest.raises(ValueError):
            parse_kv_policy(*bad)
    opts = RequestOptions.from_extra({"kv_policy": "sinks", "kv_window": 16, "num_sink_tokens": 2})
    assert opts.kv_policy == KVPolicy("sinks", 2, 16)
    with pytest.raises(ValueError, match="kv_window"):
        RequestOptions.from_extra({"kv_window": 16})


def test_positions_by_place_in_the_cache():
    p = KVPolicy("sinks", 4, 8)
    assert [p.cache_position(t) for t in range(14)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11, 11]
    assert p.window_start(20) == 13 and p.window_start(5) == 4


def test_blocks_roll_out_whole_sinks_stay_and_memory_is_bounded():
    s = _scheduler()
    policy = KVPolicy("sinks", 2, 8)
    req = _req("a", 3, policy, max_tokens=200)
    s.add_request(req)
    sink_block = None
    peak = 0
    while s.has_unfinished():
        _step(s)
        if req.block_ids:
            sink_block = sink_block if sink_block is not None else req.block_ids[0]
            assert req.block_ids[0] == sink_block  # the sink block is never released
            held = _text_slots(req)
            computed = req.num_computed_tokens
            # Every token a later query can see is still held...
            for pos in list(range(2)) + list(range(policy.window_start(computed), computed)):
                assert pos // BS in held
            # ...and no block ending before the window (less one block of slack) is.
            for i in held:
                if i >= 1:
                    assert (i + 1) * BS > policy.window_start(computed) - BS
            peak = max(peak, len(req.block_ids))
    assert req.num_output_tokens == 200
    assert peak <= 1 + (2 * 8 + 2 * BS) // BS + 1
    assert req.num_evicted_tokens >= 200 - 3 * 8
    assert s.kv.num_free_blocks == 64  # every block back
    assert s.kv.stats().num_evicted_tokens == req.num_evicted_tokens


def test_a_long_prompt_is_admitted_into_a_small_pool_and_prefilled_window_by_window():
    s = _scheduler(blocks=12, budget=64)
    req = _req("a", 300, KVPolicy("sinks", 4, 8), max_tokens=3)
    s.add_request(req)
    chunks = []
    while s.has_unfinished():
        chunks += [c.num_tokens for c in _step(s).chunks]
        assert s.kv.num_free_blocks >= 0
    assert max(chunks) <= 8  # a sinks request computes at most a window per step
    assert sum(chunks) == 300 + 2
    assert s.kv.num_free_blocks == 12


def test_prefix_cache_keeps_layouts_apart():
    s = _scheduler()
    sinks = KVPolicy("sinks", 4, 16)
    first = _req("a", 13, sinks, max_tokens=1)
    s.add_request(first)
    while s.has_unfinished():
        _step(s)
    # A full request with the same tokens finds nothing: its keys are stored rotated.
    full = _req("b", 13, FULL, max_tokens=1)
    s.add_request(full)
    _step(s)
    assert full.num_computed_tokens == 13 and s.kv.num_hit_tokens == 0
    while s.has_unfinished():
        _step(s)
    # The same policy reuses the blocks it cached before rolling anything out.
    again = _req("c", 13, sinks, max_tokens=1)
    s.add_request(again)
    _step(s)
    assert s.kv.num_hit_tokens == 12
    while s.has_unfinished():
        _step(s)
    # Another window is another layout.
    other = _req("d", 13, KVPolicy("sinks", 4, 32), max_tokens=1)
    s.add_request(other)
    _step(s)
    assert s.kv.num_hit_tokens == 12
    while s.has_unfinished():
        _step(s)
    assert s.kv.num_free_blocks == 64


def test_preempted_sinks_request_recomputes_and_frees_everything():
    s = _scheduler(blocks=16, budget=16)
    a = _req("a", 40, KVPolicy("sinks", 4, 8), max_tokens=60)
    b = _req("b", 30, FULL, max_tokens=10)
    s.add_request(a)
    s.add_request(b)
    while s.has_unfinished():
        _step(s)
    assert a.num_output_tokens == 60 and b.num_output_tokens == 10
    assert s.kv.num_free_blocks == 16


def test_a_preempted_sinks_request_is_recomputed_from_what_it_kept():
    s = _scheduler(budget=8)
    policy = KVPolicy("sinks", 2, 8)
    req = _req("a", 60, policy, max_tokens=5)
    s.add_request(req)
    while req.num_computed_tokens < 60:
        _step(s)
    kept_from = (policy.num_sink_blocks(BS) + req.num_evicted_blocks) * BS
    assert kept_from > 2
    s.recompute_all()  # preempts it (a weight update does)
    assert req.kv_floor == kept_from and not req.block_ids
    chunks = []
    while s.has_unfinished():
        chunks += [(c.start_position, c.num_tokens, c.kv_floor) for c in _step(s).chunks]
    # The sinks first, then from the floor on: nothing in between is computed again.
    assert chunks[0] == (0, 2, kept_from)
    assert chunks[1][0] == kept_from
    assert sum(n for _, n, _ in chunks) == 2 + (64 - kept_from)
    assert req.num_output_tokens == 5
    assert s.kv.num_free_blocks == 64


def test_replace_before_the_window_is_refused():
    s = _scheduler()
    policy = KVPolicy("sinks", 4, 8)
    stream = Request.input_stream("st", list(range(10, 90)), kv_policy=policy)
    s.add_request(stream)
    while s.has_pending_work():
        _step(s)
    assert stream.num_evicted_blocks > 0
    before = (list(stream.block_ids), stream.num_computed_tokens)
    with pytest.raises(ValueError, match="kv_window"):
        s.update_input("st", 20, [5, 6])
    assert (stream.block_ids, stream.num_computed_tokens) == before  # nothing changed
    s.update_input("st", 75, [5, 6])  # within the window: revised as today
    assert stream.num_tokens == 77 and stream.num_computed_tokens <= 75
    while s.has_pending_work():
        _step(s)
    assert stream.num_computed_tokens == 77
    s.finish_request("st")
    assert s.kv.num_free_blocks == 64


def test_fork_of_a_rolled_stream_shares_its_window():
    s = _scheduler()
    policy = KVPolicy("sinks", 4, 8)
    stream = Request.input_stream("st", list(range(10, 70)), kv_policy=policy)
    s.add_request(stream)
    while s.has_pending_work():
        _step(s)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    reply = Request("r", list(range(10, 70)) + [1], params, fork_from="st", kv_policy=policy)
    s.add_request(reply)
    out = _step(s)
    [chunk] = [c for c in out.chunks if c.request_id == "r"]
    # It computed only its own token, on the stream's logical table (then rolled on its own).
    assert chunk.start_position == 60 and chunk.num_evicted_blocks == stream.num_evicted_blocks
    assert reply.num_evicted_blocks >= stream.num_evicted_blocks
    # A full reply cannot share rotated-key-free blocks: it computes everything itself.
    full = Request("f", list(range(10, 70)) + [1], params, fork_from="st")
    s.add_request(full)
    while s.has_unfinished() and any(r.request_id in ("r", "f") for r in s.running + list(s.waiting)):
        _step(s)
    s.finish_request("st")
    assert s.kv.num_free_blocks == 64
