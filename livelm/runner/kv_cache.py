"""The KV cache tensors: one ``(key, value)`` pair per layer, each ``[num_kv_heads,
num_slots, row]`` (a row is one token's head in the cache's format:
``layers/attention/kv_format.py``), and how much memory the pool takes by default.

On CPU the whole cache is one anonymous memory map. The kernel gives its pages zeroed and
on first touch, so creating the cache costs nothing (no zero-fill pass: that took ~3.5 s
for 4 GiB on this machine class), and resident memory grows only as blocks are first
written. Nothing needs the zeros: every kernel reads a slot only after its token's K/V was
written there (``tests/runner/test_kv_cache.py`` fills the cache with NaN and checks the
outputs). Freed blocks that hold no cached prefix are handed out again first
(``BlockPool``), so a server's memory stays at what its traffic has needed at once, plus
what the prefix cache keeps.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger("livelm")

# The default CPU cache takes at most this share of the memory available at start-up
# (what max_num_seqs full contexts could use is usually far more).
DEFAULT_MEMORY_FRACTION = 0.4


@dataclass
class KVCache:
    """The per-layer K/V tensors and, on CPU, the memory map they live in (kept alive here)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    buffer: mmap.mmap | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the cache spans (reserved; resident only where written)."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


def allocate_kv_cache(num_layers: int, num_kv_heads: int, num_slots: int, row_width: int,
                      dtype: torch.dtype, device: torch.device) -> KVCache:
    """Uninitialized K/V tensors ``[num_kv_heads, num_slots, row_width]`` of ``dtype`` in
    every layer (a row: one token's head, ``head_dim`` elements, or a quantized row of
    ``kv_format.kv_row_width``): lazily committed zero pages on CPU, ``torch.empty`` on
    other devices."""
    shape = (num_kv_heads, num_slots, row_width)
    if device.type != "cpu":
        return KVCache([(torch.empty(shape, dtype=dtype, device=device),
                         torch.empty(shape, dtype=dtype, device=device)) for _ in range(num_layers)])
    elem = torch.empty((), dtype=dtype).element_size()
    per_tensor = num_kv_heads * num_slots * row_width * elem
    # Deliberately no MADV_HUGEPAGE: khugepaged would collapse sparsely written 2 MiB
    # ranges into whole huge pages, committing memory no block uses.
    buffer = mmap.mmap(-1, 2 * num_layers * per_tensor)
    flat = torch.frombuffer(buffer, dtype=dtype)
    views = flat.view(num_layers, 2, *shape)
    return KVCache([(views[i, 0], views[i, 1]) for i in range(num_layers)], buffer)


def available_memory_bytes() -> int | None:
    """Memory the system could give this process now (``MemAvailable`` on Linux), or None
    where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_cpu_kv_bytes(useful_bytes: int, fraction: float = DEFAULT_MEMORY_FRACTION) -> int:
    """The default CPU cache size: what ``max_num_seqs`` full contexts could use
    (``useful_bytes``), capped at ``fraction`` of the memory available now (4 GiB where that
    cannot be read)."""
    available = available_memory_bytes()
    cap = int(available * fraction) if available is not None else 4 * 2**30
    return min(useful_bytes, cap)
