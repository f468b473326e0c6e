"""The scheduler and KV manager alone: pure Python, driven by a fake runner."""

from __future__ import annotations

import subprocess
import sys

import pytest

from livelm.config import CacheConfig, SchedulerConfig
from livelm.core.block_pool import BlockPool
from livelm.core.request import Request, RequestStatus
from livelm.core.scheduler import Scheduler
from livelm.core.scheduler_output import ModelRunnerOutput, SampledToken
from livelm.sampling_params import SamplingParams


def _scheduler(budget=32, seqs=8, blocks=64, block=4, max_len=512) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, seqs, max_len), CacheConfig(block, blocks))


def _req(rid, n, max_tokens=4, **kw) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(temperature=0, max_tokens=max_tokens), **kw)


def _run_step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampled = {c.request_id: SampledToken(token) for c in out.chunks if c.sample}
    s.update(out, ModelRunnerOutput(sampled))
    return out


def test_core_does_not_import_torch():
    code = (
        "import sys; import livelm.core.scheduler, livelm.core.kv_manager, livelm.core.request; "
        "assert 'torch' not in sys.modules, 'core imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_token_budget_chunks_prefill_and_mixes_decodes():
    s = _scheduler(budget=10)
    s.add_request(_req("a", 3, max_tokens=5))
    out = _run_step(s)
    assert [(c.request_id, c.num_tokens, c.sample) for c in out.chunks] == [("a", 3, True)]
    s.add_request(_req("b", 25))
    out = _run_step(s)
    # a decodes (1 token) and b gets the rest of the budget as its first chunk.
    assert [(c.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 9)]
    assert out.num_batched_tokens == 10
    out = _run_step(s)
    assert [(c.request_id, c.num_tokens, c.start_position) for c in out.chunks] == [("a", 1, 4), ("b", 9, 9)]
    out = _run_step(s)
    assert [(c.request_id, c.num_tokens, c.sample) for c in out.chunks] == [("a", 1, True), ("b", 7, True)]
    while s.has_unfinished():
        _run_step(s)
    assert s.kv.num_free_blocks == 64


def test_max_num_seqs_caps_running():
    s = _scheduler(seqs=2)
    for i in range(4):
        s.add_request(_req(str(i), 2))
    out = s.schedule()
    assert {c.request_id for c in out.chunks} == {"0", "1"}
    assert s.num_waiting == 2


def test_preemption_takes_the_newest_and_recomputes():
    # 6 blocks of 4 slots: two requests of 8 prompt tokens fill 4 blocks; decoding needs more.
    s = _scheduler(budget=64, blocks=6, block=4)
    old, new = _req("old", 8, max_tokens=12), _req("new", 8, max_tokens=12)
    s.add_request(old)
    s.add_request(new)
    while s.has_unfinished():
        _run_step(s)
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    assert old.num_output_tokens == new.num_output_tokens == 12
    assert s.kv.num_free_blocks == 6


def test_abort_frees_blocks_at_any_time():
    s = _scheduler(budget=4)
    s.add_request(_req("a", 10))
    s.add_request(_req("b", 3))
    _run_step(s)
    assert s.kv.num_free_blocks < 64
    s.finish_request("a")
    s.finish_request("b")
    s.finish_request("unknown")
    assert s.kv.num_free_blocks == 64 and not s.has_unfinished()
    assert s.schedule().finished_request_ids == ["a", "b"]


def test_n_children_fork_full_prompt_blocks():
    s = _scheduler(budget=64, block=4)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=3)
    prompt = list(range(1, 11))  # 10 tokens: blocks [0-3], [4-7] full, [8-9] partial
    s.add_request(Request("r#0", list(prompt), params, index=0, parent_id="r"))
    for i in (1, 2):
        s.add_request(Request(f"r#{i}", list(prompt), params, index=i, parent_id="r", fork_from="r#0"))
    out = _run_step(s)
    # Children wait until the first sequence's prompt KV exists.
    assert [c.request_id for c in out.chunks] == ["r#0"]
    out = s.schedule()
    chunks = {c.request_id: c for c in out.chunks}
    parent = s.requests["r#0"]
    for i in (1, 2):
        child = chunks[f"r#{i}"]
        # Shared: 2 full blocks (8 tokens); recomputed: tokens 8..9.
        assert child.start_position == 8 and child.num_tokens == 2
        assert s.requests[f"r#{i}"].block_ids[:2] == parent.block_ids[:2]
    assert s.kv.pool.ref_count(parent.block_ids[0]) == 3
    s.update(out, ModelRunnerOutput({c.request_id: SampledToken(5) for c in out.chunks if c.sample}))
    while s.has_unfinished():
        _run_step(s)
    assert s.kv.num_free_blocks == 64


