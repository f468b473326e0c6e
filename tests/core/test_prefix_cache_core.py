"""Prefix caching in the scheduler and KV manager alone: pure Python, a fake runner."""

from __future__ import annotations

import subprocess
import sys

import pytest

from livelm.config import CacheConfig, SchedulerConfig
from livelm.core.block_pool import BlockPool
from livelm.core.prefix_grouping import find_prefix_groups, prefix_grouped_order
from livelm.core.request import Request
from livelm.core.scheduler import Scheduler
from livelm.core.scheduler_output import ModelRunnerOutput, SampledToken
from livelm.sampling_params import SamplingParams

BLOCK = 4


def _scheduler(blocks=64, budget=64, caching=True, seqs=8) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, seqs, 512), CacheConfig(BLOCK, blocks, caching))


def _req(rid, tokens, max_tokens=2, salt=None, **kw) -> Request:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    return Request(rid, list(tokens), params, cache_salt=salt)


def _step(s: Scheduler, token: int = 7):
    out = s.schedule()
    s.update(out, ModelRunnerOutput({c.request_id: SampledToken(token) for c in out.chunks if c.sample}))
    return out


def _drain(s: Scheduler) -> None:
    while s.has_unfinished():
        _step(s)


def _first_chunk(s: Scheduler, req: Request):
    """Add ``req`` and return its first scheduled chunk."""
    s.add_request(req)
    while True:
        out = _step(s)
        for c in out.chunks:
            if c.request_id == req.request_id:
                return c


def test_block_pool_keeps_cached_blocks_in_lru_until_needed():
    evicted = []
    pool = BlockPool(4, on_evict=evicted.append)
    a = pool.allocate(3)
    pool.set_cached(a[0])
    pool.set_cached(a[1])
    pool.release(reversed(a))  # a[2] plain free; a[1] then a[0] join the LRU
    assert pool.num_free_blocks == 4 and pool.num_cached_free_blocks == 2
    # Plain free blocks go first; then the least recently freed cached block.
    assert sorted(pool.allocate(2)) == sorted([3, a[2]]) and evicted == []
    assert pool.allocate(1) == [a[1]] and evicted == [a[1]] and pool.num_evictions == 1
    pool.touch([a[0]])  # a hit revives a free cached block
    assert pool.num_free_blocks == 0 and pool.ref_count(a[0]) == 1
    pool.release([a[1]])
    assert pool.num_cached_free_blocks == 0  # reused for other data: no longer cached
    with pytest.raises(RuntimeError):
        pool.touch([a[1]])


@pytest.mark.parametrize(
    "prompt_len, reused",
    [(10, 8), (12, 8), (13, 12), (3, 0)],  # the last token is always recomputed
)
def test_hit_covers_full_blocks_and_never_the_last_token(prompt_len, reused):
    s = _scheduler()
    prompt = list(range(1, prompt_len + 1))
    _first_chunk(s, _req("a", prompt))
    _drain(s)
    chunk = _first_chunk(s, _req("b", prompt))
    assert chunk.start_position == reused and chunk.num_tokens == prompt_len - reused
    assert s.kv.num_hit_tokens == reused
    _drain(s)
    assert s.kv.num_free_blocks == 64


def test_hit_ending_mid_block_recomputes_the_rest_of_that_block():
    s = _scheduler()
    _first_chunk(s, _req("a", range(1, 11)))
    _drain(s)
    # Shares 6 tokens with "a": one full block (4 tokens) is reused, tokens 4.. recomputed.
    chunk = _first_chunk(s, _req("b", [1, 2, 3, 4, 5, 6, 99, 98, 97]))
    assert chunk.start_position == 4 and chunk.token_ids[:3] == [5, 6, 99]
    _drain(s)


def test_requests_sharing_a_prefix_compute_it_once():
    s = _scheduler(budget=64)
    shared = list(range(1, 13))
    s.add_request(_req("a", shared + [50, 51]))
    s.add_request(_req("b", shared + [60]))
    out = _step(s)
    # "b" waits while "a" computes the 3 blocks they share, then reuses all of them.
    assert [c.request_id for c in out.chunks] == ["a"]
    out = _step(s)
    b = next(c for c in out.chunks if c.request_id == "b")
    assert b.start_position == 12 and b.num_tokens == 1
    _drain(s)


def test_salts_never_share_kv():
    s = _scheduler()
    prompt = list(range(1, 14))
    _first_chunk(s, _req("a", prompt, salt="tenant-1"))
    _drain(s)
    assert _first_chunk(s, _req("b", prompt, salt="tenant-2")).start_position == 0
    _drain(s)
    assert _first_chunk(s, _req("c", prompt)).start_position == 0
    _drain(s)
    assert _first_chunk(s, _req("d", prompt, salt="tenant-1")).start_position == 12
    _drain(s)


def test_forced_hash_collisions_never_return_wrong_blocks():
    s = _scheduler()
    cache = s.kv.prefix_cache
    cache.hash_fn = lambda parent, tokens, salt: 0  # every block collides with every other
    a, b = list(range(1, 14)), list(range(101, 114))
    _first_chunk(s, _req("a", a))
    _drain(s)
    assert _first_chunk(s, _req("b", b)).start_position == 0
    _drain(s)
    assert cache.num_collisions > 0
    # Verified hits still work, for both prompts.
    assert _first_chunk(s, _req("a2", a)).start_position == 12
    _drain(s)
    assert _first_chunk(s, _req("b2", b)).start_position == 12
    _drain(s)


