"""``serve`` over targets x arrival processes (one for ``serve``, a list of rates for
``sweep``), producing one result record per run."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
from collections.abc import Callable

from livelm.bench.arrivals import ArrivalProcess
from livelm.bench.client import OpenAIStreamClient, Target
from livelm.bench.serve_runner import ServeConfig, run_workload
from livelm.bench.workload import Workload


def parse_rates(text: str) -> list[float]:
    """``"0.5,1,2,inf"`` -> [0.5, 1.0, 2.0, inf]; every rate must be > 0."""
    rates = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            rate = math.inf if part in ("inf", "infinity") else float(part)
        except ValueError as e:
            raise ValueError(f"bad request rate {part!r} in {text!r}") from e
        if not rate > 0:
            raise ValueError(f"request rates must be > 0, got {part}")
        rates.append(rate)
    if not rates:
        raise ValueError("give at least one request rate")
    return rates


def run_record(target: Target, model: str, workload: Workload, cfg: ServeConfig, result) -> dict:
    """The JSON-ready part of a record that describes one serve run."""
    arr = cfg.arrivals
    return {
        "target": {"name": target.name, "base_url": target.base_url, "model": model},
        "workload": {"name": workload.name, "describe": workload.describe(), **workload.params},
        "arrivals": {"rate": arr.rate, "burstiness": arr.burstiness, "use_timestamps": arr.use_timestamps,
                     "time_scale": arr.time_scale, "describe": arr.describe()},
        "max_concurrency": cfg.max_concurrency,
        "endpoint": cfg.endpoint,
        "prompt_format": cfg.prompt_format,
        "interrupted": result.interrupted,
        "cancelled_in_flight": result.cancelled,
        "not_sent": result.not_sent,
        "metrics": result.metrics,
    }


async def run_matrix(targets: list[Target], workload: Workload | Callable[[int], Workload], cfg: ServeConfig,
                     arrivals: list[ArrivalProcess], stop: asyncio.Event,
                     on_record: Callable[[dict], None],
                     count_prompt: Callable | None = None, timeout_s: float = 3600.0,
                     ignore_eos: bool = True) -> None:
    """Each target at each arrival process in turn; ``on_record`` receives each run's
    record as soon as it is measured (so an interrupted sweep keeps what it has).
    After ``stop`` is set, the current run ends early and no further run starts.

    ``workload`` is one workload, or a function of the arrival process's index giving each
    its own prompts: the same prompts at every rate of a sweep would be prefix-cache hits
    on the same server from the second rate on (its TTFT then measures the cache)."""
    for target in targets:
        client = OpenAIStreamClient(target, timeout_s=timeout_s, ignore_eos=ignore_eos)
        try:
            for index, arr in enumerate(arrivals):
                if stop.is_set():
                    return
                workload_now = workload(index) if callable(workload) else workload
                run_cfg = dataclasses.replace(cfg, arrivals=arr,
                                              progress_desc=f"{target.name} @ {arr.describe()}")
                result = await run_workload(client, workload_now, run_cfg, stop, count_prompt)
                rec = run_record(target, client.model, workload_now, run_cfg, result)
                on_record(rec)
                m = result.metrics
                print(f"{target.name} @ {arr.describe()}: {m['completed']} ok, {m['failed']} failed, "
                      f"{m['request_throughput']:.2f} req/s, {m['output_throughput']:.1f} out tok/s"
                      + (" (interrupted)" if result.interrupted else ""), file=sys.stderr, flush=True)
        finally:
            await client.aclose()
