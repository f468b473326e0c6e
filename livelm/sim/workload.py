"""Requests for the simulator: lengths and arrival times only (no text is needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from livelm.bench.arrivals import gamma_arrivals
from livelm.bench.traces import read_burstgpt_rows


@dataclass(frozen=True)
class SimRequest:
    """One request to replay: when it arrives, its lengths, and its scheduling fields."""

    arrival_s: float
    input_tokens: int
    output_tokens: int
    tenant: str = ""
    priority: int = 0
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"arrival_s must be a finite number >= 0, got {self.arrival_s!r}")
        if self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError("a simulated request needs at least one input and one output token")


def burstgpt_requests(path: str | Path, num_requests: int | None = None, time_scale: float = 1.0,
                      max_input_len: int | None = None, max_output_len: int | None = None) -> list[SimRequest]:
    """A BurstGPT trace's successful requests with their own timestamps (times
    ``time_scale``: 0.5 replays it twice as fast), lengths clipped as given."""
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
    rows = [r for r in read_burstgpt_rows(path) if r["input"] > 0 and r["output"] > 0]
    rows = rows[:num_requests] if num_requests is not None else rows
    if not rows:
        raise ValueError(f"no successful requests in {path}")
    t0 = rows[0]["timestamp"]
    return [
        SimRequest((r["timestamp"] - t0) * time_scale,
                   min(r["input"], max_input_len) if max_input_len else r["input"],
                   min(r["output"], max_output_len) if max_output_len else r["output"],
                   tenant=r.get("model", ""))
        for r in rows
    ]


def synthetic_requests(num_requests: int, rate: float, input_tokens: int, output_tokens: int,
                       burstiness: float = 1.0, seed: int = 0) -> list[SimRequest]:
    """``num_requests`` of fixed lengths arriving as a Poisson (burstiness 1) or gamma process."""
    times = gamma_arrivals(num_requests, rate, burstiness, seed)
    return [SimRequest(t, input_tokens, output_tokens) for t in times]
