"""How long an engine step takes, predicted from its shape, learnt from measured steps.

A step's time on a given host and model is close to linear in what it does:

    seconds = c0 + c1 * sequences + c2 * tokens
              + c3 * decode attention + c4 * prefill attention + c5 * prefill keys
              + sum over kernel breakpoints b of  j_b * [tokens > b] + h_b * max(0, tokens - b)

``sequences`` are the chunks in the step (each one samples a row of logits and has its
own attention call), ``tokens`` the tokens computed (every weight matmul runs on all of
them at once), ``decode attention`` the keys single-token chunks read, ``prefill
attention`` the query-key pairs multi-token chunks visit (``n * (start + (n + 1) / 2)``)
and ``prefill keys`` the keys those chunks read (``start + n``: a short chunk deep in a
context still walks all of its context, which the pairs alone under-count), all three in
units of 1024. Decode and prefill attention run different kernels, so they get their own
coefficients.

**Kernel breakpoints** are the row counts at which the model's matmuls change kernel (the
runner reports them: on AVX2 hosts quantized weights switch from the fused kernel to
dequantized tiles and a GEMM above ``FUSED_MAX_ROWS_AVX2`` rows; AVX-512 builds switch
twice). Each gives a jump ``j_b`` and a change of slope ``h_b`` once the step's tokens
pass it, so the fit is piecewise linear in tokens instead of one line through both
regimes (which missed small steps on one side by 2x).

:class:`StepCostModel` fits the coefficients by ridge regression over a window of the most
recent measured steps (old ones leave the window, so the model follows a host whose speed
changes), pulled towards a prior (the coefficients it starts from, or the last fit) in
directions the window does not tell apart: steps that are all decodes never separate
``c1`` from ``c2``, and a window without steps past a breakpoint keeps its terms at the
prior. Pure Python (a small dense solve), so the scheduler and the simulator can both use
it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ATTENTION_UNIT = 1024.0
NUM_BASE_FEATURES = 6
# A starting point only (seconds): ~SmolLM2-135M on 2 CPU cores, where a step costs ~10
# ms, a token ~3 ms and 1024 query-key pairs ~1-3 ms. Measured steps outweigh it within a
# few steps (see StepCostModel); breakpoint terms start at 0.
DEFAULT_PRIOR: tuple[float, ...] = (10e-3, 1e-3, 3e-3, 3e-3, 1e-3, 1e-3)


@dataclass(frozen=True)
class StepShape:
    """What one step computes, in the cost model's terms."""

    sequences: int = 0
    tokens: int = 0
    decode_attention: float = 0.0  # keys read by single-token chunks / ATTENTION_UNIT
    prefill_attention: float = 0.0  # query-key pairs of multi-token chunks / ATTENTION_UNIT
    prefill_keys: float = 0.0  # keys read by multi-token chunks / ATTENTION_UNIT

    def with_chunk(self, start: int, num_tokens: int) -> StepShape:
        """This shape plus one chunk of ``num_tokens`` tokens at positions from ``start``."""
        if num_tokens == 1:
            return StepShape(self.sequences + 1, self.tokens + 1,
                             self.decode_attention + (start + 1) / ATTENTION_UNIT,
                             self.prefill_attention, self.prefill_keys)
        return StepShape(self.sequences + 1, self.tokens + num_tokens, self.decode_attention,
                         self.prefill_attention + chunk_attention(start, num_tokens),
                         self.prefill_keys + (start + num_tokens) / ATTENTION_UNIT)

    def base_features(self) -> tuple[float, ...]:
        """The regression's inputs before the breakpoint terms."""
        return (1.0, float(self.sequences), float(self.tokens), self.decode_attention,
                self.prefill_attention, self.prefill_keys)

    @classmethod
    def of_chunks(cls, chunks: Iterable[tuple[int, int]]) -> StepShape:
        """The shape of chunks given as (start position, number of tokens)."""
        sequences = tokens = 0
        decode = prefill = keys = 0.0
        for start, n in chunks:  # one object per step, not one per chunk (every step calls this)
            sequences += 1
            tokens += n
            if n == 1:
                decode += start + 1
            else:
                prefill += n * (start + (n + 1) / 2)
                keys += start + n
        return cls(sequences, tokens, decode / ATTENTION_UNIT, prefill / ATTENTION_UNIT, keys / ATTENTION_UNIT)


