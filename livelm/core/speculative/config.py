"""How an engine speculates (:class:`SpeculativeConfig`), and the checks of the per-request
overrides (``speculative_method`` / ``num_speculative_tokens``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Drafters an engine or a request may name; "off" only makes sense per request (or as the
# engine's None).
SPECULATIVE_METHODS: tuple[str, ...] = ("ngram", "suffix", "draft")
REQUEST_METHODS: tuple[str, ...] = (*SPECULATIVE_METHODS, "off")
# The most tokens one step may draft for one request: each is a row of the verification
# pass and of its logits, so a huge value would only waste the step's budget.
MAX_SPECULATIVE_TOKENS = 64


def check_method(method: object, allowed: tuple[str, ...], name: str = "speculative_method") -> str:
    """``method`` if it is one of ``allowed``; ValueError naming the choices otherwise."""
    if not isinstance(method, str) or method not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {method!r:.60}")
    return method


def check_num_tokens(k: object, name: str = "num_speculative_tokens") -> int:
    """``k`` if it is an integer in [1, MAX_SPECULATIVE_TOKENS]; ValueError otherwise."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"{name} must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r:.60}")
    return k


def check_draft_model_given(method: str | None, draft_model: str | None) -> None:
    """ValueError when ``method`` is ``"draft"`` and the engine has no draft model to run."""
    if method == "draft" and draft_model is None:
        raise ValueError("speculative_method 'draft' needs a draft model: start the engine with "
                         "speculative_draft_model (--speculative-draft-model), a small model with the same "
                         "tokenizer as the served one")


def _check_int(value: object, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r:.60}")


def _check_float(value: object, name: str, low: float, high: float) -> None:
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or not low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r:.60}")


@dataclass(frozen=True)
class SpeculativeConfig:
    """The engine's speculative decoding (docs/speculative_decoding.md).

    ``method`` is ``None`` (off unless a request asks), ``"ngram"`` (prompt lookup: the
    tokens that followed the latest earlier occurrence of the last ``ngram_max`` ..
    ``ngram_min`` tokens), ``"suffix"`` (SuffixDecoding: the most frequent continuation
    of the longest context suffix seen in this request or in the outputs of the last
    ``suffix_max_requests`` finished requests, ``suffix_max_depth`` tokens deep, drafting
    at most ``suffix_alpha`` tokens per matched token and stopping where a continuation's
    share falls below ``suffix_min_prob``) or ``"draft"`` (the greedy tokens of a small
    model with the same tokenizer, ``draft_model``, which the engine runs with its own paged
    KV: runner/draft_model.py). ``num_speculative_tokens`` is the most tokens drafted per
    request and step.

    ``adaptive`` lets a request's draft length follow its recent acceptance (and pause
    speculation after drafts keep failing). ``max_batch_decodes``: a step with more
    decoding requests than this is compute-bound, so nobody speculates in it.
    """

    method: str | None = None
    num_speculative_tokens: int = 5
    draft_model: str | None = None
    ngram_min: int = 1
    ngram_max: int = 4
    suffix_max_depth: int = 32
    suffix_max_requests: int = 256
    suffix_alpha: float = 2.0
    suffix_min_prob: float = 0.1
    adaptive: bool = True
    max_batch_decodes: int = 16

    def __post_init__(self) -> None:
        if self.method is not None:
            check_method(self.method, SPECULATIVE_METHODS)
        check_draft_model_given(self.method, self.draft_model)
        if self.draft_model is not None and (not isinstance(self.draft_model, str) or not self.draft_model):
            raise ValueError(f"speculative_draft_model must be a non-empty path or hub id, got {self.draft_model!r:.60}")
        check_num_tokens(self.num_speculative_tokens)
        _check_int(self.ngram_min, "ngram_min", 1, 64)
        _check_int(self.ngram_max, "ngram_max", self.ngram_min, 64)
        _check_int(self.suffix_max_depth, "suffix_max_depth", 2, 1024)
        _check_int(self.suffix_max_requests, "suffix_max_requests", 0, 1 << 20)
        _check_float(self.suffix_alpha, "suffix_alpha", 0.1, 64.0)
        _check_float(self.suffix_min_prob, "suffix_min_prob", 0.0, 1.0)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be a bool, got {self.adaptive!r:.60}")
        _check_int(self.max_batch_decodes, "max_batch_decodes", 1, 1 << 20)
