"""A depth-bounded suffix trie with occurrence counts (the structure SuffixDecoding drafts
from): every substring of the sequences added, up to ``max_depth`` tokens, is a path from
the root, and each node counts how often its substring occurred."""

from __future__ import annotations


class _Node:
    __slots__ = ("children", "count", "depth")

    def __init__(self, depth: int) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0
        self.depth = depth


class SuffixTree:
    """Substrings (at most ``max_depth`` tokens) of the sequences added, with counts.

    A sequence is fed token by token (:meth:`extend`, through its :class:`Cursor`), each
    token costing at most ``max_depth`` node visits; :meth:`remove` takes a whole sequence
    out again (the global tree's sliding window of recent outputs).
    """

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = _Node(0)
        self.num_nodes = 1

    def cursor(self) -> Cursor:
        """The insertion point of a new sequence."""
        return Cursor()

    def extend(self, cursor: Cursor, tokens: list[int]) -> None:
        """Append ``tokens`` to the sequence ``cursor`` stands for."""
        root, limit = self.root, self.max_depth
        active = cursor.active
        for t in tokens:
            nxt: list[_Node] = []
            for node in (root, *active):
                child = node.children.get(t)
                if child is None:
                    child = node.children[t] = _Node(node.depth + 1)
                    self.num_nodes += 1
                child.count += 1
                if child.depth < limit:
                    nxt.append(child)
            active = nxt
        cursor.active = active

    def remove(self, tokens: list[int]) -> None:
        """Take out a whole sequence added before with exactly these tokens."""
        limit = self.max_depth
        for start in range(len(tokens)):
            node = self.root
            for t in tokens[start : start + limit]:
                child = node.children[t]
                child.count -= 1
                if child.count == 0:
                    self.num_nodes -= _size(child)
                    del node.children[t]
                    break
                node = child

    def match(self, context: list[int], room: int = 1) -> tuple[_Node | None, int]:
        """The node of the longest suffix of ``context`` that occurred followed by some
        token (so a continuation exists), and its length; ``(None, 0)`` when none did.
        The suffix is at most ``max_depth - room`` tokens long, so that paths below it
        can hold ``room`` tokens of continuation.

        A suffix that occurred followed by a token implies the same of every shorter
        suffix, so the longest one is found by bisection."""
        lo, hi = 0, min(len(context), self.max_depth - max(1, room))
        best: _Node | None = None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            node = self._walk(context[len(context) - mid :])
            if node is not None and node.children:
                best, lo = node, mid
            else:
                hi = mid - 1
        return best, lo

    def _walk(self, tokens: list[int]) -> _Node | None:
        node = self.root
        for t in tokens:
            node = node.children.get(t)
            if node is None:
                return None
        return node

    @staticmethod
    def continuation(node: _Node, max_tokens: int, min_prob: float) -> tuple[list[int], float]:
        """Follow the most frequent continuation from ``node`` for at most ``max_tokens``
        tokens while its estimated probability (the product of each step's share of its
        siblings' counts) stays >= ``min_prob``. Returns the tokens and their score (the
        expected number of them accepted: the sum of those probabilities)."""
        out: list[int] = []
        prob, score = 1.0, 0.0
        while len(out) < max_tokens and node.children:
            total = 0
            best_t, best = -1, None
            for t, child in node.children.items():
                total += child.count
                if best is None or child.count > best.count:
                    best_t, best = t, child
            prob *= best.count / total
            if prob < min_prob:
                break
            out.append(best_t)
            score += prob
            node = best
        return out, score


class Cursor:
    """Where one sequence stands in a :class:`SuffixTree`: the nodes of its suffixes
    shorter than the tree's depth (each next token extends every one of them)."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active: list[_Node] = []


def _size(node: _Node) -> int:
    stack, n = [node], 0
    while stack:
        x = stack.pop()
        n += 1
        stack.extend(x.children.values())
    return n
