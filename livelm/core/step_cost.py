"""How long an engine step takes, predicted from its shape, learnt from measured steps.

A step's time on a given host and model is close to linear in three things it does:

    seconds = c0 + c1 * sequences + c2 * tokens + c3 * attention

``sequences`` are the chunks in the step (each one samples a row of logits and has its
own attention call), ``tokens`` the tokens computed (every weight matmul scales with
them), and ``attention`` the query-key pairs attention visits, in units of 1024
(``sum over chunks of n * (start + (n + 1) / 2)``: a decode at context c visits c keys).

:class:`StepCostModel` fits the four coefficients by ridge regression over a window of
the most recent measured steps (old ones leave the window, so the model follows a host
whose speed changes), pulled towards a prior (the coefficients it starts from, or the
last fit) in directions the window does not tell apart: steps that are all decodes never
separate ``c1`` from ``c2``. Pure Python (a 4 x 4 solve), so the scheduler and the
simulator can both use it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ATTENTION_UNIT = 1024.0
# A starting point only (seconds): ~SmolLM2-135M on 2 CPU cores, where a step costs ~5 ms,
# a token ~3 ms and 1024 query-key pairs ~1 ms. Measured steps outweigh it within a few
# steps (see StepCostModel).
DEFAULT_PRIOR: tuple[float, float, float, float] = (5e-3, 1e-3, 3e-3, 1e-3)


@dataclass(frozen=True)
class StepShape:
    """What one step computes, in the cost model's terms."""

    sequences: int = 0
    tokens: int = 0
    attention: float = 0.0  # query-key pairs / ATTENTION_UNIT

    def with_chunk(self, start: int, num_tokens: int) -> StepShape:
        """This shape plus one chunk of ``num_tokens`` tokens at positions from ``start``."""
        return StepShape(
            self.sequences + 1,
            self.tokens + num_tokens,
            self.attention + chunk_attention(start, num_tokens),
        )

    def features(self) -> tuple[float, float, float, float]:
        """The regression's inputs (1, sequences, tokens, attention)."""
        return (1.0, float(self.sequences), float(self.tokens), self.attention)

    @classmethod
    def of_chunks(cls, chunks: Iterable[tuple[int, int]]) -> StepShape:
        """The shape of chunks given as (start position, number of tokens)."""
        sequences = tokens = 0
        attention = 0.0
        for start, n in chunks:  # one object per step, not one per chunk (every step calls this)
            sequences += 1
            tokens += n
            attention += chunk_attention(start, n)
        return cls(sequences, tokens, attention)


def chunk_attention(start: int, num_tokens: int) -> float:
    """Query-key pairs one chunk's causal attention visits, in ATTENTION_UNITs."""
    return num_tokens * (start + (num_tokens + 1) / 2) / ATTENTION_UNIT


