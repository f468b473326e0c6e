"""Shared fixtures: tiny models built once per session, and the no-leak invariant."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Llama, Qwen2 and Qwen3 models in HF format."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs) -> Path:
    """The tiny Llama model's directory."""
    return tiny_model_dirs["llama"]


@pytest.fixture(autouse=True)
def no_leaked_kv_blocks():
    """After every test, every live engine has all its KV blocks back and nothing running."""
    yield
    from livelm.engine.engine import Engine

    for core in list(Engine.live_instances):
        deadline = time.monotonic() + 5.0  # an AsyncEngine frees blocks on its own thread
        while time.monotonic() < deadline and (
            core.scheduler.has_unfinished() or core.stats().num_free_blocks != core.stats().num_total_blocks
        ):
            time.sleep(0.01)
        stats = core.stats()
        assert not core.scheduler.has_unfinished(), "a request was left running or waiting"
        assert stats.num_free_blocks == stats.num_total_blocks, (
            f"{stats.num_total_blocks - stats.num_free_blocks} KV blocks leaked"
        )
