"""The speculative decoding flags of ``livelm generate/chat`` and ``livelm serve``."""

from __future__ import annotations

import argparse

from livelm.core.speculative.config import SPECULATIVE_METHODS


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    """The speculative decoding flags (docs/speculative_decoding.md), shared with ``serve``."""
    p.add_argument("--speculative-method", default=None, choices=SPECULATIVE_METHODS,
                   help="draft tokens and verify them in one forward pass: ngram (prompt lookup), "
                        "suffix (SuffixDecoding) or draft (a small draft model, "
                        "--speculative-draft-model); off by default (docs/speculative_decoding.md)")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="most tokens drafted per request and step (default 5)")
    p.add_argument("--no-speculative-adaptive", action="store_true",
                   help="always draft --num-speculative-tokens (no adaptive draft length)")
    p.add_argument("--speculative-draft-model", default=None, metavar="MODEL",
                   help="the draft model of --speculative-method draft (and of requests asking for it): "
                        "a directory, .gguf file or hub id, with the same tokenizer as the served model")


def speculative_kwargs(args: argparse.Namespace) -> dict:
    """Engine options of the speculative decoding flags (unset ones keep the defaults)."""
    kw: dict = {}
    if getattr(args, "speculative_method", None) is not None:
        kw["speculative_method"] = args.speculative_method
    if getattr(args, "num_speculative_tokens", None) is not None:
        kw["num_speculative_tokens"] = args.num_speculative_tokens
    if getattr(args, "no_speculative_adaptive", False):
        kw["speculative_adaptive"] = False
    if getattr(args, "speculative_draft_model", None) is not None:
        kw["speculative_draft_model"] = args.speculative_draft_model
    return kw
