"""Small helpers on token-id sequences shared by the core and the engine (pure Python)."""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix_len(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """Length of the longest common prefix of ``a`` and ``b``, at most ``limit`` (if given).

    The usual case (one sequence extends the other) costs one C-level compare of slices;
    only a mismatch walks the tokens one by one.
    """
    n = min(len(a), len(b))
    if limit is not None and limit < n:
        n = max(limit, 0)
    if a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:  # bounded: a list and a tuple never compare equal above
        i += 1
    return i


def check_vocab_range(token_ids: Sequence[int], vocab_size: int, what: str) -> None:
    """ValueError naming the first id outside ``[0, vocab_size)`` (``what``: "prompt", "input")."""
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{what} token id {bad} is outside the vocabulary [0, {vocab_size})")
