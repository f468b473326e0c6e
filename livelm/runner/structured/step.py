"""The runner's constrained decoding: a matcher per constrained sequence, and the token
bitmask of each step, filled in a worker thread while the model runs.

``start`` (before the model's forward) hands the step's constrained sequences to one
worker thread, which syncs each matcher to its sequence's output tokens and fills one
bitmask row per sequence (llguidance's parallel fill; it releases the GIL). ``result``
(before sampling) joins it. The rows come back with every engine EOS id allowed wherever
the grammar may end, and a sequence whose constraint failed (its tokens left the
grammar, the grammar hit a limit, nothing at all is allowed) is reported in ``errors``,
so that only that request fails.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import llguidance
import numpy as np
import torch

from livelm.core.scheduler_output import ScheduledChunk
from livelm.runner.structured.backend import GrammarBackend
from livelm.runner.structured.matcher import ConstraintViolation, SequenceMatcher


@dataclass
class StepMasks:
    """The bitmask of one step's constrained sequences: row ``row_of[request_id]`` of
    ``bitmask`` (``[M, W]`` int32 on the CPU; bit ``t % 32`` of word ``t // 32`` allows
    token ``t``); ``errors`` holds the sequences that cannot be sampled, with why."""

    bitmask: torch.Tensor
    row_of: dict[str, int]
    errors: dict[str, Exception] = field(default_factory=dict)
    fill_s: float = 0.0  # seconds the worker spent syncing and filling (for benchmarks)


def _bit(token_id: int) -> tuple[int, int]:
    """(word, int32 value with only that token's bit set)."""
    word, b = divmod(token_id, 32)
    return word, (1 << b) if b < 31 else -(1 << 31)


@dataclass
class FillStats:
    """Running totals of the bitmask fills (read by benchmarks): steps with constrained
    rows, rows filled, the worker's seconds, and the seconds sampling waited for it."""

    steps: int = 0
    rows: int = 0
    fill_s: float = 0.0
    wait_s: float = 0.0


class MaskJob:
    """A step's bitmask being filled; ``result`` waits for it (once)."""

    def __init__(self, future: Future | None, done: StepMasks | None = None, stats: FillStats | None = None) -> None:
        self._future = future
        self._done = done
        self._stats = stats

    def result(self) -> StepMasks:
        """The filled masks (raises what the worker raised)."""
        if self._done is None:
            assert self._future is not None
            t0 = time.perf_counter()
            self._done = self._future.result()
            if self._stats is not None:
                s = self._stats
                s.steps += 1
                s.rows += len(self._done.row_of)
                s.fill_s += self._done.fill_s
                s.wait_s += time.perf_counter() - t0
        return self._done

    def wait(self) -> None:
        """Wait until the worker is done with the matchers, whatever it raised."""
        if self._future is not None:
            self._future.exception()


class StructuredDecoding:
    """Per-sequence matchers of one runner, and the bitmask fill of each step."""

    def __init__(self, backend: GrammarBackend) -> None:
        self.backend = backend
        self._matchers: dict[str, SequenceMatcher] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._executor: llguidance.LLExecutor | None = None
        self.stats = FillStats()

    @property
    def num_matchers(self) -> int:
        """Sequences with a live matcher."""
        return len(self._matchers)

    def drop(self, request_ids) -> None:
        """Forget finished sequences' matchers."""
        for rid in request_ids:
            self._matchers.pop(rid, None)

    def start(self, chunks: list[ScheduledChunk]) -> MaskJob | None:
        """Start filling the masks of the constrained chunks among ``chunks`` (all of them
        sample this step); None when none is constrained."""
        jobs: list[tuple[str, SequenceMatcher, list[int]]] = []
        errors: dict[str, Exception] = {}
        for c in chunks:
            structured = c.sampling_params.structured if c.sampling_params is not None else None
            if structured is None:
                continue
            m = self._matchers.get(c.request_id)
            if m is None:
                try:
                    # Checked at admission, so a cache hit unless it was evicted since.
                    m = SequenceMatcher(self.backend.compile(structured))
                except Exception as e:  # noqa: BLE001 - this request's constraint only
                    errors[c.request_id] = e
                    continue
                self._matchers[c.request_id] = m
            jobs.append((c.request_id, m, c.output_token_ids))
        if not jobs and not errors:
            return None
        if not jobs:
            return MaskJob(None, StepMasks(torch.zeros(0, 0, dtype=torch.int32), {}, errors), self.stats)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livelm-grammar")
        return MaskJob(self._pool.submit(self._fill, jobs, errors), stats=self.stats)

    def _llg_executor(self) -> llguidance.LLExecutor:
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        return self._executor

    def _fill(self, jobs: list[tuple[str, SequenceMatcher, list[int]]], errors: dict[str, Exception]) -> StepMasks:
        # numpy, not torch, in this thread: a torch op here could start a second OpenMP
        # team beside the model's, and these arrays are small.
        t0 = time.perf_counter()
        ready: list[tuple[str, SequenceMatcher]] = []
        for rid, m, out in jobs:
            try:
                m.sync(out)
            except Exception as e:  # noqa: BLE001 - this sequence's matcher only
                errors[rid] = e
                continue
            ready.append((rid, m))
        bitmask = np.zeros((len(ready), self.backend.mask_words), dtype=np.int32)
        if ready:
            self._fill_rows([m.matcher for _, m in ready], bitmask)
        row_of: dict[str, int] = {}
        for i, (rid, m) in enumerate(ready):
            if m.matcher.is_error():
                errors[rid] = ConstraintViolation(f"the output constraint failed: {m.matcher.get_error()}")
            else:
                row_of[rid] = i
        if row_of:
            self._allow_every_eos(bitmask)
            empty = ~bitmask.any(axis=1)
            for rid, i in list(row_of.items()):
                if empty[i]:
                    errors[rid] = ConstraintViolation("the output constraint allows no token here")
                    del row_of[rid]
        return StepMasks(torch.from_numpy(bitmask), row_of, errors, time.perf_counter() - t0)

    def _fill_rows(self, matchers: list[llguidance.LLMatcher], bitmask: np.ndarray) -> None:
        row_bytes = bitmask.shape[1] * 4
        ptr = bitmask.ctypes.data
        try:
            self._llg_executor().unsafe_compute_mask_ptr(
                [(m, i) for i, m in enumerate(matchers)], ptr, row_bytes, bitmask.shape[0]
            )
            return
        except Exception:  # noqa: BLE001 - find the row that fails, below
            pass
        for i, m in enumerate(matchers):
            try:
                m.unsafe_compute_mask_ptr(ptr + i * row_bytes, row_bytes)
            except Exception:  # noqa: BLE001 - the row stays all zero: reported as empty
                bitmask[i] = 0

    def _allow_every_eos(self, bitmask: np.ndarray) -> None:
        """Where llguidance allows its end token (the grammar may end), allow every EOS
        id of the engine (a model can have several)."""
        others = [t for t in self.backend.eos_token_ids if t != self.backend.eos_token_id]
        if not others:
            return
        word, bit = _bit(self.backend.eos_token_id)
        may_end = (bitmask[:, word] & np.int32(bit)) != 0
        if not may_end.any():
            return
        for t in others:
            w, b = _bit(t)
            if w < bitmask.shape[1]:
                bitmask[may_end, w] |= np.int32(b)
