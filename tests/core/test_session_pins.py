"""TtlSessionPins alone, on a real BlockPool: pins, matches, expiry, pressure (no torch)."""

from __future__ import annotations

from livelm.core.block_pool import BlockPool
from livelm.core.request import Request
from livelm.core.session_pins import TtlSessionPins
from livelm.sampling_params import SamplingParams

BS = 4


def _pinned(pool: BlockPool, pins: TtlSessionPins, sid: str, tokens: list[int], expires_at: float,
            salt: str | None = None) -> list[int]:
    """Pin freshly allocated blocks holding ``tokens`` (the pin takes the references)."""
    blocks = pool.allocate(-(-len(tokens) // BS))
    pins.pin(sid, blocks, tokens, salt, expires_at)
    return blocks


def _turn(tokens: list[int], sid: str | None = "s", salt: str | None = None) -> Request:
    return Request("r", tokens, SamplingParams(), session_id=sid, cache_salt=salt)


def test_a_pin_holds_its_blocks_until_released():
    pool = BlockPool(8)
    pins = TtlSessionPins(pool)
    blocks = _pinned(pool, pins, "s", list(range(10)), expires_at=5.0)
    assert pins.num_sessions == 1 and pins.num_pinned_blocks == 3
    assert pool.num_free_blocks == 5 and all(pool.ref_count(b) == 1 for b in blocks)
    assert pins.get("s").token_ids == list(range(10))
    assert pins.release("s") is True and pins.release("s") is False
    assert pool.num_free_blocks == 8 and pins.num_sessions == 0 and pins.num_pinned_blocks == 0


def test_repinning_a_session_replaces_its_older_pin():
    pool = BlockPool(8)
    pins = TtlSessionPins(pool)
    _pinned(pool, pins, "s", list(range(8)), 5.0)
    _pinned(pool, pins, "s", list(range(12)), 9.0)
    assert pins.num_sessions == 1 and pins.num_pinned_blocks == 3 and pool.num_free_blocks == 5
    assert pins.next_expiry() == 9.0


def test_match_covers_the_common_prefix_but_never_the_last_token():
    pool = BlockPool(8)
    pins = TtlSessionPins(pool)
    blocks = _pinned(pool, pins, "s", list(range(10)), 5.0)
    # The next turn extends the history: every pinned token is reused, the partial third
    # block included (the pin is its only holder and it is not in the prefix cache).
    got, n = pins.match(_turn(list(range(10)) + [50, 51]), BS)
    assert (got, n) == (blocks, 10)
    assert all(pool.ref_count(b) == 2 for b in blocks)  # the match took references
    pool.release(got)
    # The same tokens again: the last one must still be computed to sample from it.
    got, n = pins.match(_turn(list(range(10))), BS)
    assert n == 9 and got == blocks
    pool.release(got)
    # A turn that diverges at token 6 reuses the first block fully and 2 tokens of the second.
    got, n = pins.match(_turn([0, 1, 2, 3, 4, 5, 99, 98, 97]), BS)
    assert (got, n) == (blocks[:2], 6)
    pool.release(got)


def test_match_stops_at_a_block_start_when_the_partial_block_is_shared():
    pool = BlockPool(8)
    pins = TtlSessionPins(pool)
    blocks = _pinned(pool, pins, "s", list(range(10)), 5.0)
    pool.share([blocks[2]])  # someone else reads the partial block: it must not be rewritten
    got, n = pins.match(_turn(list(range(10)) + [50]), BS)
    assert (got, n) == (blocks[:2], 8)
    pool.release(got)
    pool.release([blocks[2]])


def test_match_needs_the_same_session_and_salt():
    pool = BlockPool(8)
    pins = TtlSessionPins(pool)
    _pinned(pool, pins, "s", list(range(10)), 5.0, salt="tenant")
    assert pins.match(_turn(list(range(12)), salt="tenant"), BS)[1] == 10
    pool.release(pins.get("s").block_ids)  # drop the reference the match took
    assert pins.match(_turn(list(range(12)), salt=None), BS) == ([], 0)
    assert pins.match(_turn(list(range(12)), salt="other"), BS) == ([], 0)
    assert pins.match(_turn(list(range(12)), sid="t", salt="tenant"), BS) == ([], 0)
    assert pins.match(_turn(list(range(12)), sid=None, salt="tenant"), BS) == ([], 0)


def test_expire_drop_soonest_and_close_count_separately():
    pool = BlockPool(16)
    pins = TtlSessionPins(pool)
    for sid, t in (("a", 1.0), ("b", 3.0), ("c", 2.0), ("d", 4.0)):
        _pinned(pool, pins, sid, list(range(4)), t)
    assert pins.next_expiry() == 1.0
    assert pins.expire(now=1.5) == 1 and pins.get("a") is None
    assert pins.drop_soonest() is True and pins.get("c") is None  # expires at 2.0, before b
    assert pins.close("b") is True and pins.close("b") is False
    assert (pins.num_expired, pins.num_dropped, pins.num_closed) == (1, 1, 1)
    assert pins.num_sessions == 1 and pins.next_expiry() == 4.0
    assert pins.drop_soonest() is True and pins.drop_soonest() is False
    assert pins.next_expiry() is None and pool.num_free_blocks == 16


def test_shared_blocks_count_once_and_are_reclaimable_only_when_pins_alone_hold_them():
    pool = BlockPool(8)
    pins = TtlSessionPins(pool)
    system = pool.allocate(1)  # a shared system prompt block
    pool.share(system)
    own_a, own_b = pool.allocate(1), pool.allocate(1)
    pins.pin("a", system + own_a, list(range(8)), None, 5.0)
    pins.pin("b", system + own_b, list(range(8)), None, 6.0)
    assert pins.num_pinned_blocks == 3  # the shared block counts once
    assert pins.reclaimable_blocks() == 3
    pool.share(own_a)  # a running request also holds one of a's blocks
    assert pins.reclaimable_blocks() == 2
    pins.release("a")
    assert pins.num_pinned_blocks == 2 and pool.ref_count(system[0]) == 1
    pool.release(own_a)
    pins.release("b")
    assert pool.num_free_blocks == 8
