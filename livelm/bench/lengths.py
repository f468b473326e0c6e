"""Token-length distributions given on the command line: ``128``, ``uniform:64:256``,
``normal:128:32``, ``lognormal:128:0.5``, ``exponential:128``."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

_KINDS = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2, "exponential": 1}


@dataclass(frozen=True)
class LengthDist:
    """A distribution of positive integers (token counts, or think times in seconds).

    - ``fixed:N`` (or just ``N``): always N;
    - ``uniform:LO:HI``: integers LO..HI inclusive;
    - ``normal:MEAN:STD``: rounded, clipped to at least ``minimum``;
    - ``lognormal:MEDIAN:SIGMA``: heavy-tailed like real prompt lengths (median, log-space sigma);
    - ``exponential:MEAN``.

    Samples below ``minimum`` are raised to it, so a length is never zero.
    """

    kind: str
    params: tuple[float, ...]
    minimum: float = 1

    @staticmethod
    def parse(text: str, minimum: float = 1) -> LengthDist:
        """Parse ``kind:a:b`` (or a bare number, meaning fixed); ValueError on anything else."""
        parts = str(text).strip().split(":")
        if len(parts) == 1:
            parts = ["fixed", parts[0]]
        kind, raw = parts[0].lower(), parts[1:]
        if kind not in _KINDS:
            raise ValueError(f"unknown length distribution {kind!r} in {text!r}; "
                             f"use one of {sorted(_KINDS)} (e.g. uniform:64:256)")
        if len(raw) != _KINDS[kind]:
            raise ValueError(f"{kind} takes {_KINDS[kind]} number(s), got {text!r}")
        try:
            params = tuple(float(x) for x in raw)
        except ValueError as e:
            raise ValueError(f"bad number in length distribution {text!r}") from e
        if any(not math.isfinite(p) or p < 0 for p in params):
            raise ValueError(f"length distribution {text!r} needs finite, non-negative numbers")
        if kind == "uniform" and params[0] > params[1]:
            raise ValueError(f"uniform:LO:HI needs LO <= HI, got {text!r}")
        return LengthDist(kind, params, minimum)

    def sample(self, rng: random.Random) -> float:
        """One draw (a float; :meth:`sample_int` rounds it)."""
        k, p = self.kind, self.params
        if k == "fixed":
            value = p[0]
        elif k == "uniform":
            lo, hi = p
            value = rng.randint(int(lo), int(hi)) if lo == int(lo) and hi == int(hi) else rng.uniform(lo, hi)
        elif k == "normal":
            value = rng.gauss(p[0], p[1])
        elif k == "lognormal":
            value = p[0] * math.exp(rng.gauss(0.0, p[1])) if p[0] > 0 else 0.0
        else:
            value = rng.expovariate(1.0 / p[0]) if p[0] > 0 else 0.0
        return max(value, self.minimum)

    def sample_int(self, rng: random.Random) -> int:
        """One draw rounded to an integer (at least ``minimum``)."""
        return max(round(self.sample(rng)), int(math.ceil(self.minimum)))

    @property
    def mean(self) -> float:
        """The distribution's mean before clipping (for descriptions and sizing)."""
        k, p = self.kind, self.params
        if k in ("fixed", "exponential"):
            return p[0]
        if k == "uniform":
            return (p[0] + p[1]) / 2
        if k == "normal":
            return p[0]
        return p[0] * math.exp(p[1] ** 2 / 2)

    def __str__(self) -> str:
        nums = ":".join(f"{x:g}" for x in self.params)
        return nums if self.kind == "fixed" else f"{self.kind}:{nums}"
