"""Keeps large CPU buffers in the process heap instead of fresh mmaps (glibc only).

glibc serves allocations above its mmap threshold (at most 32 MiB) with a fresh mmap and
unmaps them on free, so each one's pages fault in again on first touch. A prefill step of
4096 tokens makes such buffers in every layer (the gate|up output of SmolLM2-135M is
4096 x 3072 fp32 = 48 MiB), and the faults cost more than the matmul gains (figures in
docs/kernels.md). Raising the mmap and trim thresholds to 1 GiB keeps such
buffers in the heap, where the next step reuses them; the cost is that freed memory up to
that size stays with the process.

:func:`release_free_memory` gives it back once the engine is idle (the async engine's
loop calls it). Not only a big step's buffers stay: so does what other threads free in
their own malloc arenas, whatever the thresholds (a multi-megabyte prompt tokenized in a
server worker thread and then refused leaves hundreds of MiB in that thread's arena), so
without a trim a long-running server's RSS only grows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger("livelm")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD_BYTES = 1 << 30


@functools.cache
def keep_large_buffers_in_heap() -> bool:
    """Set glibc's mmap and trim thresholds once per process; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, _THRESHOLD_BYTES) == 1
    if ok:
        logger.info("glibc mmap/trim thresholds raised to 1 GiB: large step buffers stay in the heap")
    return ok


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Give the free pages of every malloc arena back to the OS (glibc ``malloc_trim(0)``).

    Call it when nothing runs: the next step faults its buffers in again, once. Returns
    False where there is no glibc.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
