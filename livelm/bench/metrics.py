"""Serving metrics with the definitions of vLLM's ``bench serve``.

Per request (times from the moment the request is sent):

- TTFT: until the first chunk that carries output text;
- ITL: the gaps between consecutive text chunks (a chunk holding several tokens is one gap);
- E2E: until the last text chunk;
- TPOT = (E2E - TTFT) / (output tokens - 1), for requests with more than one output token
  (for goodput a one-token request counts with TPOT 0).

Over a run of ``duration`` seconds: request throughput = completed / duration, output
token throughput = output tokens / duration, total token throughput = (prompt + output
tokens) / duration, goodput = completed requests meeting every SLO / duration. Failed
requests count in ``failed`` and nowhere else. Percentiles interpolate linearly between
order statistics (numpy's default), so p50 of [1, 2, 3, 4] is 2.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el", "itl")
_SLO_ALIASES = {"e2e": "e2el", "latency": "e2el"}


@dataclass
class RequestRecord:
    """The timeline of one request, in seconds (``start_s`` from the start of the run).

    ``chunk_times_s`` are the arrival times of the text chunks, relative to ``start_s``.
    ``output_tokens`` is the server's count (``usage``) when it sent one, else the
    number of text chunks.
    """

    start_s: float
    success: bool = False
    chunk_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    session: int = 0
    turn: int = 0
    scheduled_s: float = 0.0
    text: str = ""

    @property
    def ttft_s(self) -> float | None:
        """Time to first token."""
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def e2e_s(self) -> float | None:
        """End-to-end latency: until the last text chunk."""
        return self.chunk_times_s[-1] if self.chunk_times_s else None

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive text chunks."""
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); None for fewer than two output tokens."""
        if self.output_tokens < 2 or not self.chunk_times_s:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_ms(values_s: Sequence[float], percentiles: Sequence[float] = PERCENTILES) -> dict:
    """mean, std and percentiles of durations given in seconds, in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        out = {"mean": math.nan, "std": math.nan}
    else:
        mean = sum(ms) / len(ms)
        out = {"mean": mean, "std": math.sqrt(sum((x - mean) ** 2 for x in ms) / len(ms))}
    for q in percentiles:
        out[f"p{q:g}"] = percentile(ms, q)
    return out


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    """``["ttft=1000", "tpot=100"]`` (milliseconds) -> {"ttft": 1000.0, "tpot": 100.0}."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = _SLO_ALIASES.get(name.strip().lower(), name.strip().lower())
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {item!r}: use NAME=MS with NAME one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError as e:
            raise ValueError(f"bad SLO {item!r}: {value!r} is not a number of milliseconds") from e
        if not ms > 0:
            raise ValueError(f"bad SLO {item!r}: milliseconds must be > 0")
        slos[name] = ms
    return slos


def meets_slos(rec: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a completed request met every SLO (milliseconds). ``itl`` means every gap."""
    checks = {
        "ttft": rec.ttft_s or 0.0,
        "tpot": rec.tpot_s or 0.0,  # one-token outputs count as TPOT 0, as in vLLM
        "e2el": rec.e2e_s or 0.0,
        "itl": max(rec.itl_s, default=0.0),
    }
    return all(checks[name] * 1000.0 <= limit for name, limit in slos.items())


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    slos: dict[str, float] | None = None,
    percentiles: Sequence[float] = PERCENTILES,
) -> dict:
    """The run's metrics as a JSON-ready dict (latencies in ms, throughputs per second)."""
    ok = [r for r in records if r.success]
    dur = duration_s if duration_s > 0 else math.nan
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    metrics: dict = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / dur,
        "output_throughput": output_tokens / dur,
        "total_token_throughput": (prompt_tokens + output_tokens) / dur,
        "ttft_ms": summarize_ms([r.ttft_s for r in ok], percentiles),
        "tpot_ms": summarize_ms([t for r in ok if (t := r.tpot_s) is not None], percentiles),
        "itl_ms": summarize_ms([g for r in ok for g in r.itl_s], percentiles),
        "e2el_ms": summarize_ms([r.e2e_s for r in ok], percentiles),
        "max_concurrency_seen": max_concurrency(ok),
    }
    if slos:
        good = sum(meets_slos(r, slos) for r in ok)
        metrics["slos_ms"] = dict(slos)
        metrics["good_requests"] = good
        metrics["goodput"] = good / dur
        metrics["good_fraction"] = good / len(ok) if ok else math.nan
    errors = [r.error for r in records if not r.success and r.error]
    if errors:
        metrics["first_errors"] = sorted(set(errors))[:5]
    return metrics


def max_concurrency(records: Sequence[RequestRecord]) -> int:
    """The most requests that were in flight (sent, last chunk not yet in) at once."""
    events = []
    for r in records:
        if r.e2e_s is not None:
            events.append((r.start_s, 1))
            events.append((r.start_s + r.e2e_s, -1))
    # At equal times an end comes before a start: back-to-back requests never overlap.
    events.sort(key=lambda e: (e[0], e[1]))
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak
