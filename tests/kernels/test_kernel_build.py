"""The kernel floor's build helpers: the torch fallback's None when kernels are disabled or
cannot be built, every C++ source shipped with the package, the heap tuning."""

from __future__ import annotations

import fnmatch
import logging
import tomllib
from pathlib import Path

import pytest

from livelm.kernels import build, cpu_memory

REPO = Path(__file__).resolve().parents[2]


def test_disabled_kernels_give_none(monkeypatch, caplog) -> None:
    monkeypatch.setenv("LIVELM_DISABLE_CPP_KERNELS", "1")
    monkeypatch.setattr(build, "compile_extension", lambda *a: pytest.fail("must not compile"))
    with caplog.at_level(logging.INFO, logger="livelm"):
        assert build.build_extension("livelm_never", "fused_ops.cpp", "the test op") is None
    assert "LIVELM_DISABLE_CPP_KERNELS" in caplog.text and "the test op" in caplog.text


def test_a_failed_build_gives_none_and_a_warning(monkeypatch, caplog) -> None:
    monkeypatch.delenv("LIVELM_DISABLE_CPP_KERNELS", raising=False)

    def no_compiler(name, source, extra_cflags=()):
        raise RuntimeError("no c++ here")

    monkeypatch.setattr(build, "compile_extension", no_compiler)
    with caplog.at_level(logging.WARNING, logger="livelm"):
        assert build.build_extension("livelm_never", "fused_ops.cpp", "the test op") is None
    assert "no c++ here" in caplog.text and "torch path" in caplog.text


def test_every_source_is_package_data() -> None:
    sources = sorted(p.name for p in build.SOURCES.iterdir() if p.suffix in (".cpp", ".h"))
    assert {"paged_attention.cpp", "prefill_attention.cpp", "fused_ops.cpp", "quant_linear.cpp"} <= set(sources)
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["livelm"]
    rel = [str((build.SOURCES / s).relative_to(REPO / "livelm")) for s in sources]
    assert [r for r in rel if not any(fnmatch.fnmatch(r, pat) for pat in patterns)] == []


def test_heap_tuning_runs_once() -> None:
    first = cpu_memory.keep_large_buffers_in_heap()
    assert isinstance(first, bool)
    assert cpu_memory.keep_large_buffers_in_heap() is first
