"""Who goes first: the scheduler's ordering and preemption decisions, one policy each.

The scheduler (core/scheduler.py) asks its policy three things every step: in what order
waiting requests are admitted, in what order running requests that still have prompt to
compute get the step's prefill budget (decodes always run, one token each, before any
prefill), and which running request yields when the KV pool runs dry. Policies:

- ``fcfs`` (the default): arrival order; the newest running request yields.
- ``priority``: higher ``priority`` first (ties by arrival); the lowest-priority, newest
  request yields, and a waiting request that does not fit preempts running requests of
  lower priority (never equal or higher) to make room.
- ``fair``: token-fair across tenants, after VTC (Sheng et al., "Fairness in Serving Large
  Language Models", OSDI 2024): each tenant has a counter of the service it received
  (prompt tokens computed + ``output_weight`` x tokens generated); the tenant with the
  smallest counter goes first, and a tenant that comes back after being idle has its
  counter lifted to the smallest counter of the tenants with work, so idle time is not
  banked as credit. The tenant with the largest counter yields its newest request.
- ``deadline``: earliest TTFT deadline first (arrival + the request's TTFT target;
  requests without one after all that have one, in arrival order); the request with the
  latest deadline (or none), newest first, yields.

Requests that hold KV for a stream or a session stay where the scheduler put them: the
policies only order and pick victims among what the scheduler hands them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from livelm.core.request import Request

SCHEDULING_POLICIES: tuple[str, ...] = ("fcfs", "priority", "fair", "deadline")
DEFAULT_TENANT = ""


class SchedulingPolicy(Protocol):
    """The ordering and preemption decisions of one scheduling policy."""

    name: str

    def rank(self, request: Request) -> Any:
        """A sort key: lower goes first (waiting and running requests compared alike)."""
        ...

    def admission_order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """``waiting`` in the order requests should be admitted."""
        ...

    def prefill_order(self, requests: Sequence[Request], now: float) -> list[Request]:
        """Running requests with prompt left, in the order they take the prefill budget."""
        ...

    def victim(self, running: Sequence[Request]) -> Request:
        """The running request that yields its KV when the pool runs dry."""
        ...

    def may_preempt_for(self, request: Request, running: Sequence[Request]) -> Request | None:
        """A running request to preempt so that ``request`` (waiting, not fitting) can be
        admitted, or None: only the priority policy preempts for admission."""
        ...

    def account(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        """``request`` got ``prompt_tokens`` computed and ``output_tokens`` generated."""
        ...

    def added(self, request: Request) -> None:
        """``request`` entered the scheduler."""
        ...

    def finished(self, request: Request) -> None:
        """``request`` left the scheduler (finished, aborted or failed)."""
        ...


class FcfsPolicy:
    """First come, first served: what the scheduler did before policies existed."""

    name = "fcfs"

    def rank(self, request: Request) -> Any:
        """Arrival time (unused: fcfs keeps the scheduler's own order)."""
        return request.arrival_time

    def admission_order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """Arrival order (preempted requests were put back at the front)."""
        return list(waiting)

    def prefill_order(self, requests: Sequence[Request], now: float) -> list[Request]:
        """Oldest admitted first."""
        return list(requests)

    def victim(self, running: Sequence[Request]) -> Request:
        """The newest running request."""
        return running[-1]

    def may_preempt_for(self, request: Request, running: Sequence[Request]) -> Request | None:
        """Never: a waiting request waits."""
        return None

    def account(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        """Nothing to count."""

    def added(self, request: Request) -> None:
        """Nothing to track."""

    def finished(self, request: Request) -> None:
        """Nothing to track."""


class PriorityPolicy(FcfsPolicy):
    """Higher ``Request.priority`` first; lower priority yields and is preempted for it."""

    name = "priority"

    def rank(self, request: Request) -> Any:
        """Higher priority first."""
        return -request.priority

    def admission_order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """Highest priority first; a stable sort keeps arrival order within a level."""
        return sorted(waiting, key=self.rank)

    def prefill_order(self, requests: Sequence[Request], now: float) -> list[Request]:
        """Highest priority first, then oldest."""
        return sorted(requests, key=self.rank)

    def victim(self, running: Sequence[Request]) -> Request:
        """The lowest priority, newest among equals."""
        lowest = min(r.priority for r in running)
        return next(r for r in reversed(running) if r.priority == lowest)

    def may_preempt_for(self, request: Request, running: Sequence[Request]) -> Request | None:
        """The lowest-priority newest running request, if its priority is lower."""
        if not running:
            return None
        victim = self.victim(running)
        return victim if victim.priority < request.priority else None


class FairPolicy(FcfsPolicy):
    """Virtual token counters per tenant (VTC); the least-served tenant goes first."""

    name = "fair"

    def __init__(self, output_weight: float = 2.0) -> None:
        if not (math.isfinite(output_weight) and output_weight > 0):
            raise ValueError(f"output_weight must be a finite number > 0, got {output_weight!r}")
        self.output_weight = output_weight
        self.counters: dict[str, float] = {}  # tenants with requests in the scheduler
        self._requests: dict[str, int] = {}

    def added(self, request: Request) -> None:
        """A tenant with no request in the scheduler starts at the smallest counter of the
        tenants that have some (VTC's rule: no credit saved up while idle)."""
        tenant = request.tenant
        if tenant not in self.counters:
            self.counters[tenant] = min(self.counters.values(), default=0.0)
        self._requests[tenant] = self._requests.get(tenant, 0) + 1

    def finished(self, request: Request) -> None:
        """The tenant's last request gone: its counter is dropped."""
        left = self._requests.get(request.tenant, 0) - 1
        if left > 0:
            self._requests[request.tenant] = left
        else:
            self._requests.pop(request.tenant, None)
            self.counters.pop(request.tenant, None)

    def _counter(self, request: Request) -> float:
        return self.counters.get(request.tenant, 0.0)

    def rank(self, request: Request) -> Any:
        """The least-served tenant first."""
        return self._counter(request)

    def admission_order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """Requests of the least-served tenant first (arrival order within a tenant)."""
        return sorted(waiting, key=self._counter)

    def prefill_order(self, requests: Sequence[Request], now: float) -> list[Request]:
        """Least-served tenant first."""
        return sorted(requests, key=self._counter)

    def victim(self, running: Sequence[Request]) -> Request:
        """The newest request of the most-served tenant."""
        top = max(self._counter(r) for r in running)
        return next(r for r in reversed(running) if self._counter(r) == top)

    def account(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        """Charge the request's tenant for the service it got."""
        if request.tenant in self.counters:
            self.counters[request.tenant] += prompt_tokens + self.output_weight * output_tokens


def _deadline(req: Request) -> float:
    return req.ttft_deadline if req.ttft_deadline is not None else math.inf


class DeadlinePolicy(FcfsPolicy):
    """Earliest TTFT deadline first (EDF); requests without a deadline come last."""

    name = "deadline"

    def rank(self, request: Request) -> Any:
        """The earliest TTFT deadline first."""
        return _deadline(request)

    def admission_order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """Earliest deadline first; stable, so arrival order breaks ties."""
        return sorted(waiting, key=_deadline)

    def prefill_order(self, requests: Sequence[Request], now: float) -> list[Request]:
        """Earliest deadline first among requests still computing their prompt."""
        return sorted(requests, key=_deadline)

    def victim(self, running: Sequence[Request]) -> Request:
        """The newest request with the latest deadline (or none)."""
        latest = max(_deadline(r) for r in running)
        return next(r for r in reversed(running) if _deadline(r) == latest)


def make_policy(name: str) -> SchedulingPolicy:
    """The policy called ``name`` (ValueError naming the choices otherwise)."""
    if name == "fcfs":
        return FcfsPolicy()
    if name == "priority":
        return PriorityPolicy()
    if name == "fair":
        return FairPolicy()
    if name == "deadline":
        return DeadlinePolicy()
    raise ValueError(f"unknown scheduling_policy {name!r}; choose one of {', '.join(SCHEDULING_POLICIES)}")
