"""The scheduling flags of ``livelm serve`` and ``livelm generate`` / ``chat``
(docs/scheduling.md): policy, latency targets, the prefill floor, the priority range."""

from __future__ import annotations

import argparse
from typing import Any

from livelm.core.scheduling_policy import SCHEDULING_POLICIES

_FIELDS = ("scheduling_policy", "tpot_slo_ms", "ttft_slo_ms", "min_prefill_tokens", "max_priority")


def add_scheduling_args(group: argparse._ActionsContainer) -> None:
    """Add the flags to ``group`` (a parser or an argument group); unset flags stay None."""
    group.add_argument("--scheduling-policy", default=None, choices=SCHEDULING_POLICIES,
                       help="fcfs (arrival order, default), priority (the request's priority, "
                            "higher first; lower ones are preempted for it), fair (token-fair "
                            "between tenants), deadline (earliest TTFT deadline first)")
    group.add_argument("--tpot-slo-ms", type=float, default=None,
                       help="time per output token to keep for running decodes: each step's "
                            "prefill is cut to fit (requests may set tpot_slo_ms)")
    group.add_argument("--ttft-slo-ms", type=float, default=None,
                       help="default time-to-first-token target (the deadline policy orders by "
                            "it; misses are counted; requests may set ttft_slo_ms)")
    group.add_argument("--min-prefill-tokens", type=int, default=None,
                       help="prefill tokens every step still runs under --tpot-slo-ms (default 8)")
    group.add_argument("--max-priority", type=int, default=None,
                       help="request priorities lie in [-N, N] (default 10)")


def scheduling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options of the flags that were given."""
    return {name: getattr(args, name) for name in _FIELDS if getattr(args, name, None) is not None}
