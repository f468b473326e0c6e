"""The protocol of a drafter that drafts for a whole step's requests at once (a draft model:
one batched forward serves them all), which the engine injects into the scheduler's
:class:`~livelm.core.speculative.speculator.Speculator`. Torch-free: the implementation
(runner/draft_model.py) lives on the runner's floor."""

from __future__ import annotations

from typing import NamedTuple, Protocol


class DraftItem(NamedTuple):
    """One request to draft for: its whole context (prompt and output so far, the last
    token not yet computed by the target) and the most tokens to draft."""

    request_id: str
    token_ids: list[int]
    limit: int


class BatchedDrafter(Protocol):
    """Drafts for many requests in one call, keeping per-request state (its KV) between steps.

    The state of a request is only a cache: a drafter compares what it holds with the
    ``token_ids`` it is given and recomputes whatever differs, so a call with any context
    is correct; ``rollback`` and ``finish`` only give memory back early.
    """

    forward_seconds: float  # time spent in the drafter's model, over the engine's life

    def propose_batch(self, items: list[DraftItem]) -> dict[str, list[int]]:
        """Up to ``item.limit`` drafted tokens per request id (absent or empty: no draft)."""
        ...

    def rollback(self, request_id: str, num_tokens: int) -> None:
        """Only the request's first ``num_tokens`` tokens are still valid (the target kept
        them after verification): forget what the drafter computed past them."""
        ...

    def finish(self, request_id: str) -> None:
        """The request ended or was preempted: free everything the drafter holds for it."""
        ...
