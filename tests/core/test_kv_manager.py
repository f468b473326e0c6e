"""KVCacheManager alone: block tables, forks, truncation, reuse, pressure, stats (no torch)."""

from __future__ import annotations

import pytest

from livelm.core.kv_manager import KVCacheManager, KVCacheStats, blocks_needed
from livelm.core.request import Request
from livelm.sampling_params import SamplingParams

BS = 4


def _req(rid: str, tokens: list[int], **kw) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=4), **kw)


def _computed(kv: KVCacheManager, req: Request, n: int | None = None) -> Request:
    """Allocate and "compute" the request's first ``n`` tokens (all by default)."""
    n = req.num_tokens if n is None else n
    assert kv.allocate_slots(req, n - req.num_computed_tokens)
    req.num_computed_tokens = n
    kv.commit(req)
    return req


def test_blocks_needed():
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_grows_the_table_only_by_missing_blocks_and_free_returns_them():
    kv = KVCacheManager(8, BS)
    req = _req("a", range(6))
    assert kv.allocate_slots(req, 6) and len(req.block_ids) == 2
    req.num_computed_tokens = 6
    assert kv.allocate_slots(req, 2) and len(req.block_ids) == 2  # slots 6, 7 fit in block 2
    assert kv.allocate_slots(req, 3) and len(req.block_ids) == 3
    assert kv.num_free_blocks == 5 and kv.usage == pytest.approx(3 / 8)
    assert not kv.allocate_slots(req, 100) and len(req.block_ids) == 3  # all or nothing
    kv.free(req)
    assert req.block_ids == [] and kv.num_free_blocks == 8 and kv.capacity_tokens == 32


def test_fork_shares_only_full_blocks():
    kv = KVCacheManager(8, BS)
    parent = _computed(kv, _req("p", range(10)))
    child = _req("c", range(12))
    assert kv.fork(child, parent, 10) == 8  # the partial third block is recomputed
    assert child.block_ids == parent.block_ids[:2]
    assert [kv.pool.ref_count(b) for b in parent.block_ids] == [2, 2, 1]
    kv.free(parent)
    kv.free(child)
    assert kv.num_free_blocks == 8


def test_truncate_keeps_the_kept_tokens_kv_and_recomputes_a_shared_head_block():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    req = _computed(kv, _req("s", range(11), input_closed=False))
    kv.truncate(req, 6)  # the second block's head (tokens 4, 5) stays, it is rewritten from 6
    assert req.num_computed_tokens == 6 and len(req.block_ids) == 2 and kv.num_free_blocks == 6
    other = _req("o", range(6))
    kv.fork(other, req, 6)  # someone else now holds the first block only
    second = req.block_ids[1]
    kv.pool.share([second])  # and the second too
    kv.truncate(req, 5)
    # The partly kept block is shared: it is left to its other holders and recomputed.
    assert req.num_computed_tokens == 4 and len(req.block_ids) == 1
    assert kv.pool.ref_count(second) == 1  # only the other holder has it now
    kv.pool.release([second])
    kv.free(other)
    kv.free(req)
    assert kv.num_free_blocks == 8


def test_match_takes_the_prefix_cache_hit_and_admitted_counts_it():
    kv = KVCacheManager(16, BS)
    first = _computed(kv, _req("a", range(12)))
    kv.free(first)  # its full blocks stay cached while free
    again = _req("b", list(range(12)) + [40])
    assert kv.match(again) == 12 and again.num_computed_tokens == 12
    kv.admitted(again, 12)
    s = kv.stats()
    assert s.prefix_cache_queried_tokens == 13 and s.prefix_cache_hit_tokens == 12
    assert s.num_cached_blocks == 3
    kv.free(again)


def test_match_gives_no_hit_to_requests_that_want_prompt_logprobs():
    kv = KVCacheManager(16, BS)
    kv.free(_computed(kv, _req("a", range(12))))
    req = Request("b", list(range(13)), SamplingParams(prompt_logprobs=1))
    assert kv.match(req) == 0 and req.block_ids == []


def test_match_prefers_the_longer_of_session_pin_and_prefix_cache():
    kv = KVCacheManager(16, BS)
    turn = _computed(kv, _req("t1", range(10), session_id="s"))
    kv.pin_session(turn, expires_at=100.0)  # 10 tokens pinned (the prefix cache has 8)
    assert kv.sessions.num_sessions == 1 and turn.block_ids == []
    nxt = _req("t2", list(range(10)) + [70, 71], session_id="s")
    assert kv.match(nxt) == 10
    kv.admitted(nxt, 10)  # the new turn supersedes the old pin
    assert kv.sessions.num_sessions == 0
    kv.free(nxt)
    assert kv.num_free_blocks == 16


