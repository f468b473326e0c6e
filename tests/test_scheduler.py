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
