"""Calibrate the step cost model on this host: run a real engine through a mixed workload
(decodes of many batch sizes alongside prefill chunks of many lengths) and fit the model
to every step it measured; and measure what serving adds to each step (HTTP streaming and
the hand-off between the server's threads), which an in-process engine never pays."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from livelm.core.step_cost import StepCostModel, StepShape
from livelm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from livelm.engine.engine import Engine


def calibrate(engine: Engine, num_requests: int = 48, seed: int = 0) -> tuple[StepCostModel, list[tuple[StepShape, float]]]:
    """Fit a StepCostModel to ``engine``'s measured steps: batches of 1-64 requests that
    decode alone, short prompts (2-96 tokens) prefilled alone, then a staggered workload where a request (prompt 16-768 tokens, 4-64
    output tokens) joins every other step, so steps mix decodes with prefill chunks up to
    the token budget. Returns the model and the (shape, seconds) samples."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    samples: list[tuple[StepShape, float]] = []
    observe = engine.scheduler.observe_step

    def record(scheduled, seconds: float) -> None:
        shape = StepShape.of_chunks((c.start_position, c.num_tokens) for c in scheduled.chunks)
        samples.append((shape, seconds))
        observe(scheduled, seconds)

    engine.scheduler.observe_step = record  # type: ignore[method-assign]
    try:
        warm = [rng.randrange(3, vocab) for _ in range(64)]
        engine.add("calibrate-warmup", warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        while engine.scheduler.has_unfinished():
            engine.step()
        samples.clear()  # the first steps pay for one-time set-up
        # Decode-only steps at several batch sizes first: they separate the per-sequence
        # cost from the per-token one, which mixed steps alone leave confounded.
        # Batch sizes on both sides of the kernel breakpoints (48 rows on AVX2 hosts).
        for batch in (1, 2, 4, 8, 16, 32, 48, 64):
            for i in range(batch):
                prompt = [rng.randrange(3, vocab) for _ in range(32)]
                engine.add(f"calibrate-decode-{batch}-{i}", prompt,
                           SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
            while engine.scheduler.has_unfinished():
                engine.step()
        # Short prefills alone (2-96 tokens, one step each): the small-row region where
        # the kernels switch, which the staggered workload's long chunks rarely sample.
        for i, n_in in enumerate((2, 4, 8, 12, 16, 24, 32, 40, 48, 49, 56, 64, 80, 96)):
            prompt = [rng.randrange(3, vocab) for _ in range(n_in)]
            engine.add(f"calibrate-short-{i}", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            while engine.scheduler.has_unfinished():
                engine.step()
        pending = num_requests
        step = 0
        while pending or engine.scheduler.has_unfinished():
            if pending and step % 2 == 0:
                n_in = int(min(768, max(16, rng.lognormvariate(4.8, 0.9))))
                prompt = [rng.randrange(3, vocab) for _ in range(n_in)]
                engine.add(f"calibrate-{pending}", prompt,
                           SamplingParams(temperature=0, max_tokens=rng.randrange(4, 65), ignore_eos=True))
                pending -= 1
            engine.step()
            step += 1
    finally:
        del engine.scheduler.observe_step  # the instance attribute: back to the method
    model = StepCostModel(window=max(1, len(samples)), min_observations=0,
                          breakpoints=engine.scheduler.step_cost.breakpoints)
    for shape, seconds in samples:
        model.observe(shape, seconds)
    return model, samples


# The serving-overhead probe: single requests one after another (a batch of one, where the
# overhead is the largest share of a step), short prompts, enough tokens for a stable TPOT.
_PROBE_INPUT, _PROBE_OUTPUT, _PROBE_REQUESTS = 32, 64, 6


def serving_overhead_from(tpot_p50_ms: float, cost_model: StepCostModel,
                          input_len: int = _PROBE_INPUT, output_len: int = _PROBE_OUTPUT) -> float:
    """Seconds a served decode step takes beyond what ``cost_model`` predicts for it: the
    measured TPOT median of single requests minus the median predicted batch-of-one decode
    step over their positions (0 when serving measured no slower)."""
    if not math.isfinite(tpot_p50_ms) or tpot_p50_ms <= 0:
        raise ValueError(f"the measured TPOT must be a positive number of ms, got {tpot_p50_ms!r}")
    predicted = statistics.median(
        cost_model.predict(StepShape.of_chunks([(pos, 1)])) for pos in range(input_len, input_len + output_len)
    )
    return max(0.0, tpot_p50_ms / 1000.0 - predicted)


def measure_serving_overhead(cost_model: StepCostModel, model: str | None = None, threads: int | None = None,
                             seed: int = 1) -> tuple[float, float]:
    """Run ``livelm bench serve`` (which starts ``livelm serve`` on 127.0.0.1) with single
    streamed requests one at a time and return (overhead seconds per step, as
    :func:`serving_overhead_from` computes it, the measured TPOT median in ms)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "livelm.entrypoints.cli", "bench", "serve", "--request-rate", "inf",
               "--max-concurrency", "1", "--num-requests", str(_PROBE_REQUESTS), "--input-len", str(_PROBE_INPUT),
               "--output-len", str(_PROBE_OUTPUT), "--prompt-format", "ids", "--seed", str(seed),
               "--result-dir", tmp, "--name", "overhead", "--no-progress", "--warmup", "2"]
        if model is not None:
            cmd += ["--model", model]
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        record = json.loads((Path(tmp) / "overhead.jsonl").read_text().splitlines()[-1])
    tpot = float(record["metrics"]["tpot_ms"]["p50"])
    return serving_overhead_from(tpot, cost_model), tpot


def save_cost_model(cost_model: StepCostModel, path: str | Path, **info) -> None:
    """Write the fitted coefficients (and ``info``: model, host, date) as JSON."""
    Path(path).write_text(json.dumps({**cost_model.to_dict(), **info}, indent=2) + "\n")


def load_cost_model(path: str | Path) -> StepCostModel:
    """A frozen StepCostModel from a file ``save_cost_model`` wrote (ValueError if bad)."""
    try:
        data = json.loads(Path(path).read_text())
        coefficients = [float(c) for c in data["coefficients"]]
        breakpoints = [int(b) for b in data.get("breakpoints", [])]
        return StepCostModel.from_coefficients(coefficients, frozen=True, breakpoints=breakpoints)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a step cost model file of this livelm version "
                         f"(livelm simulate --calibrate writes one): {e}") from e


def load_serving_overhead(path: str | Path) -> float:
    """The serving overhead per step (seconds) a cost model file records, 0 without one
    (``livelm simulate --calibrate OUT --serving`` measures it)."""
    data = json.loads(Path(path).read_text())
    value = data.get("serving_overhead_s", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{path}: serving_overhead_s must be a non-negative number, got {value!r:.40}")
    return float(value)
