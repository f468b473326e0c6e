"""The data-parallel router alone (no processes): affinity, the load cap, failures."""

from __future__ import annotations

import pytest

from livelm.core.block_pool import BlockPool
from livelm.core.prefix_cache import HashPrefixCache
from livelm.core.request import Request
from livelm.sampling_params import SamplingParams
from livelm.serving.router import Router, RouterConfig, RouteRequest, block_hashes

BS = 4


def _router(policy: str = "cache_aware", **kw) -> Router:
    return Router(3, RouterConfig(policy, BS, **kw))


def test_block_hashes_are_the_prefix_caches_keys():
    """The router keys blocks exactly as the prefix cache does (salt included), and never
    the block holding the last token (a cache hit never covers it)."""
    ids = list(range(100, 118))  # 18 tokens: 4 full blocks of the first 17
    pool = BlockPool(8)
    cache = HashPrefixCache(pool, BS)
    req = Request("r", list(ids), SamplingParams(max_tokens=1), cache_salt="salt")
    assert block_hashes(ids, BS, "salt") == cache.block_hashes(req, 4)
    assert block_hashes(ids, BS, None) != block_hashes(ids, BS, "salt")
    assert len(block_hashes(ids[:16], BS, None)) == 3  # the 4th block holds the last token


def test_prefix_affinity_picks_the_replica_holding_the_longest_prefix():
    r = _router()
    shared = list(range(40))
    r.record(1, RouteRequest(shared[:20]))
    r.record(2, RouteRequest(shared))
    route = r.route(RouteRequest(shared + [7, 8, 9]), [0, 0, 0])
    assert (route.replica, route.reason, route.cached_blocks) == (2, "prefix", 10)
    assert r.stats.prefix_hits == 1
    # An unrelated prompt goes to the least loaded replica.
    route = r.route(RouteRequest([999] * 30), [50, 10, 30])
    assert (route.replica, route.reason) == (1, "load")


def test_session_sticks_to_its_replica():
    r = _router()
    r.record(2, RouteRequest([1, 2, 3], session_id="chat"))
    for _ in range(3):
        route = r.route(RouteRequest([5] * 30, session_id="chat"), [0, 0, 100])
        assert (route.replica, route.reason) == (2, "session")
    assert r.stats.session_hits == 3


def test_affinity_yields_to_the_load_cap():
    """A session or prefix target whose load is over cap (factor x least + slack) is passed
    over for the least loaded replica, and counted as a reroute."""
    r = _router(load_cap_factor=2.0, load_cap_slack_tokens=100)
    prompt = list(range(40))
    r.record(0, RouteRequest(prompt, session_id="s"))
    assert r.route(RouteRequest(prompt, session_id="s"), [300, 100, 200]).replica == 0  # 300 <= 2*100+100
    route = r.route(RouteRequest(prompt, session_id="s"), [301, 100, 200])
    assert (route.replica, route.reason, route.rerouted) == (1, "load", True)
    route = r.route(RouteRequest(prompt + [1]), [400, 100, 200])  # the prefix target too
    assert (route.replica, route.rerouted) == (1, True)
    assert r.stats.reroutes == 2


def test_failed_replica_leaves_rotation_and_its_sessions_are_lost_once():
    r = _router()
    r.record(1, RouteRequest(list(range(20)), session_id="s"))
    r.remove(1)
    for _ in range(6):
        assert r.route(RouteRequest(list(range(20))), [0, 0, 0]).replica != 1
    assert r.take_lost("s") is True
    assert r.take_lost("s") is False  # reported once
    assert r.stats.sessions_lost == 1
    r.add(1)
    route = r.route(RouteRequest(list(range(20))), [5, 0, 5])
    assert (route.replica, route.cached_blocks) == (1, 0)  # back, with an empty cache


def test_round_robin_cycles_over_live_replicas():
    r = _router("round_robin")
    r.record(0, RouteRequest(list(range(40)), session_id="s"))
    picks = [r.route(RouteRequest(list(range(40)), session_id="s"), [0, 0, 0]).replica for _ in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]
    r.remove(2)
    assert {r.route(RouteRequest([1, 2]), [0, 0, 0]).replica for _ in range(4)} == {0, 1}


def test_no_replica_in_rotation_is_an_error():
    r = Router(1, RouterConfig(block_size=BS))
    r.remove(0)
    with pytest.raises(ValueError, match="no replica"):
        r.route(RouteRequest([1]), [0])


def test_bad_router_config_is_refused():
    with pytest.raises(ValueError, match="router must be one of"):
        RouterConfig("random")
    with pytest.raises(ValueError, match="load_cap_factor"):
        RouterConfig(load_cap_factor=0.5)


def test_prefix_affinity_weighs_saved_prefill_against_load():
    """A short shared prefix (a system prompt) does not draw a new conversation to a busy
    replica when another is idle; a long one does, while the prefill it saves outweighs
    the load it joins (load + uncached tokens, least wins)."""
    r = _router()
    system = list(range(16))  # 4 blocks
    first = system + [500 + i for i in range(200)]
    r.record(0, RouteRequest(first))
    second = system + [900 + i for i in range(200)]
    route = r.route(RouteRequest(second), [len(first), 0, 0])  # 216 + 200 uncached vs 0 + 216
    assert route.replica in (1, 2) and route.reason == "load" and route.rerouted
    longer = first + [7] * 8  # 54 of its blocks cached on replica 0
    route = r.route(RouteRequest(longer), [300, 0, 0])  # 300 + ~9 uncached vs 0 + 224
    assert route.replica in (1, 2)
    route = r.route(RouteRequest(longer), [150, 0, 0])  # 150 + ~9 vs 224: the cache wins
    assert (route.replica, route.reason) == (0, "prefix")
