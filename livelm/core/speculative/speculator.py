"""What the scheduler asks for drafts: each request's drafter, its adaptive draft length,
and the engine's acceptance statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from livelm.core.request import Request
from livelm.core.speculative.batched import BatchedDrafter, DraftItem
from livelm.core.speculative.config import SpeculativeConfig
from livelm.core.speculative.ngram import NgramDrafter
from livelm.core.speculative.suffix import GlobalSuffixTree, SuffixDrafter

# Drafts that keep getting nothing accepted pause speculation for a request: after this
# many misses in a row, for 2, 4, 8 ... steps (at most _MAX_PAUSE).
_MISSES_BEFORE_PAUSE = 3
_MAX_PAUSE = 64
# Weight of the newest partly rejected draft in a request's adaptive draft length.
_EMA = 0.5
# Engine-wide memory of each method's acceptance: drafted and accepted token counts decay
# by this factor per verified draft (a memory of roughly the last 1 / (1 - decay) drafts).
# A new request of a method that has drafted at least _PRIOR_MIN_DRAFTED (decayed) tokens
# with an acceptance below _PRIOR_POOR starts paused, as if it had already paused
# _PRIOR_PAUSES times: a drafter that never pays (an untrained draft model, open-ended
# text) then costs each new request a few probes, not a run of failed drafts and, for a
# draft model, the forward over its whole prompt.
_PRIOR_DECAY = 0.98
_PRIOR_MIN_DRAFTED = 32.0
_PRIOR_POOR = 0.1
_PRIOR_PAUSES = 4
# The method whose drafts come from the engine's batched drafter (a draft model).
BATCHED_METHOD = "draft"


class SpeculativeStats(NamedTuple):
    """Verification steps with a draft, tokens drafted and tokens accepted, over the
    engine's life (acceptance rate = accepted / drafted; mean accepted length, the tokens a
    verification step yields, = 1 + accepted / drafts), and the seconds a draft model's
    forward passes took (0 without one)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    draft_model_seconds: float = 0.0


@dataclass
class _RequestState:
    drafter: NgramDrafter | SuffixDrafter | None  # None: the engine's batched drafter
    max_k: int
    k: float  # the adaptive draft length (its floor is used)
    misses: int = 0
    pause: int = 0
    num_pauses: int = 0


