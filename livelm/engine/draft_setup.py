"""Finding and checking speculative decoding's draft model at engine start: resolved like
the served model, and refused (ValueError naming the difference) unless it shares the
served model's vocabulary, so every drafted id means the same token to both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from livelm.engine.tokenizer import load_tokenizer
from livelm.models.model_config import ModelConfig
from livelm.models.resolve import resolve_model_path

# Special tokens whose ids must agree (the end of a turn above all: the target stops on its
# own EOS, and a draft model that means something else by that id drafts past it).
_SPECIAL_ID_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def resolve_draft_model(name: str, tokenizer: Any, model_config: ModelConfig) -> tuple[Path, ModelConfig]:
    """The draft model's directory and config, after checking that its vocabulary size and
    its tokenizer's vocabulary and special ids equal those of the served model."""
    try:
        draft_dir = resolve_model_path(name)
    except ValueError as e:
        raise ValueError(f"speculative_draft_model: {e}") from e
    draft_config = ModelConfig.from_dir(draft_dir)
    if draft_config.vocab_size != model_config.vocab_size:
        raise ValueError(
            f"speculative_draft_model {name!r} has a vocabulary of {draft_config.vocab_size} tokens, the "
            f"served model {model_config.vocab_size}: a draft model must share the served model's tokenizer"
        )
    check_same_tokenizer(tokenizer, load_tokenizer(draft_dir), name)
    return draft_dir, draft_config


def check_same_tokenizer(target: Any, draft: Any, name: str) -> None:
    """ValueError unless the two tokenizers map the same strings to the same ids and agree
    on their special tokens."""
    target_vocab, draft_vocab = target.get_vocab(), draft.get_vocab()
    if target_vocab != draft_vocab:
        differing = sorted(t for t in target_vocab.keys() | draft_vocab.keys()
                           if target_vocab.get(t) != draft_vocab.get(t))
        token = differing[0]
        raise ValueError(
            f"speculative_draft_model {name!r} has a different tokenizer: {len(differing)} token(s) have "
            f"other ids, e.g. {token!r} is {target_vocab.get(token)} in the served model's vocabulary and "
            f"{draft_vocab.get(token)} in the draft model's"
        )
    for attr in _SPECIAL_ID_ATTRS:
        a, b = getattr(target, attr, None), getattr(draft, attr, None)
        if a != b:
            raise ValueError(f"speculative_draft_model {name!r} has a different tokenizer: {attr} is {a} in "
                             f"the served model's and {b} in the draft model's")
    if sorted(target.all_special_ids) != sorted(draft.all_special_ids):
        raise ValueError(f"speculative_draft_model {name!r} has a different tokenizer: its special token ids "
                         f"differ from the served model's")
