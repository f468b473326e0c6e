"""Loading the tokenizer of a model directory (no remote code) and preparing prompts."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livelm.engine.fast_tokenizer import FastTokenizer, first_difference
from livelm.engine.tokenizer_class_cache import cached_class, fast_tokenizer_agrees, remember_class

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("livelm")

_VERSION_LINE = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.M)


def installed_transformers_version() -> str:
    """The installed transformers' version, read without importing it (~0.7 s)."""
    spec = importlib.util.find_spec("transformers")
    if spec is not None and spec.origin:
        try:
            match = _VERSION_LINE.search(Path(spec.origin).read_text())
        except OSError:
            match = None
        if match:
            return match.group(1)
    import transformers

    return transformers.__version__


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase | FastTokenizer:
    """The model's own tokenizer; never runs code shipped with the model.

    The first load of a directory goes through AutoTokenizer, and the class it chose is
    remembered (engine/tokenizer_class_cache.py), with whether livelm's FastTokenizer
    agreed with it on every probe (engine/fast_tokenizer.py). Later loads use the
    FastTokenizer where it agreed (no transformers import at all), else call the
    remembered class directly, skipping the ~1.5-2 s AutoTokenizer spends importing every
    model family's config code. ``LIVELM_FAST_TOKENIZER=0`` always uses transformers.
    """
    model_dir = Path(model_dir)
    version = installed_transformers_version()
    allow_fast = os.environ.get("LIVELM_FAST_TOKENIZER", "1") != "0"
    agreed = fast_tokenizer_agrees(model_dir, version)
    if allow_fast and agreed:
        try:
            return FastTokenizer.from_dir(model_dir)
        except Exception as e:  # noqa: BLE001 - the files changed under the cache: use transformers
            logger.debug("FastTokenizer for %s failed (%s); loading it through transformers", model_dir, e)
    try:
        cls = cached_class(model_dir, version)
        if cls is not None:
            tokenizer = cls.from_pretrained(str(model_dir), trust_remote_code=False)
        else:
            from transformers import AutoTokenizer  # imports every model family's config code

            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises many types; the user needs one message
        raise ValueError(f"cannot load the tokenizer of {model_dir}: {e}") from e
    if cls is None or agreed is None:
        remember_class(model_dir, version, tokenizer, _fast_agrees(model_dir, tokenizer))
    return tokenizer


def _fast_agrees(model_dir: Path, tokenizer: Any) -> bool:
    """Whether FastTokenizer does what ``tokenizer`` does on every probe."""
    try:
        difference = first_difference(FastTokenizer.from_dir(model_dir), tokenizer)
    except Exception as e:  # noqa: BLE001 - no tokenizer.json, a template jinja cannot compile, ...
        difference = str(e)
    if difference is not None:
        logger.debug("tokenizer of %s stays on transformers: %s", model_dir, difference)
    return difference is None


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