class StepCostModel:
    """Predicted seconds of a step from its shape; ``observe`` measured steps to learn.

    ``window`` measured steps count; ``prior_weight`` is how many steps' worth of weight
    the prior has. ``min_observations`` measured steps are needed before ``ready``.
    """

    def __init__(
        self,
        prior: Sequence[float] = DEFAULT_PRIOR,
        window: int = 512,
        prior_weight: float = 1.0,
        min_observations: int = 8,
    ) -> None:
        if len(prior) != 4 or not all(math.isfinite(c) and c >= 0 for c in prior):
            raise ValueError(f"prior must be 4 finite coefficients >= 0, got {prior!r}")
        if window < 1 or min_observations < 0 or not (math.isfinite(prior_weight) and prior_weight > 0):
            raise ValueError("window must be >= 1, min_observations >= 0, prior_weight a finite number > 0")
        self.coefficients: tuple[float, float, float, float] = tuple(float(c) for c in prior)  # type: ignore[assignment]
        self._prior = self.coefficients
        self.window = window
        self.prior_weight = prior_weight
        self.min_observations = min_observations
        self._samples: deque[tuple[tuple[float, ...], float]] = deque()
        # Running sums of the weighted normal equations over the window, so an observation
        # costs O(16) and a refit one 4 x 4 solve (the engine observes every step).
        self._xtx = [[0.0] * 4 for _ in range(4)]
        self._xty = [0.0] * 4
        self.num_observations = 0
        self._stale = False
        self.frozen = False  # True: observations are ignored (a calibrated model, kept as is)

    @property
    def ready(self) -> bool:
        """True once enough steps were measured for the predictions to mean something."""
        return self.num_observations >= self.min_observations

    def observe(self, shape: StepShape, seconds: float) -> None:
        """A step of ``shape`` took ``seconds`` (ignored unless a finite positive time, and
        by a frozen model)."""
        if self.frozen or shape.tokens <= 0 or not (math.isfinite(seconds) and seconds > 0):
            return
        x = shape.features()
        self._samples.append((x, seconds))
        self._accumulate(x, seconds, 1.0)
        if len(self._samples) > self.window:
            old_x, old_y = self._samples.popleft()
            self._accumulate(old_x, old_y, -1.0)
        self.num_observations += 1
        if self.num_observations % (4 * self.window) == 0:
            self._resum()  # wash out the rounding the subtractions accumulate
        self._stale = True

    def _accumulate(self, x: tuple[float, ...], y: float, sign: float) -> None:
        w = sign / (y * y)  # relative errors: long prefill steps do not drown decode steps
        for i in range(4):
            self._xty[i] += w * x[i] * y
            row = self._xtx[i]
            for j in range(4):
                row[j] += w * x[i] * x[j]

    def _resum(self) -> None:
        self._xtx = [[0.0] * 4 for _ in range(4)]
        self._xty = [0.0] * 4
        for x, y in self._samples:
            self._accumulate(x, y, 1.0)

    def predict(self, shape: StepShape) -> float:
        """Predicted seconds for a step of ``shape``."""
        self._refit()
        return sum(c * x for c, x in zip(self.coefficients, shape.features(), strict=True))

    def max_chunk_tokens(self, shape: StepShape, start: int, seconds: float) -> int:
        """The most tokens one more chunk starting at ``start`` may have for the step
        (``shape`` plus that chunk) to stay within ``seconds`` (0 when none fit)."""
        self._refit()
        _, c1, c2, c3 = self.coefficients
        headroom = seconds - self.predict(shape) - c1
        if headroom <= 0:
            return 0
        # c2 n + c3 n (start + (n + 1) / 2) / U <= headroom: a quadratic in n.
        a = c3 / (2 * ATTENTION_UNIT)
        b = c2 + c3 * (start + 0.5) / ATTENTION_UNIT
        if a <= 0:
            return int(headroom / b) if b > 0 else 1 << 30
        return int((-b + math.sqrt(b * b + 4 * a * headroom)) / (2 * a))

    def _refit(self) -> None:
        if not self._stale:
            return
        self._stale = False
        # Ridge regression towards the prior: minimise sum (x.c - y)^2 / y^2 over the window
        # plus, per coefficient, w * mean(x_i^2 / y^2) * (c_i - p_i)^2: the prior weighs as
        # much as w steps would, whatever the units, and decides only what the window
        # cannot tell apart.
        xtx = [row[:] for row in self._xtx]
        xty = self._xty[:]
        count = max(1, len(self._samples))
        for i in range(4):
            reg = self.prior_weight * max(xtx[i][i] / count, 1e-12)
            xtx[i][i] += reg
            xty[i] += reg * self._prior[i]
        solved = _solve(xtx, xty)
        if solved is not None:
            self.coefficients = tuple(max(0.0, c) for c in solved)  # type: ignore[assignment]

    def to_dict(self) -> dict:
        """The fitted coefficients and the measurements behind them (JSON-ready)."""
        self._refit()
        return {"coefficients": list(self.coefficients), "num_observations": self.num_observations}

    @classmethod
    def from_coefficients(cls, coefficients: Sequence[float], frozen: bool = False) -> StepCostModel:
        """A model that predicts with ``coefficients`` (ready, as a calibrated one);
        ``frozen`` keeps them whatever it observes."""
        model = cls(prior=coefficients, min_observations=0)
        model.frozen = frozen
        return model


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None for a singular system."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