def test_append_input_keeps_request_catching_up():
    r = _req("a", 3)
    r.append_input([9, 9])
    assert r.num_tokens == 5 and r.prompt_token_ids[-2:] == [9, 9]
    r.append_output(1)
    with pytest.raises(ValueError):
        r.append_input([1])


def test_block_pool_reference_counts():
    pool = BlockPool(3)
    a = pool.allocate(2)
    pool.share(a[:1])
    pool.release(a)
    assert pool.num_free_blocks == 2 and pool.ref_count(a[0]) == 1
    pool.release(a[:1])
    assert pool.num_free_blocks == 3
    with pytest.raises(RuntimeError):
        pool.release(a[:1])
    with pytest.raises(RuntimeError):
        pool.allocate(4)


def test_status_lifecycle():
    s = _scheduler()
    r = _req("a", 2, max_tokens=1)
    s.add_request(r)
    assert r.status == RequestStatus.WAITING
    _run_step(s)
    assert r.status == RequestStatus.FINISHED and r.finish_reason.value == "length"


# ------------------------------------------------------------------ streaming input


def _stream(rid, n) -> Request:
    return Request.input_stream(rid, list(range(1, n + 1)))


def test_decodes_are_served_before_older_prefill_chunks():
    s = _scheduler(budget=8)
    s.add_request(_stream("reader", 8))  # older than r
    _run_step(s)
    s.add_request(_req("r", 2, max_tokens=5))
    _run_step(s)  # r's prompt
    s.update_input("reader", 8, list(range(100, 140)))  # a lot of new input to catch up on
    out = _run_step(s)
    # r decodes first; the reader's chunk takes only what is left of the budget.
    assert [(c.request_id, c.num_tokens) for c in out.chunks] == [("r", 1), ("reader", 7)]
    s.finish_request("reader")
    while s.has_unfinished():
        _run_step(s)
    assert s.kv.num_free_blocks == 64


def test_stream_waiting_for_input_holds_kv_but_takes_no_compute():
    s = _scheduler(budget=32)
    s.add_request(_stream("st", 10))
    out = _run_step(s)
    assert [(c.request_id, c.num_tokens, c.sample) for c in out.chunks] == [("st", 10, False)]
    req = s.requests["st"]
    assert req.status == RequestStatus.WAITING_FOR_INPUT and req.num_computed_tokens == 10
    assert not s.has_pending_work() and s.has_unfinished()
    assert _run_step(s).chunks == []
    s.update_input("st", 10, [50, 51, 52])
    assert req.status == RequestStatus.RUNNING and s.has_pending_work()
    out = _run_step(s)
    assert [(c.num_tokens, c.start_position, c.sample) for c in out.chunks] == [(3, 10, False)]
    assert s.kv.num_free_blocks == 64 - 4  # 13 tokens in blocks of 4
    s.finish_request("st")
    assert s.kv.num_free_blocks == 64


