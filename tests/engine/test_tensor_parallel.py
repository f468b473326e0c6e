"""Tensor parallelism over gloo (CPU): TP=2, each rank on one thread, greedy token-identical
to TP=1 (itself held to transformers by the correctness suite) on the tiny models, fp32 and
quantized, dense and mixture-of-experts, under the correctness suite's scheduler settings,
prefix-cache hits and streaming input; the vocabulary-parallel embedding (untied and tied,
fp32 and quantized) holds vocab / world rows per rank; a rank's slice of a quantized weight
computes exactly its part of the product; a dead worker stops the engine with a message
that names it; bad sizes refused."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import psutil
import pytest
import torch
from oracle import SCHEDULER_SETTINGS, record_routing
from server_utils import wait_until
from tiny_models import build_tiny_model

from livelm import SamplingParams
from livelm.engine.async_engine import AsyncEngine
from livelm.engine.llm import LLM
from livelm.layers.quantized import QuantEmbedding, QuantLinear
from livelm.layers.tensor_parallel import (
    AllReduceBlock,
    VocabParallelEmbedding,
    keep_columns,
    keep_rows,
)
from livelm.models.moe import SparseMoeBlock
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
    odd = build_tiny_model(tmp_path / "odd_experts", "qwen3_moe", moe_intermediate_size=45)
    with pytest.raises(ValueError, match="must divide the model's moe_intermediate_size 45"):
        LLM(str(odd), tensor_parallel_size=2)
    shared = build_tiny_model(tmp_path / "odd_shared", "qwen2_moe", shared_expert_intermediate_size=30)
    with pytest.raises(ValueError, match="must divide the model's shared_expert_intermediate_size 30"):
        LLM(str(shared), tensor_parallel_size=4)
    mixtral = build_tiny_model(tmp_path / "odd_mixtral", "mixtral", moe_intermediate_size=50)
    with pytest.raises(ValueError, match="must divide the model's intermediate_size 50"):
        LLM(str(mixtral), tensor_parallel_size=4)
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


# Qwen2-MoE with its shared expert and a dense layer (mlp_only_layers), Qwen3-MoE, Mixtral.
MOE_MODELS = {
    "qwen2_moe": ("qwen2_moe", {"mlp_only_layers": [1], "num_hidden_layers": 3}),
    "qwen3_moe": ("qwen3_moe", {}),
    "mixtral": ("mixtral", {}),
}


@pytest.fixture(scope="module")
def moe_references(tmp_path_factory):
    """Per MoE model: (dir, TP=1 greedy outputs)."""
    root = tmp_path_factory.mktemp("tp_moe")
    refs = {}
    for name, (arch, overrides) in MOE_MODELS.items():
        d = build_tiny_model(root / name, arch, **overrides)
        refs[name] = (d, _greedy(d, _prompts())[0])
    return refs


@pytest.mark.parametrize("name", list(MOE_MODELS))
@pytest.mark.parametrize("setting", ["default", "chunked_prefill"])
def test_tp2_moe_equals_tp1(moe_references, name, setting, monkeypatch):
    """Each rank keeps every expert's share of the intermediate rows (and the shared
    expert's), the router whole, one all-reduce per MoE block; every expert is reached
    (routing recorded on rank 0, which routes as every rank does: same input, same router)."""
    seen = record_routing(monkeypatch)
    d, want = moe_references[name]
    got, llm = _greedy(d, _prompts(), tensor_parallel_size=2, num_threads=2, **SETTINGS[setting])
    try:
        model, full = llm.engine.runner.model, llm.engine.model_config
        e, inter, hidden = full.moe.num_experts, full.moe.intermediate_size, full.hidden_size
        blocks = [layer.mlp for layer in model.layers if isinstance(layer.mlp, AllReduceBlock)]
        assert len(blocks) == sum(full.moe.sparse_layers) > 0
        for block in blocks:
            assert isinstance(block.inner, SparseMoeBlock)
            experts = block.inner.experts
            assert experts.gate_up_proj.shape == (e * inter, hidden)  # 2 * I / 2 rows per expert
            assert experts.down_proj.shape == (e * hidden, inter // 2)
            assert (block.inner.gate.out_features, block.inner.gate.in_features) == (e, hidden)  # the router: whole
            if full.moe.shared_intermediate_size:
                assert block.inner.shared_expert.intermediate == full.moe.shared_intermediate_size // 2
        if name == "qwen2_moe":  # the dense layer split as a dense model's
            assert model.layers[1].mlp.intermediate == full.intermediate_size // 2
    finally:
        llm.engine.close()
    assert got == want
    assert set(torch.cat([s.flatten() for s in seen]).tolist()) == set(range(full.moe.num_experts))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quantization", ["none", "q8_0", "q4_1"])
def test_tp2_vocab_parallel_embedding(tmp_path, tied, quantization):
    """Each rank's embedding holds vocab / 2 rows (fp32, or quantized in its format); a tied
    head reads that same slice (a quantized one its very buffers); outputs equal TP=1's."""
    d = build_tiny_model(tmp_path / "m", "llama", tie_word_embeddings=tied)
    want = _greedy(d, _prompts(), quantization=quantization)[0]
    got, llm = _greedy(d, _prompts(), tensor_parallel_size=2, num_threads=2, quantization=quantization)
    try:
        model, vocab = llm.engine.runner.model, llm.engine.model_config.vocab_size
        embed = model.embed_tokens
        assert isinstance(embed, VocabParallelEmbedding) and embed.start == 0 and embed.rows == vocab // 2
        table = embed.inner
        if quantization == "none":
            assert type(table) is torch.nn.Embedding and table.weight.shape == (vocab // 2, 64)
        else:
            assert isinstance(table, QuantEmbedding) and table.fmt == quantization
            assert table.out_features == vocab // 2 and table.qs.shape[0] == vocab // 2
        head = model.lm_head.inner
        assert head.out_features == vocab // 2
        if tied:
            hidden = torch.randn(3, 64)
            rows = table.forward(torch.arange(vocab // 2))  # the slice, dequantized
            assert torch.allclose(head.forward(hidden), hidden @ rows.t(), atol=1e-4)
            if quantization != "none":
                assert head.qs is table.qs  # shared, not copied
    finally:
        llm.engine.close()
    assert got == want


@pytest.mark.parametrize("fmt", ["none", "q8_0", "q4_1"])
def test_vocab_parallel_embedding_parts_sum_to_the_whole_table(fmt):
    """Each rank's lookup is its rows of the table and zeros for the ids the other rank
    holds, so the all-reduce's sum is exactly the whole table's rows (fp32 and quantized)."""

    class NoPeers:  # one rank's partial embedding, before the all-reduce
        world_size = 2

        def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
            return t

    torch.manual_seed(2)
    table = torch.nn.Embedding(10, 64).requires_grad_(False)
    if fmt != "none":
        weight, table = table.weight, QuantEmbedding(10, 64, fmt)
        for name, t in quantize(weight, fmt).tensors().items():
            setattr(table, name, t)
    ids = torch.tensor([[0, 4, 5], [9, 3, 7]])
    full = table.forward(ids)
    parts = [VocabParallelEmbedding(keep_rows(table, [(a, a + 5)]), NoPeers(), a).forward(ids) for a in (0, 5)]
    mine = ids < 5
    assert torch.equal(parts[0][mine], full[mine]) and not parts[0][~mine].any()
    assert torch.equal(parts[1][~mine], full[~mine]) and not parts[1][mine].any()
    assert torch.equal(parts[0] + parts[1], full)


def test_every_rank_keeps_its_share(tmp_path):
    """shard_model for rank 0 and rank 1 (no process group needed to slice): the ranks'
    shares put back together are the whole weights: each expert's gate and up rows and its
    down columns, the shared expert's, the router and its gate whole on both, the
    embedding's rows and the (tied) head over each rank's own slice of the table."""
    from livelm.layers.tensor_parallel import TensorParallelGroup
    from livelm.models.loader import load_model
    from livelm.models.tensor_parallel import shard_model

    d = build_tiny_model(tmp_path / "m", "qwen2_moe", mlp_only_layers=[1], num_hidden_layers=3,
                         tie_word_embeddings=True)

    def load():
        return load_model(d, torch.float32, torch.device("cpu"), 256, "none")

    whole = load()
    shards = [shard_model(load(), TensorParallelGroup(None, rank, 2)) for rank in (0, 1)]
    vocab = whole.config.vocab_size
    e, i, h = whole.config.moe.num_experts, whole.config.moe.intermediate_size, whole.config.hidden_size
    for rank, shard in enumerate(shards):
        embed = shard.embed_tokens
        assert embed.start == rank * vocab // 2 and embed.rows == vocab // 2
        assert torch.equal(embed.inner.weight, whole.embed_tokens.weight[rank * vocab // 2:(rank + 1) * vocab // 2])
        assert shard.lm_head.inner.weight is embed.inner.weight  # the tied head: the same slice
    for n, layer in enumerate(whole.layers):
        parts = [s.layers[n].mlp for s in shards]
        if n == 1:  # the dense layer
            assert torch.equal(torch.cat([p.down_proj.inner.weight for p in parts], 1), layer.mlp.down_proj.weight)
            continue
        blocks = [p.inner for p in parts]
        gate_up = torch.cat([b.experts.gate_up_proj.view(e, 2, i // 2, h) for b in blocks], dim=2)
        assert torch.equal(gate_up.reshape(e * 2 * i, h), layer.mlp.experts.gate_up_proj)
        assert torch.equal(torch.cat([b.experts.down_proj for b in blocks], 1), layer.mlp.experts.down_proj)
        shared = torch.cat([b.shared_expert.down_proj.weight for b in blocks], 1)
        assert torch.equal(shared, layer.mlp.shared_expert.down_proj.weight)
        for b in blocks:
            assert torch.equal(b.gate.weight, layer.mlp.gate.weight)
            assert torch.equal(b.shared_expert_gate.weight, layer.mlp.shared_expert_gate.weight)
