"""Compiling the C++ CPU kernels on first use with torch's extension builder.

When no compiler (or ninja) is available, or ``LIVELM_DISABLE_CPP_KERNELS=1`` is set,
:func:`build_extension` gives None and callers use their pure-torch path, which computes
the same results.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger("livelm")

SOURCES = Path(__file__).parent / "csrc"


# -fopenmp only when compiling: linking it would pull in the system libgomp next to torch's
# bundled copy, and two OpenMP pools spinning on the same cores made every torch op ~100x
# slower. Unlinked, the GOMP symbols resolve to torch's own.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]


def compile_extension(name: str, source: str, extra_cflags: tuple[str, ...] = ()) -> ModuleType:
    """Compile (or load the cached build of) ``csrc/<source>`` as module ``name`` for this
    CPU; raises when it cannot be built. ``extra_cflags`` add to the shared flags."""
    from torch.utils.cpp_extension import load

    return load(name=name, sources=[str(SOURCES / source)], extra_cflags=[*_CFLAGS, *extra_cflags],
                verbose=False)


def build_extension(name: str, source: str, what: str, extra_cflags: tuple[str, ...] = ()) -> ModuleType | None:
    """:func:`compile_extension`, or None (said in the log) when the kernels are disabled
    or cannot be built; ``what`` names the code that then takes its torch path."""
    if os.environ.get("LIVELM_DISABLE_CPP_KERNELS") == "1":
        logger.info("C++ CPU kernels disabled by LIVELM_DISABLE_CPP_KERNELS; %s uses torch ops", what)
        return None
    try:
        return compile_extension(name, source, extra_cflags)
    except Exception as e:  # no compiler, no ninja, no headers: the torch path still works
        logger.warning("C++ CPU kernels unavailable (%s); %s uses the slower torch path", e, what)
        return None
