"""The metric math of ``livelm bench`` on synthetic timelines with known answers."""

from __future__ import annotations

import math

import pytest

from livelm.bench.arrivals import ArrivalProcess, gamma_arrivals
from livelm.bench.lengths import LengthDist
from livelm.bench.metrics import (
    RequestRecord,
    compute_metrics,
    max_concurrency,
    meets_slos,
    parse_slos,
    percentile,
    summarize_ms,
)


def rec(start: float, chunks: list[float], out_tokens: int, prompt: int = 10) -> RequestRecord:
    return RequestRecord(start_s=start, success=True, chunk_times_s=chunks, prompt_tokens=prompt,
                         output_tokens=out_tokens)


def test_percentile_interpolates_linearly_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    # position (4 - 1) * 0.9 = 2.7 -> 3 + 0.7 * (4 - 3)
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_per_request_ttft_itl_e2e_tpot():
    r = rec(0.0, [0.5, 0.6, 0.8, 1.1], out_tokens=4)
    assert r.ttft_s == 0.5
    assert r.e2e_s == 1.1
    assert r.itl_s == pytest.approx([0.1, 0.2, 0.3])
    # (1.1 - 0.5) / (4 - 1)
    assert r.tpot_s == pytest.approx(0.2)
    # Chunks that carry several tokens: TPOT uses the token count, ITL the chunk gaps.
    r2 = rec(0.0, [0.2, 1.0], out_tokens=9)
    assert r2.tpot_s == pytest.approx(0.1)
    assert r2.itl_s == pytest.approx([0.8])
    assert rec(0.0, [0.3], out_tokens=1).tpot_s is None


def test_run_metrics_on_a_known_timeline():
    records = [
        rec(0.0, [0.1, 0.2, 0.3], 3, prompt=10),         # ttft 100, tpot 100, e2e 300
        rec(0.5, [0.2, 0.5, 0.8, 1.1, 1.4], 5, prompt=20),  # ttft 200, tpot 300, e2e 1400
        rec(1.0, [0.4], 1, prompt=30),                   # ttft 400, no tpot, e2e 400
        RequestRecord(start_s=1.5, success=False, error="HTTP 503: busy"),
    ]
    m = compute_metrics(records, duration_s=2.0, slos={"ttft": 250, "tpot": 150})
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 9
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(34.5)
    assert m["ttft_ms"]["mean"] == pytest.approx(700 / 3)
    assert m["ttft_ms"]["p50"] == pytest.approx(200)
    assert m["ttft_ms"]["p90"] == pytest.approx(360)  # 200 + 0.8 * (400 - 200)
    assert m["tpot_ms"]["mean"] == pytest.approx(200)   # one-token request has no TPOT
    assert m["tpot_ms"]["p99"] == pytest.approx(298)    # 100 + 0.99 * 200
    assert m["itl_ms"]["p50"] == pytest.approx(300)     # gaps 100, 100, 300, 300, 300, 300
    assert m["itl_ms"]["mean"] == pytest.approx(1400 / 6)
    assert m["e2el_ms"]["p50"] == pytest.approx(400)
    assert m["e2el_ms"]["p99"] == pytest.approx(400 + 0.98 * 1000)
    # Goodput: request 1 meets both, request 2 fails TPOT, request 3 fails TTFT.
    assert m["good_requests"] == 1
    assert m["goodput"] == pytest.approx(0.5)
    assert m["good_fraction"] == pytest.approx(1 / 3)
    assert m["first_errors"] == ["HTTP 503: busy"]
    # Overlaps: [0, 0.3], [0.5, 1.9], [1.0, 1.4] -> two at once at most.
    assert m["max_concurrency_seen"] == 2


def test_goodput_one_token_counts_as_tpot_zero_and_itl_slo_checks_every_gap():
    one = rec(0.0, [0.1], 1)
    assert meets_slos(one, {"tpot": 1.0, "ttft": 100})
    spiky = rec(0.0, [0.1, 0.15, 0.9], 3)  # TPOT 400 ms, worst gap 750 ms
    assert meets_slos(spiky, {"tpot": 400})
    assert not meets_slos(spiky, {"itl": 500})
    assert meets_slos(spiky, {"e2el": 900}) and not meets_slos(spiky, {"e2el": 899})


def test_no_completed_requests_gives_nan_not_an_error():
    m = compute_metrics([RequestRecord(0.0, error="boom")], duration_s=1.0, slos={"ttft": 1})
    assert m["completed"] == 0 and m["failed"] == 1
    assert math.isnan(m["ttft_ms"]["p50"]) and math.isnan(m["good_fraction"])
    assert summarize_ms([])["mean"] != summarize_ms([])["mean"]  # NaN


def test_parse_slos():
    assert parse_slos(["ttft=1000", "tpot=100", "e2e=5000"]) == {"ttft": 1000, "tpot": 100, "e2el": 5000}
    for bad in ["ttft", "foo=1", "ttft=abc", "ttft=0"]:
        with pytest.raises(ValueError):
            parse_slos([bad])


def test_max_concurrency_back_to_back_is_one():
    assert max_concurrency([rec(0.0, [1.0], 1), rec(1.0, [1.0], 1)]) == 1


def test_arrivals_mean_rate_and_burstiness():
    n, rate = 4000, 5.0
    for shape in (1.0, 0.25, 4.0):
        times = gamma_arrivals(n, rate, shape, seed=1)
        assert times[0] == 0.0 and times == sorted(times)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        mean = sum(gaps) / len(gaps)
        assert mean == pytest.approx(1 / rate, rel=0.1)
        cv2 = sum((g - mean) ** 2 for g in gaps) / len(gaps) / mean**2
        assert cv2 == pytest.approx(1 / shape, rel=0.25)  # gamma: CV^2 = 1 / shape
    assert gamma_arrivals(3, math.inf) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        ArrivalProcess(rate=0)


def test_length_distributions():
    import random

    rng = random.Random(0)
    assert LengthDist.parse("64").sample_int(rng) == 64
    u = LengthDist.parse("uniform:10:20")
    draws = [u.sample_int(rng) for _ in range(500)]
    assert min(draws) == 10 and max(draws) == 20
    ln = LengthDist.parse("lognormal:100:0.5")
    draws = sorted(ln.sample_int(rng) for _ in range(2001))
    assert 90 <= draws[1000] <= 110  # the median
    assert all(LengthDist.parse("normal:1:50").sample_int(rng) >= 1 for _ in range(100))
    assert LengthDist.parse("exponential:0", minimum=0).sample(rng) == 0.0
    assert str(LengthDist.parse("uniform:10:20")) == "uniform:10:20"
    for bad in ["zipf:1", "uniform:5", "uniform:9:3", "abc", "-3"]:
        with pytest.raises(ValueError):
            LengthDist.parse(bad)
