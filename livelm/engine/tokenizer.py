"""Loading the tokenizer of a model directory (no remote code) and preparing prompts."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The model's own tokenizer; never runs code shipped with the model."""
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises many types; the user needs one message
        raise ValueError(f"cannot load the tokenizer of {model_dir}: {e}") from e


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[int]) -> list[int]:
    """Token ids of a text prompt (with the model's usual special tokens), or ids as given."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise ValueError("a prompt must be a string or a list of token ids")


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True
) -> list[int]:
    """Render a conversation with the model's chat template into prompt token ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template: use generate() with a plain prompt")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template already wrote any BOS it wants; do not let the tokenizer add another.
    return tokenizer(text, add_special_tokens=False).input_ids