class Speculator:
    """Per-request drafters and draft lengths for the scheduler (pure Python).

    A request speculates with its own ``speculative_method`` / ``num_speculative_tokens``
    when it set them, else the engine's. With ``adaptive``, its draft length grows by one
    after a draft that was accepted whole and moves towards (accepted + 1) after one that
    was not, and after drafts keep failing it drafts nothing for a while (twice as long
    each time), so speculation that does not pay costs little; a new request of a method
    whose recent drafts engine-wide were rarely accepted starts paused
    (:meth:`method_acceptance`).

    ``"draft"`` requests are drafted all at once per step by ``batched`` (the engine's
    draft model, injected: core stays torch-free) through :meth:`propose_batch`; the
    others one by one through :meth:`propose`.
    """

    def __init__(self, config: SpeculativeConfig, batched: BatchedDrafter | None = None) -> None:
        self.config = config
        self.batched = batched
        self.shared = GlobalSuffixTree(config.suffix_max_depth, config.suffix_max_requests)
        self._states: dict[str, _RequestState] = {}
        self._method_counts: dict[str, list[float]] = {}  # method -> [drafted, accepted], decayed
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def stats(self) -> SpeculativeStats:
        """Counts over the engine's life."""
        seconds = self.batched.forward_seconds if self.batched is not None else 0.0
        return SpeculativeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, seconds)

    def method_of(self, req: Request) -> str | None:
        """The drafter ``req`` uses (None: it does not speculate)."""
        method = req.speculative_method or self.config.method
        return None if method == "off" else method

    def is_batched(self, req: Request) -> bool:
        """True when ``req``'s drafts come from :meth:`propose_batch` (the draft model)."""
        return self.method_of(req) == BATCHED_METHOD

    def propose(self, req: Request, limit: int) -> list[int]:
        """At most ``limit`` drafted tokens to follow ``req``'s tokens (empty: decode plainly).
        For a request of the batched drafter, see :meth:`propose_batch`."""
        state = self._state(req)
        if state is None or state.drafter is None:
            return []
        k = self._draft_len(state, limit)
        return state.drafter.propose(req.all_token_ids, k) if k else []

    def propose_batch(self, wanted: list[tuple[Request, int]], budget: int) -> dict[str, list[int]]:
        """Drafts of the batched drafter's requests among ``wanted`` ((request, most tokens)
        pairs, in the scheduler's order), in one call: together at most ``budget`` tokens,
        handed out in that order."""
        if self.batched is None:
            return {}
        items: list[DraftItem] = []
        for req, limit in wanted:
            if budget <= 0:
                break
            state = self._state(req)
            if state is None or state.drafter is not None:
                continue
            k = self._draft_len(state, min(limit, budget))
            if k:
                items.append(DraftItem(req.request_id, req.all_token_ids, k))
                budget -= k
        return self.batched.propose_batch(items) if items else {}

    def _state(self, req: Request) -> _RequestState | None:
        state = self._states.get(req.request_id)
        if state is None:
            method = self.method_of(req)
            if method is None:
                return None
            state = self._states[req.request_id] = self._new_state(req, method)
        return state

    @staticmethod
    def _draft_len(state: _RequestState, limit: int) -> int:
        """Tokens to draft now (0 while paused; a paused step counts down)."""
        if state.pause > 0:
            state.pause -= 1
            return 0
        return max(0, min(math.floor(state.k), limit))

    def _new_state(self, req: Request, method: str) -> _RequestState:
        cfg = self.config
        drafter: NgramDrafter | SuffixDrafter | None
        if method == "ngram":
            drafter = NgramDrafter(cfg.ngram_min, cfg.ngram_max)
        elif method == "suffix":
            drafter = SuffixDrafter(self.shared, cfg.suffix_max_depth, cfg.suffix_alpha, cfg.suffix_min_prob)
        else:  # BATCHED_METHOD: the engine's draft model holds the request's state
            drafter = None
        max_k = req.num_speculative_tokens or cfg.num_speculative_tokens
        state = _RequestState(drafter, max_k, float(max_k))
        if cfg.adaptive and self.method_acceptance(method) < _PRIOR_POOR:
            state.k, state.num_pauses, state.pause = 1.0, _PRIOR_PAUSES, 2**_PRIOR_PAUSES
        return state

    def method_acceptance(self, method: str) -> float:
        """The engine's recent acceptance rate of ``method``'s drafts (1.0 until it has
        drafted enough to tell; see _PRIOR_MIN_DRAFTED)."""
        counts = self._method_counts.get(method)
        if counts is None or counts[0] < _PRIOR_MIN_DRAFTED:
            return 1.0
        return counts[1] / counts[0]

    def record(self, req: Request, num_drafted: int, num_accepted: int) -> None:
        """The outcome of verifying a draft of ``num_drafted`` tokens for ``req``."""
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        method = self.method_of(req)
        if method is not None:
            counts = self._method_counts.setdefault(method, [0.0, 0.0])
            counts[0] = counts[0] * _PRIOR_DECAY + num_drafted
            counts[1] = counts[1] * _PRIOR_DECAY + num_accepted
        state = self._states.get(req.request_id)
        if state is None or not self.config.adaptive:
            return
        if num_accepted == num_drafted:
            state.k = min(float(state.max_k), state.k + 1)  # a short draft that all held: try longer
        else:  # follow what held, plus the one that failed
            state.k = max(1.0, (1 - _EMA) * state.k + _EMA * (num_accepted + 1))
        if num_accepted:
            state.misses = 0
            state.num_pauses = 0
            return
        state.misses += 1
        if state.misses >= _MISSES_BEFORE_PAUSE:
            state.num_pauses += 1
            state.pause = min(_MAX_PAUSE, 2**state.num_pauses)
            state.misses = 0

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Only ``req``'s first ``num_tokens`` tokens hold (after verification, or a draft
        that was not scheduled): the batched drafter forgets its state past them."""
        if self.batched is not None and self.is_batched(req):
            self.batched.rollback(req.request_id, num_tokens)

    def preempted(self, req: Request) -> None:
        """``req`` lost its KV (it is recomputed later): the batched drafter frees its own
        too; the draft length and pauses are kept."""
        if self.batched is not None:
            self.batched.finish(req.request_id)

    def finish(self, req: Request) -> None:
        """``req`` ended: drop its drafter (and the batched drafter's state for it); a
        suffix-drafting request's output joins the shared tree of recent outputs."""
        state = self._states.pop(req.request_id, None)
        if self.batched is not None:
            self.batched.finish(req.request_id)
        if self.config.method == "suffix" or (state is not None and isinstance(state.drafter, SuffixDrafter)):
            self.shared.add(req.output_token_ids)
