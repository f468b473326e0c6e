"""Which tokenizer class AutoTokenizer picked for a model directory, remembered between runs.

``AutoTokenizer.from_pretrained`` first decides which class a directory needs (from
``tokenizer_config.json`` and the model type in ``config.json``, by rules that change
between transformers versions), importing every model family's configuration code to do
so: ~1.5-2 s of each start-up on 2 cores. The class it then calls ``from_pretrained`` on
builds the tokenizer. So once AutoTokenizer has chosen for a directory, livelm records
the class (its module and name, transformers classes only) in
``<livelm cache>/tokenizer_classes.json``, keyed by the directory, the transformers version
and the size and modification time of the files the choice reads; later runs import just
that module and call the same class. Anything that does not match exactly, or cannot be
read, falls back to AutoTokenizer.

Each entry also says whether livelm's own :class:`~livelm.engine.fast_tokenizer.FastTokenizer`
agreed with that tokenizer on every probe (``engine/fast_tokenizer.py``); where it did,
later runs use it and never import transformers.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from livelm.models.default_model import cache_root

logger = logging.getLogger("livelm")

CACHE_FILE = "tokenizer_classes.json"
MAX_ENTRIES = 256  # the oldest are dropped (test runs make many short-lived directories)
# What AutoTokenizer's choice of class reads.
_KEY_FILES = ("tokenizer_config.json", "config.json", "tokenizer.json")


def _key(model_dir: Path, transformers_version: str) -> str:
    parts = [str(model_dir.resolve()), transformers_version]
    for name in _KEY_FILES:
        try:
            st = (model_dir / name).stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{name}:-")
    return "|".join(parts)


def _cache_path() -> Path:
    return cache_root() / CACHE_FILE


def _read() -> dict[str, Any]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _entry(model_dir: Path, transformers_version: str) -> dict:
    entry = _read().get(_key(model_dir, transformers_version))
    if isinstance(entry, str):  # written before entries said whether FastTokenizer agreed
        entry = {"class": entry}
    return entry if isinstance(entry, dict) else {}


def fast_tokenizer_agrees(model_dir: Path, transformers_version: str) -> bool | None:
    """Whether FastTokenizer agreed with the tokenizer transformers built for
    ``model_dir`` (None: not checked yet)."""
    fast = _entry(model_dir, transformers_version).get("fast")
    return fast if isinstance(fast, bool) else None


def cached_class(model_dir: Path, transformers_version: str) -> type | None:
    """The tokenizer class AutoTokenizer chose for ``model_dir`` before, or None."""
    entry = _entry(model_dir, transformers_version).get("class")
    if not isinstance(entry, str) or ":" not in entry:
        return None
    module_name, _, class_name = entry.partition(":")
    if not module_name.startswith("transformers."):
        return None  # only transformers' own classes, never code from elsewhere
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else None


def remember_class(model_dir: Path, transformers_version: str, tokenizer: Any, fast_agrees: bool | None = None) -> None:
    """Record the class of ``tokenizer`` (built by AutoTokenizer) for ``model_dir``, and
    whether FastTokenizer agreed with it; a cache that cannot be written is skipped (the
    next run asks AutoTokenizer again)."""
    cls = type(tokenizer)
    if not cls.__module__.startswith("transformers."):
        return
    path = _cache_path()
    data = _read()
    key = _key(model_dir, transformers_version)
    data.pop(key, None)  # re-inserted last: the newest
    data[key] = {"class": f"{cls.__module__}:{cls.__qualname__}", "fast": fast_agrees}
    data = dict(list(data.items())[-MAX_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole and renamed: a run reading it meanwhile sees the old or the new file.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=0)
        os.replace(f.name, path)
    except OSError as e:
        logger.debug("cannot record the tokenizer class in %s: %s", path, e)
