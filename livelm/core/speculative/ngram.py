"""Prompt lookup: draft the tokens that followed the latest earlier occurrence of the
request's last few tokens in its own prompt and output."""

from __future__ import annotations


class NgramDrafter:
    """An index of one request's n-grams (``n_min`` .. ``n_max`` tokens) to where the token
    after their latest occurrence sits, extended as the request's tokens grow.

    ``propose`` tries the longest n first: a longer match is the more specific guess.
    Indexing costs ``n_max - n_min + 1`` dict writes per token, drafting as many reads.
    """

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max
        self._tokens: list[int] = []
        self._next_of: list[dict[tuple[int, ...], int]] = [{} for _ in range(n_max - n_min + 1)]

    def _extend(self, tokens: list[int]) -> None:
        known = len(self._tokens)
        if len(tokens) < known or tokens[known - 1 : known] != self._tokens[known - 1 : known]:
            # The tokens were revised (never in practice: requests only grow): start over.
            self.__init__(self.n_min, self.n_max)
            known = 0
        mine = self._tokens
        mine.extend(tokens[known:])
        # An n-gram ending just before position e maps to e (its continuation starts
        # there), so e ranges over positions that have a token after the n-gram.
        for e in range(max(known, 1), len(mine)):
            for i, n in enumerate(range(self.n_min, self.n_max + 1)):
                if e >= n:
                    self._next_of[i][tuple(mine[e - n : e])] = e

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that may follow ``tokens`` (the request's whole context, which
        only ever grows between calls); empty when no suffix of it occurred before."""
        self._extend(tokens)
        mine = self._tokens
        end = len(mine)
        for i in range(self.n_max - self.n_min, -1, -1):
            n = self.n_min + i
            if end <= n:
                continue
            e = self._next_of[i].get(tuple(mine[end - n :]))
            if e is not None:
                return mine[e : e + k]
        return []
