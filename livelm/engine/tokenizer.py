"""Loading the tokenizer of a model directory (no remote code) and preparing prompts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from livelm.engine.tokenizer_class_cache import cached_class, remember_class


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The model's own tokenizer; never runs code shipped with the model.

    The first load of a directory goes through AutoTokenizer, and the class it chose is
    remembered (engine/tokenizer_class_cache.py); later loads call that class directly,
    skipping the ~1.5-2 s AutoTokenizer spends importing every model family's config code.
    """
    import transformers

    model_dir = Path(model_dir)
    try:
        cls = cached_class(model_dir, transformers.__version__)
        if cls is not None:
            return cls.from_pretrained(str(model_dir), trust_remote_code=False)
        from transformers import AutoTokenizer  # imports every model family's config code

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises many types; the user needs one message
        raise ValueError(f"cannot load the tokenizer of {model_dir}: {e}") from e
    remember_class(model_dir, transformers.__version__, tokenizer)
    return tokenizer


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[int]) -> list[int]:
    """Token ids of a text prompt (with the model's usual special tokens), or ids as given."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise ValueError("a prompt must be a string or a list of token ids")


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Render a conversation with the model's chat template into prompt token ids.

    ``tools`` (OpenAI-shaped function definitions) are handed to the template, which
    describes them in its own format; only for templates that use them
    (:func:`template_supports_tools`).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template: use generate() with a plain prompt")
    extra = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **extra)
    # The template already wrote any BOS it wants; do not let the tokenizer add another.
    return tokenizer(text, add_special_tokens=False).input_ids


def chat_template_text(tokenizer: Any) -> str | None:
    """The chat template's source (all named templates joined), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template if isinstance(template, str) else None


_TOOLS_WORD = re.compile(r"\btools\b")


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the chat template reads the ``tools`` variable (it then renders tool
    definitions, tool calls and tool results in the model's own format)."""
    text = chat_template_text(tokenizer)
    if not text:
        return False
    try:
        import jinja2
        from jinja2 import meta

        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"])
        return "tools" in meta.find_undeclared_variables(env.parse(text))
    except Exception:  # a template jinja cannot parse alone: look for the word
        return bool(_TOOLS_WORD.search(text))
