"""Tensor parallelism over gloo (CPU): TP=2, each rank on one thread, greedy token-identical
to TP=1 (itself held to transformers by the correctness suite) on the tiny models, fp32 and
quantized, under the correctness suite's scheduler settings, prefix-cache hits and
streaming input; a rank's slice of a quantized weight computes exactly its part of the
product; a dead worker stops the engine with a message that names it; bad sizes refused."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import psutil
import pytest
import torch
from oracle import SCHEDULER_SETTINGS
from server_utils import wait_until
from tiny_models import build_tiny_model

from livelm import SamplingParams
from livelm.engine.async_engine import AsyncEngine
from livelm.engine.llm import LLM
from livelm.layers.quantized import QuantLinear
from livelm.layers.tensor_parallel import keep_columns, keep_rows
from livelm.quant.formats import quantize

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
SETTINGS = SCHEDULER_SETTINGS  # the correctness suite's


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(n)] for n in (1, 3, 8, 17, 48, 97, 130, 220)]


def _greedy(model_dir, prompts, **options) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(model_dir), **options)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)], llm


@pytest.fixture(scope="module")
def reference(tiny_model_dirs):
    """TP=1 greedy outputs per (arch, quantization)."""
    cache: dict[tuple[str, str], list[list[int]]] = {}

    def get(arch: str, quantization: str) -> list[list[int]]:
        if (arch, quantization) not in cache:
            cache[arch, quantization] = _greedy(tiny_model_dirs[arch], _prompts(), quantization=quantization)[0]
        return cache[arch, quantization]

    return get


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_tp2_llama_fp32_equals_tp1_under_every_setting(tiny_model_dirs, reference, setting):
    got, llm = _greedy(tiny_model_dirs["llama"], _prompts(), tensor_parallel_size=2, num_threads=2,
                       **SETTINGS[setting])
    try:
        assert got == reference("llama", "none")
        assert len(llm.engine.tp_workers.pids) == 1 and torch.get_num_threads() == 1  # one thread per rank
        if setting == "preemption":
            assert llm.engine.scheduler.num_preemptions > 0
    finally:
        llm.engine.close()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("setting", ["default", "tiny_budget"])
def test_tp2_other_architectures(tiny_model_dirs, reference, arch, setting):
    """Qwen2 (q/k/v bias: sliced with its rows) and Qwen3 (per-head q/k norms)."""
    got, llm = _greedy(tiny_model_dirs[arch], _prompts(), tensor_parallel_size=2, num_threads=2,
                       **SETTINGS[setting])
    llm.engine.close()
    assert got == reference(arch, "none")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_tp2_gemma(tmp_path, arch):
    """Gemma 2 (soft caps, sliding and global layers, sandwich norms) and Gemma 3 (tied
    head, q/k norms, per-layer-type rotary) split over two ranks: as one process."""
    d = build_tiny_model(tmp_path / arch, arch, num_hidden_layers=4 if arch == "gemma2" else 3,
                         tie_word_embeddings=arch == "gemma3")
    want = _greedy(d, _prompts())[0]
    got, llm = _greedy(d, _prompts(), tensor_parallel_size=2, num_threads=2, **SETTINGS["chunked_prefill"])
    llm.engine.close()
    assert got == want


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("setting", ["default", "preemption"])
def test_tp2_quantized_equals_tp1(tiny_model_dirs, reference, fmt, setting):
    """Weights quantized at load, then sharded along their blocks (nothing requantized)."""
    got, llm = _greedy(tiny_model_dirs["llama"], _prompts(), tensor_parallel_size=2, num_threads=2,
                       quantization=fmt, **SETTINGS[setting])
    llm.engine.close()
    assert got == reference("llama", fmt)


def test_tp2_prefix_cache_hits_and_kv_replicated_heads(tmp_path, tiny_model_dirs):
    """The same prompts twice: the second pass reads cached blocks on every rank. On a
    model with one KV head (fewer KV heads than ranks) each rank keeps a copy of it."""
    mqa = build_tiny_model(tmp_path / "mqa", "llama", num_key_value_heads=1)
    prompts = _prompts(3)
    for model_dir in (tiny_model_dirs["llama"], mqa):
        want, _ = _greedy(model_dir, prompts)
        llm = LLM(str(model_dir), tensor_parallel_size=2, num_threads=2)
        try:
            first = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
            hits = llm.engine.stats().prefix_cache_hit_tokens
            again = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
            assert llm.engine.stats().prefix_cache_hit_tokens > hits
        finally:
            llm.engine.close()
        assert first == want and again == want


def test_tp2_streaming_input_and_worker_death(tiny_model_dirs):
    """An input stream fed in pieces under TP=2 answers as the one-shot prompt does; then
    a SIGKILLed worker stops the engine: the request in flight fails with a message that
    names the worker, and no process is left behind."""
    model_dir = tiny_model_dirs["llama"]
    ids = _prompts(5)[-1]
    want, _ = _greedy(model_dir, [ids])

    async def main() -> None:
        engine = AsyncEngine(str(model_dir), tensor_parallel_size=2, num_threads=2)
        pids = engine._engine.tp_workers.pids
        try:
            async with engine.open_stream() as stream:
                for i in range(0, len(ids), 37):
                    stream.append(ids[i : i + 37])
                    await asyncio.sleep(0.01)
                stream.close_input()
                got = [t async for out in stream.generate(GREEDY) for t in out.outputs[0].token_ids]
            assert got == want[0]
            long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
            seen = 0
            with pytest.raises(Exception, match="tensor-parallel worker 1") as failure:
                async for _ in engine.generate(ids, long):
                    seen += 1
                    if seen == 3:
                        os.kill(pids[0], signal.SIGKILL)
            assert "restart the engine" in str(failure.value)
            assert wait_until(lambda: not engine.is_alive, 30) and "tensor-parallel worker 1" in engine.dead_reason
        finally:
            await engine.shutdown()
        assert wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                          for p in pids), 30)

    asyncio.run(main())


def test_tp_sizes_and_models_refused(tmp_path, tiny_model_dirs):
    llama = str(tiny_model_dirs["llama"])
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        LLM(llama, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="not supported yet"):
        LLM(llama, tensor_parallel_size=2, data_parallel_size=2)
    with pytest.raises(ValueError, match="must divide the model.s 4 attention heads"):
        LLM(llama, tensor_parallel_size=3)
    moe = build_tiny_model(tmp_path / "moe", "qwen2_moe")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        LLM(str(moe), tensor_parallel_size=2)
    llm = LLM(llama, tensor_parallel_size=2, num_threads=2)
    try:
        with pytest.raises(ValueError, match="not supported with tensor_parallel_size > 1"):
            llm.engine.stage_weights({})
    finally:
        llm.engine.close()


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "q4_0", "int8"])
def test_rank_slices_of_a_quantized_linear(fmt):
    """Rows (column-parallel) and block-aligned columns (row-parallel) of a quantized
    weight: each slice computes exactly its part of the whole product; the row-parallel
    parts sum to the whole."""
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.1
    qt = quantize(w, fmt)
    whole = QuantLinear(128, 48, fmt)
    for name, t in qt.tensors().items():
        setattr(whole, name, t)
    x = torch.randn(5, 128)
    full = whole.forward(x)
    rows = keep_rows(whole, [(0, 8), (24, 40)])
    assert torch.equal(rows.forward(x), torch.cat([full[:, 0:8], full[:, 24:40]], dim=1))
    parts = [keep_columns(whole, a, a + 64) for a in (0, 64)]
    summed = parts[0].forward(x[:, :64]) + parts[1].forward(x[:, 64:])
    assert torch.allclose(summed, full, atol=1e-4)
    if fmt != "int8":
        with pytest.raises(ValueError, match="blocks are 32 wide"):
            keep_columns(whole, 0, 48)


def test_tp2_speculative_and_sinks_requests(tiny_model_dirs):
    """Rank 0's features over a split model: n-gram speculative decoding (verification
    forwards of 1 + k tokens, rolled back) and a kv_policy "sinks" request whose window
    rolls, both equal to TP=1."""
    model_dir = str(tiny_model_dirs["llama"])
    rng = random.Random(9)
    loop = [rng.randrange(3, 250) for _ in range(12)]
    prompts = [loop * 6, _prompts(9)[5]]
    sinks = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True,
                           extra={"kv_policy": "sinks", "kv_window": 48, "num_sink_tokens": 4})
    runs = []
    for tp in (1, 2):
        llm = LLM(model_dir, tensor_parallel_size=tp, num_threads=2, speculative_method="ngram")
        try:
            spec = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
            drafted = llm.engine.stats().spec_num_draft_tokens
            rolled = llm.generate([_prompts(9)[6]], sinks, use_tqdm=False)[0].outputs[0].token_ids
            runs.append((spec, rolled, drafted, llm.engine.stats().num_evicted_tokens))
        finally:
            llm.engine.close()
    (spec1, rolled1, drafted1, evicted1), (spec2, rolled2, drafted2, evicted2) = runs
    assert spec2 == spec1 and rolled2 == rolled1
    assert drafted2 > 0 and evicted2 > 0 and (drafted2, evicted2) == (drafted1, evicted1)


def test_rank_slices_of_a_split_quantized_linear():
    """A fused q|k|v stored in parts of different formats keeps, per part, its own rows."""
    from livelm.layers.quantized import SplitQuantLinear

    torch.manual_seed(1)
    parts = ((32, "q4_1"), (16, "q8_0"), (16, "q4_0"))
    split = SplitQuantLinear(64, parts)
    weights = []
    for part, (rows, fmt) in zip(split.parts, parts, strict=True):
        w = torch.randn(rows, 64) * 0.1
        weights.append(w)
        for name, t in quantize(w, fmt).tensors().items():
            setattr(part, name, t)
    x = torch.randn(3, 64)
    full = split.forward(x)
    kept = keep_rows(split, [(8, 24), (32, 40), (48, 56)])
    assert [p.fmt for p in kept.parts] == ["q4_1", "q8_0", "q4_0"]
    assert torch.equal(kept.forward(x), torch.cat([full[:, 8:24], full[:, 32:40], full[:, 48:56]], dim=1))
