"""The KV cache's memory (issue 21): reserved without a zero-fill and committed only as
blocks are written, sized by default to what the engine could use (capped by the memory
available), freed blocks reused before untouched ones, and a small engine's resident
memory under a stated bound. (That no kernel reads a slot before writing it is checked by
every engine test: tests/conftest.py fills each cache with NaN first.)"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from livelm.config import EngineConfig
from livelm.core.block_pool import BlockPool
from livelm.engine.llm import LLM
from livelm.runner import kv_cache
from livelm.runner.model_runner import ModelRunner

REPO = Path(__file__).resolve().parents[2]


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_a_cache_is_committed_only_where_written() -> None:
    before = resident_bytes()
    cache = kv_cache.allocate_kv_cache(8, 4, 2**17, 64, torch.float32, torch.device("cpu"))
    assert cache.nbytes == 2 * 8 * 4 * 2**17 * 64 * 4 == 2 * 2**30  # 2 GiB reserved
    assert resident_bytes() - before < 64 * 2**20  # ...and not committed
    k, v = cache.layers[3]
    assert k.shape == v.shape == (4, 2**17, 64) and k.is_contiguous() and v.is_contiguous()
    k[:, :16].fill_(1.0)  # one 16-token block of one layer's keys
    v[:, :16].fill_(2.0)
    assert resident_bytes() - before < 64 * 2**20
    # Every tensor has its own memory: writing one leaves the others as they were.
    assert float(k[:, :16].sum()) == 4 * 16 * 64 and float(v[:, :16].mean()) == 2.0
    assert all(float(t.abs().sum()) == 0 for i, pair in enumerate(cache.layers) if i != 3 for t in pair)


def test_the_default_size_is_what_could_be_used_capped_by_memory(monkeypatch) -> None:
    monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda: 10 * 2**30)
    assert kv_cache.default_cpu_kv_bytes(2**30) == 2**30  # need below the cap: the need
    assert kv_cache.default_cpu_kv_bytes(100 * 2**30) == 4 * 2**30  # 40% of 10 GiB
    monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda: None)
    assert kv_cache.default_cpu_kv_bytes(100 * 2**30) == 4 * 2**30  # unknown: 4 GiB


def test_engine_sizes_its_pool_to_need_or_to_the_setting(llama_dir, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="livelm"):
        llm = LLM(str(llama_dir), max_model_len=256, max_num_seqs=4)
    # 4 sequences x 256 tokens = 64 blocks of 16: the whole need (the tiny model's is small).
    assert llm.engine.stats().num_total_blocks == 4 * 256 // 16
    assert "KV cache: 1024 tokens (64 blocks of 16" in caplog.text and "4.0 full 256-token contexts" in caplog.text
    cfg = llm.engine.model_config
    per_block = ModelRunner.kv_bytes_per_block(cfg, 16, torch.float32)
    exact = LLM(str(llama_dir), max_model_len=256, max_num_seqs=64, kv_cache_gib=40 * per_block / 2**30)
    assert exact.engine.stats().num_total_blocks == 40


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_bad_kv_cache_sizes_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="kv_cache_gib"):
        EngineConfig(kv_cache_gib=bad)
    assert EngineConfig().kv_cache_gib is None  # the default: sized to need


def test_freed_blocks_are_reused_before_untouched_ones() -> None:
    pool = BlockPool(100)
    first = pool.allocate(3)
    assert first == [0, 1, 2]
    pool.release(reversed(first))
    # The three just freed (memory already committed) come back before block 3 onwards.
    assert sorted(pool.allocate(3)) == [0, 1, 2]
    assert pool.allocate(1) == [3]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
def test_a_small_engine_stays_small() -> None:
    """The default model (135M parameters, Q4_1) answering one prompt: peak resident memory
    under 1 GiB, though its default KV pool spans gigabytes (4.6 GB resident before)."""
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's (pytest's) peak across exec.
    code = (
        "from livelm import LLM, SamplingParams\n"
        "llm = LLM()\n"
        "llm.generate(['What is the capital of France?'], SamplingParams(temperature=0, max_tokens=8))\n"
        "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
        "print('PEAK', int(hwm.split()[1]) * 1024, 'POOL', llm.engine.runner.kv_cache.nbytes)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    fields = out.stdout.split()
    peak, pool = int(fields[fields.index("PEAK") + 1]), int(fields[fields.index("POOL") + 1])
    assert peak < 2**30, f"peak RSS {peak / 2**20:.0f} MiB"
    assert pool > peak  # the pool is far larger than what is resident: committed lazily