def chunk_attention(start: int, num_tokens: int) -> float:
    """Query-key pairs one chunk's causal attention visits, in ATTENTION_UNITs."""
    return num_tokens * (start + (num_tokens + 1) / 2) / ATTENTION_UNIT


class StepCostModel:
    """Predicted seconds of a step from its shape; ``observe`` measured steps to learn.

    ``breakpoints``: the row counts after which the host's matmul kernels change (the
    runner's ``kernel_row_breakpoints``). ``prior``: the 6 base coefficients, or all of
    them (6 + 2 per breakpoint). ``window`` measured steps count; ``prior_weight`` is how
    many steps' worth of weight the prior has. ``min_observations`` measured steps are
    needed before ``ready``.
    """

    def __init__(
        self,
        prior: Sequence[float] = DEFAULT_PRIOR,
        window: int = 512,
        prior_weight: float = 1.0,
        min_observations: int = 8,
        breakpoints: Sequence[int] = (),
    ) -> None:
        bps = tuple(sorted({int(b) for b in breakpoints}))
        if any(b < 1 for b in bps):
            raise ValueError(f"breakpoints must be row counts >= 1, got {tuple(breakpoints)!r}")
        size = NUM_BASE_FEATURES + 2 * len(bps)
        if len(prior) == NUM_BASE_FEATURES:
            prior = tuple(prior) + (0.0,) * (size - NUM_BASE_FEATURES)
        if len(prior) != size or not all(math.isfinite(c) for c in prior) or min(prior[:NUM_BASE_FEATURES]) < 0:
            raise ValueError(f"prior must be {NUM_BASE_FEATURES} finite coefficients >= 0 (or {size} with "
                             f"the breakpoint terms), got {tuple(prior)!r}")
        if window < 1 or min_observations < 0 or not (math.isfinite(prior_weight) and prior_weight > 0):
            raise ValueError("window must be >= 1, min_observations >= 0, prior_weight a finite number > 0")
        self.breakpoints = bps
        self.size = size
        self._coefficients: tuple[float, ...] = tuple(float(c) for c in prior)
        self._prior = self._coefficients
        self.window = window
        self.prior_weight = prior_weight
        self.min_observations = min_observations
        self._samples: deque[tuple[tuple[float, ...], float]] = deque()
        # Running sums of the weighted normal equations over the window, so an observation
        # costs O(size^2) and a refit one small solve (the engine observes every step).
        self._xtx = [[0.0] * size for _ in range(size)]
        self._xty = [0.0] * size
        self.num_observations = 0
        self._stale = False
        self.frozen = False  # True: observations are ignored (a calibrated model, kept as is)

    @property
    def coefficients(self) -> tuple[float, ...]:
        """The fitted coefficients (base ones, then each breakpoint's jump and slope)."""
        self._refit()
        return self._coefficients

    @property
    def ready(self) -> bool:
        """True once enough steps were measured for the predictions to mean something."""
        return self.num_observations >= self.min_observations

    def features(self, shape: StepShape) -> tuple[float, ...]:
        """The regression's inputs for ``shape``: the base ones, then each breakpoint's."""
        x = shape.base_features()
        for b in self.breakpoints:
            over = shape.tokens - b
            x += (1.0, float(over)) if over > 0 else (0.0, 0.0)
        return x

    def observe(self, shape: StepShape, seconds: float) -> None:
        """A step of ``shape`` took ``seconds`` (ignored unless a finite positive time, and
        by a frozen model)."""
        if self.frozen or shape.tokens <= 0 or not (math.isfinite(seconds) and seconds > 0):
            return
        x = self.features(shape)
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
        for i in range(self.size):
            if x[i] == 0.0:
                continue  # breakpoint terms are zero for most steps
            self._xty[i] += w * x[i] * y
            row = self._xtx[i]
            for j in range(self.size):
                row[j] += w * x[i] * x[j]

    def _resum(self) -> None:
        self._xtx = [[0.0] * self.size for _ in range(self.size)]
        self._xty = [0.0] * self.size
        for x, y in self._samples:
            self._accumulate(x, y, 1.0)

    def predict(self, shape: StepShape) -> float:
        """Predicted seconds for a step of ``shape`` (never negative)."""
        return max(0.0, sum(c * x for c, x in zip(self.coefficients, self.features(shape), strict=True)))

    def max_chunk_tokens(self, shape: StepShape, start: int, seconds: float) -> int:
        """The most tokens one more prefill chunk starting at ``start`` may have for the
        step (``shape`` plus that chunk) to stay within ``seconds`` (0 when none fit)."""
        c, tokens = self.coefficients, shape.tokens
        headroom = seconds - self.predict(shape)
        # A chunk of n tokens adds  a n^2 + slope n + const  within a span of n where no
        # breakpoint is crossed; the fit keeps every slope >= 0, so solve span by span,
        # the highest first: the first that fits holds the largest n.
        a = c[4] / (2 * ATTENTION_UNIT)
        edges = [b - tokens for b in self.breakpoints if b - tokens >= 1]  # n where a breakpoint is still off
        spans = list(zip([0, *edges], [*edges, 1 << 30], strict=True))
        for lo_edge, hi in reversed(spans):
            lo = lo_edge + 1
            slope = c[2] + c[4] * (start + 0.5) / ATTENTION_UNIT + c[5] / ATTENTION_UNIT
            const = c[1] + c[5] * start / ATTENTION_UNIT
            for j, b in enumerate(self.breakpoints):
                if tokens + lo > b:  # past this breakpoint throughout the span
                    jump, hinge = c[NUM_BASE_FEATURES + 2 * j], c[NUM_BASE_FEATURES + 2 * j + 1]
                    slope += hinge
                    if tokens <= b:  # the chunk crosses it: its jump, and its slope from b on
                        const += jump + hinge * (tokens - b)
            room = headroom - const

            def added(n: int) -> float:
                return a * n * n + slope * n  # noqa: B023 - called within this iteration only

            if added(lo) > room:
                continue
            if a > 0:
                n = int((-slope + math.sqrt(slope * slope + 4 * a * room)) / (2 * a))
            else:
                n = int(room / slope) if slope > 0 else hi
            n = min(max(n, lo), hi)
            while n > lo and added(n) > room:  # float rounding at the edge
                n -= 1
            return n
        return 0

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
        for i in range(self.size):
            reg = self.prior_weight * max(xtx[i][i] / count, 1e-12)
            xtx[i][i] += reg
            xty[i] += reg * self._prior[i]
        solved = _solve(xtx, xty)
        if solved is not None:
            self._coefficients = self._physical(solved)

    def _physical(self, solved: Sequence[float]) -> tuple[float, ...]:
        """The fitted coefficients made physical: the base ones >= 0; a breakpoint's jump of
        either sign (the next kernel can be cheaper), but its change of slope never makes a
        token cost less than nothing."""
        out = [max(0.0, v) for v in solved[:NUM_BASE_FEATURES]]
        slope = out[2]
        for j in range(len(self.breakpoints)):
            jump, hinge = solved[NUM_BASE_FEATURES + 2 * j], solved[NUM_BASE_FEATURES + 2 * j + 1]
            hinge = max(hinge, -slope)
            slope += hinge
            out += [jump, hinge]
        return tuple(out)

    def to_dict(self) -> dict:
        """The fitted coefficients, the breakpoints and the measurements behind them (JSON-ready)."""
        return {"coefficients": list(self.coefficients), "breakpoints": list(self.breakpoints),
                "num_observations": self.num_observations}

    @classmethod
    def from_coefficients(cls, coefficients: Sequence[float], frozen: bool = False,
                          breakpoints: Sequence[int] = ()) -> StepCostModel:
        """A model that predicts with ``coefficients`` (ready, as a calibrated one);
        ``frozen`` keeps them whatever it observes."""
        model = cls(prior=coefficients, min_observations=0, breakpoints=breakpoints)
        model.frozen = frozen
        return model

    def frozen_copy(self) -> StepCostModel:
        """A frozen model that predicts what this one predicts now."""
        return StepCostModel.from_coefficients(self.coefficients, frozen=True, breakpoints=self.breakpoints)


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