def test_chain_is_verified_not_just_each_block():
    # A hash that ignores the parent makes block 2 of "b" look like block 2 of "a": only
    # the parent check stops "b" from reusing KV computed after different tokens.
    s = _scheduler()
    s.kv.prefix_cache.hash_fn = lambda parent, tokens, salt: hash(tokens)
    tail = [40, 41, 42, 43, 44]
    _first_chunk(s, _req("a", [1, 2, 3, 4] + tail))
    _drain(s)
    _first_chunk(s, _req("c", [9, 9, 9, 9, 8]))
    _drain(s)
    chunk = _first_chunk(s, _req("b", [9, 9, 9, 9] + tail))
    assert chunk.start_position == 4  # block 0 from "c"; "a"'s second block is refused
    _drain(s)


def test_lru_evicts_deepest_blocks_first_and_hits_survive():
    s = _scheduler(blocks=6)
    prompt = list(range(1, 14))  # 3 full blocks + 1 token
    _first_chunk(s, _req("a", prompt, max_tokens=1))
    _drain(s)
    assert s.kv.pool.num_cached_free_blocks == 3
    # "x" needs 3 blocks: the 3 plain free ones, nothing is evicted.
    _first_chunk(s, _req("x", list(range(200, 209)), max_tokens=1))
    _drain(s)
    assert s.kv.pool.num_evictions == 0
    # "y" needs 3 more: 1 plain, then the 2 oldest cached ones ("a"'s deepest blocks).
    _first_chunk(s, _req("y", list(range(300, 309)), max_tokens=1))
    assert s.kv.pool.num_evictions == 2
    _drain(s)
    chunk = _first_chunk(s, _req("a2", prompt, max_tokens=1))
    assert chunk.start_position == 4  # "a"'s first block survived
    _drain(s)
    assert s.kv.num_free_blocks == 6


def test_preemption_never_frees_blocks_others_still_hold():
    # 10 blocks of 4: two requests sharing 3 cached blocks, decoding until one is preempted.
    s = _scheduler(blocks=10, budget=64)
    shared = list(range(1, 13))
    _first_chunk(s, _req("warm", shared + [5], max_tokens=1))
    _drain(s)
    s.add_request(_req("old", shared + [20], max_tokens=14))
    s.add_request(_req("new", shared + [30], max_tokens=14))
    _step(s)
    old, new = s.requests["old"], s.requests["new"]
    assert old.block_ids[:3] == new.block_ids[:3]
    assert s.kv.pool.ref_count(old.block_ids[0]) == 2
    while "new" in s.requests and new.num_preemptions == 0:
        _step(s)
    assert new.num_preemptions == 1
    # The preempted request let go of the shared blocks; the other still holds them.
    assert all(s.kv.pool.ref_count(b) == 1 for b in old.block_ids[:3])
    _drain(s)
    assert old.num_output_tokens == new.num_output_tokens == 14
    assert s.kv.num_free_blocks == 10


@pytest.mark.parametrize("caching", [True, False])
def test_n_children_share_the_prompt_with_caching_on_and_off(caching):
    s = _scheduler(caching=caching)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=3)
    prompt = list(range(1, 11))
    s.add_request(Request("r#0", list(prompt), params, index=0, parent_id="r"))
    for i in (1, 2):
        s.add_request(Request(f"r#{i}", list(prompt), params, index=i, parent_id="r", fork_from="r#0"))
    out = _step(s)
    assert [c.request_id for c in out.chunks] == ["r#0"]
    out = _step(s)
    starts = {c.request_id: c.start_position for c in out.chunks}
    assert starts["r#1"] == starts["r#2"] == 8
    parent = s.requests["r#0"]
    assert s.kv.pool.ref_count(parent.block_ids[0]) == 3
    _drain(s)
    assert s.kv.num_free_blocks == 64


def test_prompt_logprobs_requests_get_no_hit():
    s = _scheduler()
    prompt = list(range(1, 14))
    _first_chunk(s, _req("a", prompt))
    _drain(s)
    assert _first_chunk(s, _req("b", prompt, prompt_logprobs=0)).start_position == 0
    _drain(s)


def test_prefix_groups_and_order():
    sys_a, sys_b = [1] * 8, [2] * 8
    prompts = [sys_a + [5], [9, 9], sys_b + [6], sys_a + [7, 7, 7, 7], sys_b + [8]]
    groups = find_prefix_groups(prompts, min_shared_tokens=4)
    assert sorted(sorted(g.members) for g in groups) == [[0, 3], [1], [2, 4]]
    assert {g.shared_tokens for g in groups if len(g.members) > 1} == {8}
    decode = [1, 1, 50, 1, 50]
    order = prefix_grouped_order(prompts, decode, 4)
    assert sorted(order) == list(range(5))
    # The decode-heavy group (sys_b) goes first, its members next to each other.
    assert set(order[:2]) == {2, 4}
    assert abs(order.index(0) - order.index(3)) == 1
    # Within a group, the larger decode share first.
    assert order.index(0) < order.index(3)


def test_new_core_modules_do_not_import_torch():
    code = (
        "import sys; import livelm.core.prefix_cache, livelm.core.session_pins, "
        "livelm.core.prefix_grouping, livelm.core.kv_manager; "
        "assert 'torch' not in sys.modules, 'core imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
