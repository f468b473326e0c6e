"""Shared fixtures: tiny models built once per session, and the no-leak invariant."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def private_weight_cache(tmp_path_factory):
    """Weights quantized at load are cached under a directory of this test session's (in
    the environment, so subprocesses use it too): tests exercise the cache without leaving
    entries for their temporary models in the user's cache."""
    import os

    os.environ["LIVELM_WEIGHT_CACHE_DIR"] = str(tmp_path_factory.mktemp("weight-cache"))
    yield
    os.environ.pop("LIVELM_WEIGHT_CACHE_DIR", None)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Llama, Qwen2 and Qwen3 models in HF format."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs) -> Path:
    """The tiny Llama model's directory."""
    return tiny_model_dirs["llama"]


# Caches up to this size start poisoned (larger ones, the default model's, are left as
# they come: filling gigabytes would cost seconds and commit the memory).
_POISON_KV_UP_TO_BYTES = 256 * 2**20


@pytest.fixture(scope="session", autouse=True)
def nan_filled_kv_caches():
    """Every engine built in the tests starts with NaN in every KV slot. The cache is not
    zero-filled (runner/kv_cache.py), so a kernel that read a slot before its token's K/V
    was written (a padded block, the tail of a partial block, a freed or forked block)
    would turn outputs into NaN and fail whatever test it ran in, the correctness suite
    against transformers first."""
    from livelm.runner import model_runner

    allocate = model_runner.allocate_kv_cache

    def poisoned(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        cache = allocate(*args, **kwargs)
        if cache.nbytes <= _POISON_KV_UP_TO_BYTES:
            # q8_0 caches are bytes: 0xFF makes every scale a float16 NaN.
            poison = float("nan") if cache.layers[0][0].dtype.is_floating_point else 0xFF
            for k, v in cache.layers:
                k.fill_(poison)
                v.fill_(poison)
        return cache

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_runner, "allocate_kv_cache", poisoned)
        yield


@pytest.fixture(autouse=True)
def no_leaked_kv_blocks():
    """After every test, every live engine has all its KV blocks back and nothing running."""
    yield
    from livelm.engine.engine import Engine

    for core in list(Engine.live_instances):
        deadline = time.monotonic() + 5.0  # an AsyncEngine frees blocks on its own thread
        while time.monotonic() < deadline and (
            core.scheduler.has_unfinished() or core.stats().num_free_blocks != core.stats().num_total_blocks
            or not _draft_pool_free(core)
        ):
            time.sleep(0.01)
        stats = core.stats()
        assert not core.scheduler.has_unfinished(), "a request was left running or waiting"
        assert stats.num_free_blocks == stats.num_total_blocks, (
            f"{stats.num_total_blocks - stats.num_free_blocks} KV blocks leaked"
        )
        assert _draft_pool_free(core), "the draft model's KV pool leaked blocks"


def _draft_pool_free(core) -> bool:
    """True when the engine has no draft model (speculative_method "draft"), or every block
    of the draft model's own KV pool is back."""
    draft = getattr(core, "draft", None)
    return draft is None or draft.num_free_blocks == draft.num_blocks
