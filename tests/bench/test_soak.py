"""benchmarks/soak.py's pure parts: the job mix, outcomes, RSS figures, KV accounting."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak_script", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_jobs_are_seeded_and_in_range(soak):
    jobs = [soak.draw_job(0, i) for i in range(500)]
    assert jobs == [soak.draw_job(0, i) for i in range(500)]
    assert jobs != [soak.draw_job(1, i) for i in range(500)]
    assert {j.kind for j in jobs} == set(soak.KINDS)
    assert all(10 <= j.prompt_tokens <= 1500 and 8 <= j.max_tokens <= 64 for j in jobs)
    assert all(j.n == 1 and not j.logprobs for j in jobs if j.kind not in
               ("chat", "chat_stream", "completion", "completion_stream"))
    assert all(0 <= j.invalid < soak.INVALID_VARIANTS and 0 <= j.abort_chunks <= 4 for j in jobs)


def test_split_pieces_keeps_the_text(soak):
    for count in range(1, 8):
        pieces = soak.split_pieces("héllo wörld, a text cut anywhere", count)
        assert "".join(pieces) == "héllo wörld, a text cut anywhere"
        assert all(pieces)
    assert soak.split_pieces("ab", 5) == ["a", "b"]


@pytest.mark.parametrize(("kind", "status", "aborted", "error", "outcome"), [
    ("chat", 200, False, None, "ok"),
    ("chat", 200, True, None, "aborted"),
    ("chat", 0, True, None, "aborted"),
    ("chat", 503, True, None, "5xx"),
    ("chat", 500, False, "x", "5xx"),
    ("chat", 429, False, "x", "unexpected_4xx"),
    ("chat", 0, False, "ReadTimeout", "transport_error"),
    ("chat_stream", 200, False, "stream error: x", "stream_error"),
    ("invalid", 400, False, "x", "expected_4xx"),
    ("invalid", 413, False, "x", "expected_4xx"),
    ("invalid", 200, False, None, "unexpected_2xx"),
    ("invalid", 502, False, None, "5xx"),
])
def test_outcomes(soak, kind, status, aborted, error, outcome):
    rec = soak.Record(kind, 0, 0, 0.0, status=status, aborted=aborted, error=error)
    assert rec.outcome == outcome


def test_request_summary_counts_errors_apart_from_aborts_and_expected_4xx(soak):
    recs = [soak.Record("chat", 0, 0, 0.0, latency_s=1.0, status=200),
            soak.Record("chat", 0, 1, 0.0, latency_s=3.0, status=200),
            soak.Record("chat", 1, 2, 0.0, status=0, aborted=True),
            soak.Record("invalid", 0, 3, 0.0, status=400, error="bad"),
            soak.Record("chat_stream", 0, 4, 0.0, latency_s=2.0, ttft_s=0.5, status=200),
            soak.Record("completion", 0, 5, 0.0, status=500, error="boom")]
    s = soak.request_summary(recs)
    assert s["requests"] == 6 and s["aborted"] == 1 and s["expected_4xx"] == 1
    assert s["errors_5xx"] == 1 and s["unexpected_4xx"] == 0
    assert s["by_status"] == {"200": 3, "400": 1, "500": 1, "aborted": 1}
    assert s["latency"]["ok"] == 3 and s["latency"]["e2e_p50_ms"] == pytest.approx(2000.0)
    assert s["by_kind"]["chat_stream"]["ttft_p50_ms"] == pytest.approx(500.0)
    assert [e["status"] for e in s["first_errors"]] == [500]


def test_rss_summary_baselines_and_growth(soak):
    # (t, phase, RSS less committed KV, jobs done, committed KV): the KV column grows as the
    # lazily committed cache fills, and stays out of the growth.
    samples = [(0.0, "start", 90.0, 0, 0.0)]
    samples += [(float(t), "warmup" if t < 60 else "traffic", 100.0 + t / 100, 0, t / 10)
                for t in range(5, 1805, 5)]
    samples += [(1810.0, "idle", 95.0, 0, 180.0)]
    r = soak.rss_summary(samples, warmup_s=60.0, traffic_s=1802.0)
    assert r["before_traffic_mb"] == 90.0 and r["start_mb"] == pytest.approx(100.6)
    assert r["at_5min_mb"] == pytest.approx(103.0) and r["at_30min_mb"] == pytest.approx(118.0)
    assert r["end_mb"] == pytest.approx(118.0) and r["after_idle_mb"] == 95.0
    assert r["growth_5min_to_end_pct"] == pytest.approx(100 * 15 / 103) and r["kv_end_mb"] == 180.0
    short = soak.rss_summary(samples[:7], warmup_s=15.0, traffic_s=30.0)
    assert short["at_5min_mb"] is None and short["growth_5min_to_end_pct"] is None
    assert short["growth_start_to_end_pct"] is not None


def test_leaked_blocks_leave_session_pins_out(soak):
    m = {"livelm_kv_cache_total_blocks": 100.0, "livelm_kv_cache_free_blocks": 90.0,
         "livelm_session_pinned_blocks": 7.0}
    kv = soak.kv_state(m)
    assert kv["used_blocks"] == 10 and kv["leaked_blocks"] == 3 and not soak.settled(kv)
    kv = soak.kv_state({**m, "livelm_kv_cache_free_blocks": 100.0, "livelm_session_pinned_blocks": 0.0})
    assert kv["leaked_blocks"] == 0 and soak.settled(kv)