def test_make_room_drops_session_pins_only_when_that_suffices():
    kv = KVCacheManager(6, BS, enable_prefix_caching=False)
    for i, t in enumerate((5.0, 1.0)):
        turn = _computed(kv, _req(f"t{i}", range(8), session_id=f"s{i}"))
        kv.pin_session(turn, expires_at=t)
    assert kv.num_free_blocks == 2 and kv.sessions.reclaimable_blocks() == 4
    big = _req("big", range(40))
    assert not kv.make_room(big, 40)  # 10 blocks: even every pin would not do
    assert kv.sessions.num_sessions == 2  # so none was dropped
    mid = _req("mid", range(16))
    assert kv.make_room(mid, 16)  # 4 blocks: the pin expiring first goes
    assert kv.sessions.get("s1") is None and kv.sessions.get("s0") is not None
    assert kv.sessions.num_dropped == 1
    kv.sessions.release("s0")
    assert kv.num_free_blocks == 6


def test_allocate_slots_drops_pins_before_failing():
    kv = KVCacheManager(4, BS, enable_prefix_caching=False)
    kv.pin_session(_computed(kv, _req("t", range(8), session_id="s")), expires_at=1.0)
    req = _req("r", range(16))
    assert kv.allocate_slots(req, 16) and kv.sessions.num_sessions == 0
    kv.free(req)


def test_pin_session_keeps_only_computed_blocks():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    req = _req("t", range(6), session_id="s")
    kv.allocate_slots(req, 12)  # room for output tokens not computed yet
    req.num_computed_tokens = 6
    kv.pin_session(req, expires_at=3.0)
    pin = kv.sessions.get("s")
    assert len(pin.block_ids) == 2 and pin.token_ids == list(range(6)) and pin.expires_at == 3.0
    assert kv.num_free_blocks == 6
    kv.sessions.release("s")


def test_stats_report_pool_cache_and_pins():
    kv = KVCacheManager(8, BS)
    kv.pin_session(_computed(kv, _req("t", range(8), session_id="s")), expires_at=1.0)
    kv.sessions.expire(2.0)
    assert kv.stats() == KVCacheStats(
        num_free_blocks=8, num_total_blocks=8, kv_usage=0.0, prefix_cache_queried_tokens=0,
        prefix_cache_hit_tokens=0, num_cached_blocks=2, num_cache_evictions=0, num_sessions=0,
        num_pinned_blocks=0, num_session_pins_expired=1, num_session_pins_dropped=0,
        num_session_pins_closed=0, num_touched_blocks=2,
    )
    # Blocks ever handed out count once, however often they are reused.
    for _ in range(3):
        kv.free(_computed(kv, _req("u", range(4))))
    assert kv.stats().num_touched_blocks == 3


def test_sliding_window_releases_whole_blocks_before_the_window_and_keeps_caching():
    """An all-sliding model (window 6, blocks of 4): after 30 computed tokens the next query
    (position 30) sees 25..30, so blocks ending before 25 - 4 (one slack block) go back to
    the pool; the table turns logical; full blocks keep entering the prefix cache, and a
    request of the same tokens hits all of them, released ones included."""
    kv = KVCacheManager(20, BS, sliding_window=6)
    req = _computed(kv, _req("a", range(40)), 30)
    assert len(req.block_ids) == 8 and kv.num_free_blocks == 12
    kept = req.block_ids[5:]
    assert kv.roll(req) == 5  # blocks 0..4 end at 19 < 25 - 4 = 21
    assert req.num_evicted_blocks == 5 and req.block_ids == kept and kv.num_free_blocks == 17
    assert [req.physical_block(i, BS) for i in range(5, 8)] == kept
    assert kv.roll(req) == 0  # nothing more until the window moves on
    assert kv.allocate_slots(req, 10) and len(req.block_ids) == 5  # 40 tokens: 10 blocks, 5 released
    req.num_computed_tokens = 40
    kv.commit(req)
    assert kv.roll(req) == 2 and req.num_evicted_blocks == 7
    assert kv.stats().num_evicted_tokens == 7 * BS
    twin = _req("b", range(40))
    assert kv.match(twin) == 36  # every full block before its last token, 7 of them released
    kv.free(req)
    kv.free(twin)
    assert kv.num_free_blocks == 20


def test_sliding_window_spares_input_streams_and_models_with_a_global_layer():
    stream = Request.input_stream("s", list(range(40)))
    kv = KVCacheManager(20, BS, sliding_window=6)
    _computed(kv, stream)
    assert kv.roll(stream) == 0 and len(stream.block_ids) == 10
    plain = KVCacheManager(20, BS)  # sliding_window None: a global layer reads every key
    req = _computed(plain, _req("a", range(40)))
    assert plain.roll(req) == 0 and len(req.block_ids) == 10


def test_a_released_block_whose_memory_was_reused_is_no_hit():
    """Released cached blocks are hits only until the pool hands their memory out again."""
    kv = KVCacheManager(10, BS, sliding_window=4)
    req = _computed(kv, _req("a", range(32)))
    assert kv.roll(req) == 6
    other = _req("x", range(100, 132))
    assert kv.allocate_slots(other, 32)  # 8 blocks: the 2 plain free ones, then the 6 released cached ones
    twin = _req("b", range(32))
    assert kv.match(twin) == 0 and kv.num_free_blocks == 0  # their memory went to "x": no hit
    kv.free(twin)
    kv.free(other)
    kv.free(req)
