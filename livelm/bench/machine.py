"""Facts a benchmark record carries: the checkout's commit and the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import livelm

# The source checkout (editable install); in an installed wheel this holds no .git.
CHECKOUT_ROOT = Path(livelm.__file__).resolve().parent.parent


def git_commit(root: Path = CHECKOUT_ROOT) -> str | None:
    """HEAD's commit, read from .git without running git (None outside a checkout)."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        ref_file = git / ref
        if ref_file.is_file():
            return ref_file.read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def machine_info(threads: int | None) -> dict:
    """Cores, torch threads, CPU model, versions and the load average right now."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch  # here, not at the top: the reports' imports stay light
    import transformers

    return {
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "cpu": cpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
