"""Access to the helpers of a source checkout's ``benchmarks/`` folder (transformers'
batched generate, the random SmolLM2-shaped model, machine facts), reused rather than
copied; an installed wheel without that folder gets a clear error instead."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import livelm

BENCHMARKS_DIR = Path(livelm.__file__).resolve().parent.parent / "benchmarks"


def load(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (e.g. ``common``, ``offline_throughput``)."""
    if not (BENCHMARKS_DIR / f"{name}.py").is_file():
        raise RuntimeError(f"this needs livelm's source checkout: {BENCHMARKS_DIR / (name + '.py')} "
                           "is missing (clone the repository and `pip install -e .`)")
    # The scripts import each other by bare name (``from common import ...``).
    if str(BENCHMARKS_DIR) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS_DIR))
    return importlib.import_module(name)


def random_default_shape_model(cache_dir: Path | None = None) -> Path:
    """A random-weight Llama of the default model's (SmolLM2-135M's) shape, built once."""
    from livelm.models.default_model import cache_root

    out = (cache_dir or cache_root()) / "bench" / "random-smollm2-135m-shape"
    return Path(load("common").build_random_smollm2_shape(out))


def machine_facts(threads: int | None = None) -> dict:
    """Cores, CPU, versions and load average (``benchmarks/common.machine_info``), or just
    cores and load outside a checkout."""
    import os

    try:
        return load("common").machine_info(threads)
    except (RuntimeError, ImportError):
        return {"cores": os.cpu_count(), "torch_threads": threads,
                "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def commit() -> str | None:
    """The checkout's HEAD commit, or None."""
    try:
        return load("common").git_commit()
    except (RuntimeError, ImportError):
        return None
