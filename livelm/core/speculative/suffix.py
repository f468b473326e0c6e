"""SuffixDecoding (Oliaro et al.): drafts from suffix trees over the request's own tokens
and over the recent outputs of other requests, as long as the match supports."""

from __future__ import annotations

import math
from collections import deque

from livelm.core.speculative.suffix_tree import Cursor, SuffixTree


class SuffixDrafter:
    """One request's suffix tree (prompt and output so far), consulted together with the
    engine-wide tree of recent outputs (:class:`GlobalSuffixTree`).

    The longer the context suffix that matched, the longer the draft may be
    (``alpha`` tokens per matched token); a draft stops where its estimated probability
    drops below ``min_prob``. Of the two trees' drafts, the one expected to have more
    tokens accepted wins.
    """

    def __init__(self, shared: GlobalSuffixTree, max_depth: int, alpha: float, min_prob: float) -> None:
        self.shared = shared
        self.tree = SuffixTree(max_depth)
        self.cursor = self.tree.cursor()
        self.alpha, self.min_prob = alpha, min_prob
        self._num_indexed = 0
        self._last: list[int] = []

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that may follow ``tokens`` (the request's whole context, which
        only ever grows between calls)."""
        if len(tokens) < self._num_indexed or tokens[self._num_indexed - 1 : self._num_indexed] != self._last:
            self.__init__(self.shared, self.tree.max_depth, self.alpha, self.min_prob)
        self.tree.extend(self.cursor, tokens[self._num_indexed :])
        self._num_indexed = len(tokens)
        self._last = tokens[-1:]
        tail = tokens[-self.tree.max_depth :]
        best: list[int] = []
        best_score = 0.0
        for tree in (self.tree, self.shared.tree):
            node, matched = tree.match(tail, room=min(k, tree.max_depth // 2))
            if node is None:
                continue
            limit = min(k, math.ceil(self.alpha * matched))
            draft, score = tree.continuation(node, limit, self.min_prob)
            if score > best_score:
                best, best_score = draft, score
        return best


class GlobalSuffixTree:
    """The outputs of the last ``max_requests`` finished requests, in one suffix tree."""

    def __init__(self, max_depth: int, max_requests: int) -> None:
        self.tree = SuffixTree(max_depth)
        self.max_requests = max_requests
        self._window: deque[list[int]] = deque()

    def add(self, output_token_ids: list[int]) -> None:
        """Remember a finished request's output (forgetting the oldest beyond the window)."""
        if self.max_requests == 0 or not output_token_ids:
            return
        tokens = list(output_token_ids)
        self.tree.extend(Cursor(), tokens)
        self._window.append(tokens)
        while len(self._window) > self.max_requests:
            self.tree.remove(self._window.popleft())
