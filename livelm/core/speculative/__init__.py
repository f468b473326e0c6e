"""Speculative decoding's torch-free half: drafters that guess the next tokens of a
request, and the per-request bookkeeping that decides how many to guess.

- ``config``: :class:`SpeculativeConfig` (the engine's choice) and the per-request checks.
- ``ngram``: :class:`NgramDrafter`, prompt lookup over the request's own tokens.
- ``suffix_tree``: :class:`SuffixTree`, a depth-bounded, frequency-counted suffix trie.
- ``suffix``: :class:`SuffixDrafter`, SuffixDecoding over the request's tokens and the
  recent outputs of other requests.
- ``speculator``: :class:`Speculator`, what the scheduler asks for drafts: per-request
  drafters, adaptive draft length, acceptance statistics.

The runner verifies the drafts (runner/speculative.py); the scheduler keeps only what it
accepted (core/scheduler.py).
"""
