"""Replay requests on simulated replicas: the real Scheduler (policies, KV manager, prefix
cache, TPOT budget) of each replica runs unchanged, and a step takes what the host's step
cost model says instead of running the model.

An event loop over arrivals and step ends, on a simulated clock (each replica's
scheduler reads it, so TTFT deadlines and session TTLs follow simulated time). A request
arriving while its replica's step runs is admitted at that replica's next step, as in the
engine's loop. Sampled tokens are placeholders (``ignore_eos``, each request stops at its
trace's output length). A router picks each request's replica.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from livelm.bench.metrics import RequestRecord, compute_metrics, percentile
from livelm.config import CacheConfig, SchedulerConfig
from livelm.core.request import Request
from livelm.core.scheduler import Scheduler
from livelm.core.scheduler_output import ModelRunnerOutput, SampledToken, SchedulerOutput
from livelm.core.step_cost import StepCostModel, StepShape
from livelm.sampling_params import SamplingParams
from livelm.sim.workload import SimRequest

_PLACEHOLDER_TOKEN = 1
ROUTERS: tuple[str, ...] = ("least_load", "round_robin", "random")


class Replica:
    """One simulated engine: a real Scheduler on the simulated clock."""

    def __init__(self, index: int, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 host: StepCostModel, learn_online: bool = False) -> None:
        self.index = index
        self.now = 0.0
        self.scheduler = Scheduler(scheduler_config, cache_config, clock=lambda: self.now)
        # The scheduler starts from the calibrated model, as if warmed up, or (learn_online)
        # learns it from its simulated steps as the engine does, with the host's breakpoints.
        self.scheduler.step_cost = StepCostModel(breakpoints=host.breakpoints) if learn_online else host.frozen_copy()
        self.host = host
        self.busy = False
        self.steps = 0

    def load_tokens(self) -> int:
        """Tokens still to compute or generate on this replica (the router's load)."""
        total = 0
        for req in self.scheduler.requests.values():
            params = req.sampling_params
            left_out = (params.max_tokens or 0) - req.num_output_tokens if params is not None else 0
            total += req.num_tokens - req.num_computed_tokens + max(0, left_out)
        return total


class Router(Protocol):
    """Picks the replica of each arriving request."""

    def pick(self, replicas: Sequence[Replica], request: SimRequest) -> Replica:
        """The replica ``request`` goes to."""
        ...


class LeastLoadRouter:
    """The replica with the fewest tokens left to compute (ties: the lowest index)."""

    def pick(self, replicas: Sequence[Replica], request: SimRequest) -> Replica:
        """The least-loaded replica."""
        return min(replicas, key=lambda r: (r.load_tokens(), r.index))


class RoundRobinRouter:
    """Replicas in turn."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def pick(self, replicas: Sequence[Replica], request: SimRequest) -> Replica:
        """The next replica."""
        return replicas[next(self._next) % len(replicas)]


class RandomRouter:
    """A replica at random (seeded)."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def pick(self, replicas: Sequence[Replica], request: SimRequest) -> Replica:
        """Any replica."""
        return self._rng.choice(list(replicas))


def make_router(name: str, seed: int = 0) -> Router:
    """The router called ``name`` (ValueError naming the choices otherwise)."""
    if name == "least_load":
        return LeastLoadRouter()
    if name == "round_robin":
        return RoundRobinRouter()
    if name == "random":
        return RandomRouter(seed)
    raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")


@dataclass
class SimResult:
    """What a replay gave: one record per request (as ``livelm bench serve`` keeps them),
    the simulated span, the wall time the simulation took, and per-tenant service."""

    records: list[RequestRecord]
    tenants: list[str]
    simulated_s: float
    wall_s: float
    steps: int
    tenant_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Simulated seconds per wall-clock second."""
        return self.simulated_s / self.wall_s if self.wall_s > 0 else math.inf

    def metrics(self, slos: dict[str, float] | None = None) -> dict:
        """The metrics ``livelm bench serve`` reports (TTFT, TPOT, ITL, E2E, goodput under
        ``slos`` in ms), plus per-tenant token shares and TTFT p99."""
        out = compute_metrics(self.records, self.simulated_s, slos)
        total = sum(self.tenant_tokens.values()) or 1
        out["tenants"] = {
            t: {"token_share": n / total,
                "ttft_p99_ms": percentile([r.ttft_s * 1000 for r, rt in zip(self.records, self.tenants, strict=True)
                                          if rt == t and r.ttft_s is not None], 99)}
            for t, n in sorted(self.tenant_tokens.items())
        }
        out["simulated_s"] = self.simulated_s
        out["wall_s"] = self.wall_s
        out["speedup"] = self.speedup
        out["steps"] = self.steps
        return out


def simulate(requests: Sequence[SimRequest], host: StepCostModel, num_replicas: int = 1,
             scheduler_config: SchedulerConfig | None = None, cache_config: CacheConfig | None = None,
             router: str | Router = "least_load", learn_online: bool = False, seed: int = 0,
             step_overhead_s: float = 0.0) -> SimResult:
    """Replay ``requests`` on ``num_replicas`` replicas whose steps take what ``host``
    predicts, plus ``step_overhead_s`` each (what serving adds to a step, measured by
    ``sim.calibrate.measure_serving_overhead``; 0: an in-process engine).
    ``learn_online``: each scheduler learns the cost model from its simulated steps, as
    the engine does, instead of starting from ``host``."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not (math.isfinite(step_overhead_s) and step_overhead_s >= 0):
        raise ValueError(f"step_overhead_s must be a non-negative number of seconds, got {step_overhead_s!r}")
    scheduler_config = scheduler_config or SchedulerConfig()
    cache_config = cache_config or CacheConfig(num_blocks=4096)
    if cache_config.num_blocks < 1:
        raise ValueError("the simulated KV cache needs num_blocks >= 1")
    capacity = cache_config.num_blocks * cache_config.block_size
    for r in requests:
        if r.input_tokens + r.output_tokens > min(capacity, scheduler_config.max_model_len):
            raise ValueError(f"a request of {r.input_tokens} + {r.output_tokens} tokens does not fit one replica "
                             f"(KV {capacity} tokens, max_model_len {scheduler_config.max_model_len})")
    picker = make_router(router, seed) if isinstance(router, str) else router
    replicas = [Replica(i, scheduler_config, cache_config, host, learn_online) for i in range(num_replicas)]
    records = [RequestRecord(start_s=r.arrival_s, success=False, prompt_tokens=r.input_tokens) for r in requests]
    by_id: dict[str, int] = {}
    tenant_tokens: dict[str, int] = {}
    events: list[tuple[float, int, int, object]] = []  # (time, order, kind, payload)
    order = itertools.count()
    arrival, step_end = 0, 1
    for idx in sorted(range(len(requests)), key=lambda j: requests[j].arrival_s):
        heapq.heappush(events, (requests[idx].arrival_s, next(order), arrival, idx))
    host_cost = host.frozen_copy()  # the host never changes
    started = time.perf_counter()
    steps = 0
    last = 0.0

    def start_step(rep: Replica, now: float) -> None:
        rep.now = now
        out = rep.scheduler.schedule()
        if out.is_empty:
            rep.busy = False
            return
        rep.busy = True
        shape = StepShape.of_chunks((c.start_position, c.num_tokens) for c in out.chunks)
        seconds = max(1e-6, host_cost.predict(shape))
        # The scheduler observes the engine's step alone, as Engine.step times it; the
        # serving overhead only delays the next step.
        heapq.heappush(events, (now + seconds + step_overhead_s, next(order), step_end, (rep, out, seconds)))

    while events:
        now, _, kind, payload = heapq.heappop(events)
        last = max(last, now)
        if kind == arrival:
            idx = payload
            assert isinstance(idx, int)
            spec = requests[idx]
            rep = picker.pick(replicas, spec)
            rid = f"r{idx}"
            by_id[rid] = idx
            base = 1 + (idx * 7919) % 1_000_003 * 64  # distinct prompts: no accidental prefix hits
            rep.now = now
            rep.scheduler.add_request(Request(
                rid, list(range(base, base + spec.input_tokens)),
                SamplingParams(temperature=0.0, max_tokens=spec.output_tokens, ignore_eos=True),
                arrival_time=now, priority=spec.priority, tenant=spec.tenant,
                ttft_slo=spec.ttft_slo_s, tpot_slo=spec.tpot_slo_s,
            ))
            if not rep.busy:
                start_step(rep, now)
            continue
        rep, out, seconds = payload  # type: ignore[misc]
        assert isinstance(out, SchedulerOutput)
        rep.now = now
        sampled = {c.request_id: SampledToken(_PLACEHOLDER_TOKEN) for c in out.chunks if c.sample}
        updates = rep.scheduler.update(out, ModelRunnerOutput(sampled))
        rep.scheduler.observe_step(out, seconds)
        steps += 1
        rep.steps += 1
        for c in out.chunks:
            tenant = requests[by_id[c.request_id]].tenant
            tenant_tokens[tenant] = tenant_tokens.get(tenant, 0) + c.num_tokens
        for u in updates:
            rec = records[by_id[u.request_id]]
            for _ in u.new_token_ids:
                rec.chunk_times_s.append(now - rec.start_s)
            rec.output_tokens = len(rec.chunk_times_s)
            if u.finished:
                rec.success = True
        start_step(rep, now)
    first = min((r.arrival_s for r in requests), default=0.0)
    return SimResult(records, [r.tenant for r in requests], last - first, time.perf_counter() - started, steps,
                     tenant_tokens)