def test_update_mode_recomputes_from_the_first_changed_token():
    s = _scheduler(budget=64)
    s.add_request(_stream("st", 30))
    _run_step(s)
    computed = s.num_computed_tokens
    # Keep 13 tokens (3 full blocks of 4 and one token of the 4th), then 5 new ones.
    s.update_input("st", 13, [90, 91, 92, 93, 94])
    req = s.requests["st"]
    assert req.num_computed_tokens == 13 and len(req.block_ids) == 4
    assert req.all_token_ids == list(range(1, 14)) + [90, 91, 92, 93, 94]
    out = _run_step(s)
    assert [(c.start_position, c.token_ids) for c in out.chunks] == [(13, [90, 91, 92, 93, 94])]
    assert s.num_computed_tokens - computed == 5
    # The partly kept block left the prefix cache before being overwritten: a request with
    # the old tokens finds only the 3 untouched blocks.
    s.add_request(_req("old", 30))
    assert s.kv.prefix_cache.match(s.requests["old"]) == req.block_ids[:3]
    s.kv.pool.release(req.block_ids[:3])
    s.finish_request("old")
    s.finish_request("st")
    assert s.kv.num_free_blocks == 64


def test_update_mode_leaves_a_shared_block_to_its_other_holder():
    s = _scheduler(budget=64)
    s.add_request(_stream("st", 16))
    _run_step(s)
    child = _req("gen", 16, max_tokens=2, fork_from="st")
    s.add_request(child)
    _run_step(s)
    assert child.block_ids[:3] == s.requests["st"].block_ids[:3]  # 15 of 16 tokens: 3 blocks
    s.update_input("st", 10, [70])
    reader = s.requests["st"]
    # Block 2 (tokens 8-11) is shared with the generation: recompute it from its start.
    assert reader.num_computed_tokens == 8 and reader.block_ids == child.block_ids[:2]
    while s.has_pending_work():
        _run_step(s)
    assert reader.num_computed_tokens == 11
    s.finish_request("st")
    assert s.kv.num_free_blocks == 64


def test_generation_waits_for_the_stream_to_compute_what_it_shares():
    s = _scheduler(budget=8)
    s.add_request(_stream("st", 20))
    _run_step(s)  # 8 of 20 tokens
    s.add_request(_req("gen", 20, max_tokens=1, fork_from="st"))
    out = _run_step(s)
    assert [c.request_id for c in out.chunks] == ["st"]  # gen waits: st computes 16 of 20
    out = _run_step(s)
    assert [c.request_id for c in out.chunks] == ["st"]
    out = _run_step(s)
    # The stream caught up; gen shares 4 full blocks and computes only its last token.
    assert [(c.request_id, c.start_position, c.num_tokens, c.sample) for c in out.chunks] == [("gen", 16, 4, True)]
    s.finish_request("st")
    while s.has_unfinished():
        _run_step(s)
    assert s.kv.num_free_blocks == 64


def test_input_streams_take_no_batch_slot():
    s = _scheduler(budget=64, seqs=2)
    for i in range(3):
        s.add_request(Request.input_stream(f"st{i}", [100 * (i + 1) + t for t in range(5)]))
    s.add_request(_req("a", 3))
    s.add_request(_req("b", 3))
    s.add_request(_req("c", 3))
    out = _run_step(s)
    # Three streams and two requests run; the third request waits for a batch slot.
    assert sorted(c.request_id for c in out.chunks) == ["a", "b", "st0", "st1", "st2"]
    assert [r.request_id for r in s.waiting] == ["c"]
    for i in range(3):
        s.finish_request(f"st{i}")
    while s.has_unfinished():
        _run_step(s)
    assert s.kv.num_free_blocks == 64


def test_scheduler_stats_report_its_own_load_and_its_caches():
    s = _scheduler(blocks=64)
    s.add_request(Request.input_stream("st", [50 + t for t in range(6)]))
    s.add_request(_req("a", 5))
    stats = s.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_input_streams) == (0, 2, 1)
    _run_step(s)
    stats = s.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_computed_tokens) == (2, 0, 11)
    assert stats.kv == s.kv.stats() and stats.kv.num_free_blocks == 64 - 2 - 2
    s.finish_request("st")
    s.finish_request("st")  # a second finish finds nothing: the count stays right
    assert s.stats().num_input_streams == 0
    while s.has_unfinished():
        _run_step(s)
    assert s.stats().num_running == 0 and s.kv.num_free_blocks == 64
