"""Fork/join of a running request (docs/rl.md): what the engine keeps between the two.

A request forks into k branches at its current position: each branch is a request of its
own (own id, suffix prompt and sampling params) whose prompt is the parent's tokens so far
plus its suffix, started on the parent's KV (shared full blocks, a copied partial block:
nothing is recomputed). The parent waits, suspended with its KV, until ``join`` appends the
branches' tokens (in the order given, with separators) to its context and resumes it;
only the appended tokens are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from livelm.engine.request_state import RequestState
from livelm.sampling_params import SamplingParams

# Branches of one fork at most (each is a sequence in the batch).
MAX_FORK_BRANCHES = 64


@dataclass(frozen=True)
class Branch:
    """One branch of a fork: ``suffix`` (text or token ids, may be empty) continues the
    parent's tokens, ``params`` say how the branch samples (``n`` must be 1)."""

    suffix: str | list[int] = ""
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class ForkResult:
    """What a fork did: the parent's tokens at the fork point (prompt and output so far,
    every branch's prompt starts with them) and the branches' request ids, in order."""

    token_ids: list[int]
    branch_ids: list[str]


@dataclass
class ForkState:
    """An open fork: its branches' suffix tokens and states (kept after they finish, so
    that join can read their outputs)."""

    parent_id: str
    token_ids: list[int]
    branch_ids: list[str]
    suffixes: dict[str, list[int]]
    states: dict[str, RequestState]


def check_branches(branches: object, max_branches: int) -> list[Branch]:
    """The branches as a list (ValueError for a wrong type or a count out of range)."""
    if isinstance(branches, Branch):
        branches = [branches]
    if not isinstance(branches, list | tuple) or not all(isinstance(b, Branch) for b in branches):
        raise ValueError("branches must be a list of Branch")
    if not 1 <= len(branches) <= max_branches:
        raise ValueError(f"a fork needs between 1 and {max_branches} branches, got {len(branches)}")
    for b in branches:
        if not isinstance(b.params, SamplingParams):
            raise ValueError("a branch's params must be SamplingParams")
        if b.params.n != 1:
            raise ValueError("a branch must have n == 1 (fork into more branches instead)")
    return list(branches)
