"""What the scheduler asks for drafts: each request's drafter, its adaptive draft length,
and the engine's acceptance statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from livelm.core.request import Request
from livelm.core.speculative.config import SpeculativeConfig
from livelm.core.speculative.ngram import NgramDrafter
from livelm.core.speculative.suffix import GlobalSuffixTree, SuffixDrafter

# Drafts that keep getting nothing accepted pause speculation for a request: after this
# many misses in a row, for 2, 4, 8 ... steps (at most _MAX_PAUSE).
_MISSES_BEFORE_PAUSE = 3
_MAX_PAUSE = 64
# Weight of the newest partly rejected draft in a request's adaptive draft length.
_EMA = 0.5


class SpeculativeStats(NamedTuple):
    """Verification steps with a draft, tokens drafted and tokens accepted, over the
    engine's life (acceptance rate = accepted / drafted; mean accepted length, the tokens a
    verification step yields, = 1 + accepted / drafts)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass
class _RequestState:
    drafter: NgramDrafter | SuffixDrafter
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
    each time), so speculation that does not pay costs little.
    """

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.shared = GlobalSuffixTree(config.suffix_max_depth, config.suffix_max_requests)
        self._states: dict[str, _RequestState] = {}
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def stats(self) -> SpeculativeStats:
        """Counts over the engine's life."""
        return SpeculativeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens)

    def method_of(self, req: Request) -> str | None:
        """The drafter ``req`` uses (None: it does not speculate)."""
        method = req.speculative_method or self.config.method
        return None if method == "off" else method

    def propose(self, req: Request, limit: int) -> list[int]:
        """At most ``limit`` drafted tokens to follow ``req``'s tokens (empty: decode plainly)."""
        state = self._states.get(req.request_id)
        if state is None:
            method = self.method_of(req)
            if method is None:
                return []
            state = self._states[req.request_id] = self._new_state(req, method)
        if state.pause > 0:
            state.pause -= 1
            return []
        k = min(math.floor(state.k), limit)
        if k < 1:
            return []
        return state.drafter.propose(req.all_token_ids, k)

    def _new_state(self, req: Request, method: str) -> _RequestState:
        cfg = self.config
        if method == "ngram":
            drafter: NgramDrafter | SuffixDrafter = NgramDrafter(cfg.ngram_min, cfg.ngram_max)
        else:
            drafter = SuffixDrafter(self.shared, cfg.suffix_max_depth, cfg.suffix_alpha, cfg.suffix_min_prob)
        max_k = req.num_speculative_tokens or cfg.num_speculative_tokens
        return _RequestState(drafter, max_k, float(max_k))

    def record(self, req: Request, num_drafted: int, num_accepted: int) -> None:
        """The outcome of verifying a draft of ``num_drafted`` tokens for ``req``."""
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
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

    def finish(self, req: Request) -> None:
        """``req`` ended: drop its drafter; a suffix-drafting request's output joins the
        shared tree of recent outputs."""
        state = self._states.pop(req.request_id, None)
        if self.config.method == "suffix" or (state is not None and isinstance(state.drafter, SuffixDrafter)):
            self.shared.add(req.output_token_ids)
