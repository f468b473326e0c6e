"""Weights quantized at load, cached on disk so later starts skip the quantization.

``quantization=<format>`` on a float checkpoint (or a converted GGUF stored in another
format) quantizes every linear layer at load: ~1.3 s for SmolLM2-135M to q8_0 on 2 cores,
and proportionally more for bigger models, on every start. The first load writes the
quantized tensors, under their checkpoint names, to one safetensors file in
``$LIVELM_WEIGHT_CACHE_DIR`` (default: ``quantized/`` in livelm's cache directory); later loads read them from there instead of quantizing again.

The key covers everything the quantized bytes depend on: the checkpoint files (resolved
path, size, mtime and the sha256 of each file's safetensors header, which names every
tensor with its dtype, shape and offsets), the format, :data:`WEIGHT_CACHE_VERSION` (bump it
when a quantizer or a format's layout changes) and torch's version. Hashing the whole
content of a multi-GB checkpoint would cost seconds on every start; any rewrite of a file
changes its mtime (and nearly always its header), like the GGUF conversion cache's key.

What is not cached: fp32 weights packed for the CPU GEMMs (oneDNN's packed layout is an
opaque, ISA-specific tensor that cannot be saved; the panel layout is a copy at memory
speed), and float tensors that stay float (read from the checkpoint as they are).

``LIVELM_DISABLE_WEIGHT_CACHE=1`` turns the cache off. A cache file that cannot be read is
deleted and the weights are quantized again; one that cannot be written (read-only or full
disk) costs a warning, never the load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from livelm.models.default_model import cache_root
from livelm.quant.formats import QuantizedTensor
from livelm.quant.storage import QUANT_METADATA_KEY, flatten_for_safetensors, stored_quantized

logger = logging.getLogger("livelm")

# 2: under auto, fused weights whose parts differ in format are split, not requantized.
WEIGHT_CACHE_VERSION = 2
_DISABLE_ENV = "LIVELM_DISABLE_WEIGHT_CACHE"
_DIR_ENV = "LIVELM_WEIGHT_CACHE_DIR"


def weight_cache_root() -> Path:
    """``$LIVELM_WEIGHT_CACHE_DIR``, else ``quantized/`` in livelm's cache directory."""
    env = os.environ.get(_DIR_ENV)
    return Path(env).expanduser() if env else cache_root() / "quantized"


def _header_sha256(path: Path) -> str:
    """sha256 of a safetensors file's JSON header (its first 8 bytes give its length)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return hashlib.sha256(f.read(min(length, 100_000_000))).hexdigest()


def _checkpoint_key(files: Sequence[Path], mode: str) -> str:
    parts = [f"v{WEIGHT_CACHE_VERSION}", mode, torch.__version__]
    for path in files:
        path = Path(path).resolve()
        stat = path.stat()
        parts.append(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{_header_sha256(path)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


class QuantizedWeightCache:
    """The on-disk cache entry of one checkpoint loaded under one quantization mode
    (a format name, or ``auto`` where parts of one fused weight were stored in different
    formats and some are requantized).

    ``lookup()`` gives the cached tensors when the entry exists; otherwise the loader
    ``add()``s each weight it quantized and ``save()``s once the whole model loaded.
    """

    def __init__(self, files: Sequence[Path], mode: str, root: Path | None = None) -> None:
        self.mode = mode
        first = Path(files[0]).resolve()
        model_key = hashlib.sha256(str(first.parent).encode()).hexdigest()[:16]
        self.directory = (root if root is not None else weight_cache_root()) / model_key
        self.path = self.directory / f"{mode}-{_checkpoint_key(files, mode)}.safetensors"
        self.source = str(first.parent)
        self._pending: dict[str, QuantizedTensor] = {}

    @staticmethod
    def enabled() -> bool:
        """False when ``LIVELM_DISABLE_WEIGHT_CACHE=1``."""
        return os.environ.get(_DISABLE_ENV) != "1"

    def lookup(self) -> dict[str, QuantizedTensor] | None:
        """The cached quantized weights by checkpoint name, or None on a miss (an unreadable
        entry is removed, so the next save replaces it)."""
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                formats: dict[str, str] = json.loads(meta[QUANT_METADATA_KEY])
                parts: dict[str, dict[str, torch.Tensor]] = {}
                for key in f.keys():
                    base, _, suffix = key.rpartition(".")
                    parts.setdefault(base, {})[suffix] = f.get_tensor(key)
            weights = {name: stored_quantized(formats[name], parts[name]) for name in formats}
        except Exception as e:  # noqa: BLE001 - any damage means: quantize again
            logger.warning("quantized weight cache %s is unreadable (%s); quantizing again", self.path, e)
            self.path.unlink(missing_ok=True)
            return None
        logger.info("quantized weights (%s) read from the cache %s", self.mode, self.path)
        return weights

    def add(self, name: str, weight: QuantizedTensor) -> None:
        """Remember checkpoint weight ``name`` as quantized at this load."""
        self._pending[name] = weight

    def save(self) -> None:
        """Write what was added (atomically), replacing this model's older entries in this
        mode; a failure to write is logged, never raised."""
        if not self._pending:
            return
        from safetensors.torch import save_file

        tensors, metadata = flatten_for_safetensors(dict(self._pending))
        metadata["livelm.source"] = self.source
        tmp: str | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            os.close(fd)
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, self.path)
            tmp = None
            for stale in self._stale_entries():
                stale.unlink(missing_ok=True)
            logger.info("quantized weights (%s) cached in %s", self.mode, self.path)
        except OSError as e:
            logger.warning("could not write the quantized weight cache %s: %s", self.path, e)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            self._pending.clear()

    def _stale_entries(self) -> Iterator[Path]:
        for entry in self.directory.glob(f"{self.mode}-*.safetensors"):
            if entry != self.path:
                yield entry
