"""When each session starts: a Poisson or gamma process at a request rate, or a trace's
own timestamps (optionally time-scaled)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from livelm.bench.workload import Workload


@dataclass(frozen=True)
class ArrivalProcess:
    """``rate`` sessions per second (``inf``: all at once) with gamma-distributed gaps of
    shape ``burstiness`` (1 is a Poisson process, below 1 burstier, above 1 more even;
    the mean gap stays 1/rate). ``use_timestamps`` replays a trace's own arrival times
    multiplied by ``time_scale`` (0.5 plays it twice as fast)."""

    rate: float = math.inf
    burstiness: float = 1.0
    use_timestamps: bool = False
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"request rate must be > 0 (or inf), got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if not self.time_scale > 0:
            raise ValueError(f"time scale must be > 0, got {self.time_scale}")

    def describe(self) -> str:
        """For tables: ``trace x0.5``, ``inf``, ``2 (gamma 0.5)``."""
        if self.use_timestamps:
            return "trace" if self.time_scale == 1 else f"trace x{self.time_scale:g}"
        if math.isinf(self.rate):
            return "inf"
        return f"{self.rate:g}" if self.burstiness == 1 else f"{self.rate:g} (gamma {self.burstiness:g})"

    def start_times(self, workload: Workload, seed: int = 0) -> list[float]:
        """Start time (seconds from the run's start) of each session, in session order."""
        if self.use_timestamps:
            if not workload.has_timestamps:
                raise ValueError(f"workload {workload.name} has no timestamps to replay")
            return [s.arrival_s * self.time_scale for s in workload.sessions]
        return gamma_arrivals(len(workload.sessions), self.rate, self.burstiness, seed)


def gamma_arrivals(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """``n`` arrival times, the first at 0: gaps ~ Gamma(shape=burstiness,
    scale=1/(rate*burstiness)), whose mean is 1/rate; all zeros for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.gammavariate(burstiness, scale)
        times.append(t)
    return times
