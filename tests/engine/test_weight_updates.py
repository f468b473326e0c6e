"""Weight updates without a restart (docs/rl.md): from disk, from tensors, over a gloo
update group; modes for requests in flight; version tags; no reuse of old KV; malformed
updates change nothing; sampling log-probabilities."""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny_model

from livelm import LLM, AsyncEngine, SamplingParams
from livelm.models.weight_transfer import WeightSender

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["The quick brown fox", "Paris is the capital of", "def add(a, b):"]
FORMATS = ["none", "q8_0", "q4_0", "q4_1"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny Llamas of one architecture with different random weights."""
    root = tmp_path_factory.mktemp("rl")
    return build_tiny_model(root / "a", "llama", seed=0), build_tiny_model(root / "b", "llama", seed=1)


@pytest.fixture(scope="module")
def two_tied(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny Qwen2 (tied embeddings, q/k/v bias) of different weights."""
    root = tmp_path_factory.mktemp("rl-tied")
    return build_tiny_model(root / "a", "qwen2", seed=0), build_tiny_model(root / "b", "qwen2", seed=1)


def _tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_update_from_disk_equals_fresh_engine(two_models, fmt):
    a, b = two_models
    fresh = _tokens(LLM(str(b), quantization=fmt, kv_cache_gib=0.02))
    llm = LLM(str(a), quantization=fmt, kv_cache_gib=0.02)
    before = _tokens(llm)
    assert before != fresh  # different weights: the check below can fail
    assert llm.engine.update_weights(str(b)) == 1
    assert _tokens(llm) == fresh
    # A single .safetensors file works as well, and bumps the version again.
    assert llm.engine.update_weights(a / "model.safetensors") == 2
    assert _tokens(llm) == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_update_from_tensors_equals_fresh_engine(two_tied, fmt):
    a, b = two_tied
    fresh = _tokens(LLM(str(b), quantization=fmt, kv_cache_gib=0.02))
    llm = LLM(str(a), quantization=fmt, kv_cache_gib=0.02)
    new = _weights(b)
    # Two halves: a subset first (only q_proj of the fused q|k|v, and the embedding the LM
    # head is tied to), then the rest: partial fused weights read the live remainder.
    first = {k: v for k, v in new.items() if "q_proj" in k or "embed" in k}
    llm.engine.update_weights(first)
    llm.engine.update_weights({k: v for k, v in new.items() if k not in first})
    assert llm.engine.weight_version == 2
    assert _tokens(llm) == fresh


def test_packed_weights_read_back_exactly(two_models):
    """A partial update of a packed fp32 linear rebuilds it from the live packed copy:
    that copy must give the weights back bit for bit."""
    from livelm.models.weight_update import unpack_linear

    a, _ = two_models
    llm = LLM(str(a), kv_cache_gib=0.02)
    w = _weights(a)
    layer = llm.engine.runner.model.layers[0]
    qkv = torch.cat([w[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(unpack_linear(layer.self_attn.qkv_proj), qkv)
    assert torch.equal(unpack_linear(layer.mlp.down_proj), w["model.layers.0.mlp.down_proj.weight"])


def _bad_updates(model_dir: Path) -> list[tuple[object, str]]:
    w = _weights(model_dir)
    name = "model.layers.0.mlp.down_proj.weight"
    nan = w[name].clone()
    nan[0, 0] = math.nan
    return [
        ({name: w[name].t().contiguous()}, "shape"),
        ({name: w[name].to(torch.int32)}, "dtype"),
        ({name: nan}, "NaN"),
        ({"model.layers.9.mlp.down_proj.weight": w[name]}, "no such tensor"),
        ({name: "not a tensor"}, "torch.Tensor"),
        ({**w, "model.layers.0.mlp.up_proj.weight": w[name]}, "shape"),  # the last one is bad
        ({}, "no tensors"),
        ([1, 2], "mapping"),
        (str(model_dir / "missing"), "does not exist"),
    ]


def test_malformed_update_changes_nothing(two_models):
    a, b = two_models
    llm = LLM(str(a), quantization="q8_0", kv_cache_gib=0.02)
    before = _tokens(llm)
    for weights, message in _bad_updates(b):
        with pytest.raises(ValueError, match=message):
            llm.engine.update_weights(weights)
    for mode in ("sometimes", None, 1):
        with pytest.raises(ValueError, match="mode"):
            llm.engine.update_weights(str(b), mode=mode)
    for kwargs, message in [({"port": 0}, "port"), ({"port": 70000}, "port"), ({"backend": "mpi"}, "backend"),
                            ({"world_size": 1}, "world_size"), ({"rank": 0}, "rank")]:
        with pytest.raises(ValueError, match=message):
            llm.engine.join_update_group("127.0.0.1", **{"port": 29999, **kwargs})
    with pytest.raises(ValueError, match="no update group"):
        llm.engine.receive_weights()
    assert llm.engine.weight_version == 0
    assert _tokens(llm) == before


def test_update_drops_old_prefix_cache_and_session_pins(two_models):
    a, b = two_models
    llm = LLM(str(a), kv_cache_gib=0.02)
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # several full blocks
    llm.generate([prompt], GREEDY)
    llm.generate([prompt], GREEDY)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hit_tokens > 0  # the cache works, so "no hit" below means something
    llm.generate([prompt], SamplingParams(max_tokens=2, extra={"session_id": "s"}))
    assert llm.engine.stats().num_sessions == 1
    llm.engine.update_weights(str(b))
    after = llm.engine.stats()
    assert after.num_sessions == 0 and after.num_cached_blocks == 0
    hits = after.prefix_cache_hit_tokens
    out = _tokens(llm, [prompt])
    assert llm.engine.stats().prefix_cache_hit_tokens == hits  # no cross-version hit
    assert out == _tokens(LLM(str(b), kv_cache_gib=0.02), [prompt])


def test_abort_mode_ends_running_requests(two_models):
    a, b = two_models
    llm = LLM(str(a), kv_cache_gib=0.02)
    engine = llm.engine
    state = engine.add("r", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert state.seqs[0].token_ids  # it started
    engine.add("fresh", PROMPTS[1], GREEDY)  # not started: it waits for the new weights
    moved = engine.apply_weights(engine.stage_weights(str(b)), "abort")
    [(aborted, out)] = moved
    assert aborted.request_id == "r"
    assert out.outputs[0].finish_reason == "abort" and out.outputs[0].stop_reason == "weight_update"
    later = engine.states["fresh"]
    while engine.scheduler.has_unfinished():
        engine.step()
    # The request that had not started runs on the new weights alone.
    assert later.seqs[0].weight_versions == [1] * GREEDY.max_tokens
    assert later.seqs[0].token_ids == _tokens(LLM(str(b), kv_cache_gib=0.02), [PROMPTS[1]])[0]


async def _collect(engine: AsyncEngine, prompt, params) -> tuple[list[int], list[int], list[float]]:
    tokens: list[int] = []
    versions: list[int] = []
    slps: list[float] = []
    async for out in engine.generate(prompt, params):
        c = out.outputs[0]
        tokens += c.token_ids
        versions += c.weight_versions
        slps += c.sampling_logprobs or []
    return tokens, versions, slps


def test_continue_mode_spans_an_update(two_models):
    """A request running across a "continue" update has tokens of both versions; those after
    the update are what a fresh engine on the new weights produces from the same prefix."""
    a, b = two_models
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def main():
        engine = AsyncEngine(str(a), kv_cache_gib=0.02)
        try:
            task = asyncio.create_task(_collect(engine, PROMPTS[0], params))
            while engine.stats().num_computed_tokens < 12:
                await asyncio.sleep(0.001)
            assert await engine.update_weights(str(b), mode="continue") == 1
            return await task, engine.encode(PROMPTS[0])
        finally:
            await engine.shutdown()

    (tokens, versions, _), prompt_ids = asyncio.run(main())
    assert len(tokens) == 40 and set(versions) == {0, 1}
    switch = versions.index(1)
    assert versions == [0] * switch + [1] * (40 - switch)
    fresh = LLM(str(b), kv_cache_gib=0.02).generate(
        [prompt_ids + tokens[:switch]], SamplingParams(temperature=0.0, max_tokens=40 - switch, ignore_eos=True)
    )
    assert fresh[0].outputs[0].token_ids == tokens[switch:]


def test_wait_mode_finishes_started_requests_on_old_weights(two_models):
    a, b = two_models
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    old = _tokens(LLM(str(a), kv_cache_gib=0.02), [PROMPTS[0]], params)[0]
    new = _tokens(LLM(str(b), kv_cache_gib=0.02), [PROMPTS[1]], params)[0]

    async def main():
        engine = AsyncEngine(str(a), kv_cache_gib=0.02)
        try:
            first = asyncio.create_task(_collect(engine, PROMPTS[0], params))
            while engine.stats().num_computed_tokens < 10:
                await asyncio.sleep(0.001)
            update = asyncio.create_task(engine.update_weights(str(b), mode="wait"))
            await asyncio.sleep(0.05)  # staged and pending by now, or soon: the next is held
            second = asyncio.create_task(_collect(engine, PROMPTS[1], params))
            return await first, await second, await update
        finally:
            await engine.shutdown()

    (t1, v1, _), (t2, v2, _), version = asyncio.run(main())
    assert version == 1
    assert (t1, set(v1)) == (old, {0})
    assert (t2, set(v2)) == (new, {1})


def test_pause_resume_and_abort_all(llama_dir):
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        engine = AsyncEngine(str(llama_dir), kv_cache_gib=0.02)
        try:
            tasks = [asyncio.create_task(_collect(engine, p, params)) for p in PROMPTS]
            while engine.stats().num_computed_tokens < 20:
                await asyncio.sleep(0.001)
            await engine.pause()
            assert engine.paused
            computed = engine.stats().num_computed_tokens
            await asyncio.sleep(0.1)
            assert engine._engine.scheduler.num_computed_tokens == computed  # no step while paused
            await engine.resume()
            while engine._engine.scheduler.num_computed_tokens == computed:
                await asyncio.sleep(0.001)
            assert await engine.abort_all() == 3
            return [await t for t in tasks]
        finally:
            await engine.shutdown()

    results = asyncio.run(main())
    assert all(len(tokens) < 200 for tokens, _, _ in results)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(port: int, weights_path: str, bad: bool, die: bool) -> None:
    """The trainer process: joins the group as rank 0 and broadcasts ``weights_path``'s
    tensors (``bad``: one wrong shape; ``die``: exits after half the tensors)."""
    torch.set_num_threads(1)
    sender = WeightSender("127.0.0.1", port, world_size=2)
    tensors = load_file(weights_path)
    if bad:
        name = next(iter(tensors))
        tensors[name] = tensors[name][:1]
        try:
            sender.send(tensors)
        except ValueError:
            return
        raise SystemExit("the engine accepted a bad update")
    if die:
        from livelm.models.weight_update import WeightSpec, specs_to_json

        items = list(tensors.items())
        sender.send_bytes(specs_to_json([WeightSpec(n, tuple(t.shape), "float32") for n, t in items]))
        sender.sum(0)
        for _, t in items[: len(items) // 2]:
            sender.broadcast(t.contiguous())
        import os

        os._exit(0)  # dies mid-broadcast
    sender.send(tensors)


async def _group_update(engine: AsyncEngine, ctx, weights_path: str, case: str):
    """One trainer process running ``case``; returns the engine's result or exception."""
    port = _free_port()
    proc = ctx.Process(target=_trainer, args=(port, weights_path, case == "bad", case == "die"))
    proc.start()
    await engine.join_update_group("127.0.0.1", port, timeout_s=60)
    try:
        result = await engine.update_weights_from_group()
    except Exception as e:  # noqa: BLE001 - the caller checks what the case expects
        result = e
    await asyncio.to_thread(proc.join, 60)
    assert proc.exitcode == 0, case
    return result


@pytest.mark.parametrize("fmt", FORMATS)
def test_update_over_gloo_group(two_models, fmt):
    """A trainer process broadcasts the new weights as float32 over gloo; the engine
    receives them into its own layout (packed or requantized): a fresh engine's outputs."""
    a, b = two_models
    fresh = _tokens(LLM(str(b), quantization=fmt, kv_cache_gib=0.02))

    async def main():
        engine = AsyncEngine(str(a), quantization=fmt, kv_cache_gib=0.02)
        try:
            version = await _group_update(engine, mp.get_context("spawn"), str(b / "model.safetensors"), "good")
            return version, [(await _collect(engine, p, GREEDY))[0] for p in PROMPTS]
        finally:
            await engine.shutdown()

    version, new = asyncio.run(main())
    assert version == 1
    assert new == fresh


def test_refused_and_broken_group_updates_keep_the_old_weights(two_models):
    """A header the engine refuses (a wrong shape) makes the trainer's send raise and sends
    nothing; a trainer that dies mid-broadcast fails the receive. Both leave the engine
    serving on its old weights."""
    a, b = two_models

    async def main():
        engine = AsyncEngine(str(a), quantization="q4_0", kv_cache_gib=0.02)
        try:
            old = [await _collect(engine, p, GREEDY) for p in PROMPTS]
            results = {}
            for case in ("bad", "die"):
                results[case] = await _group_update(engine, mp.get_context("spawn"), str(b / "model.safetensors"),
                                                    case)
                assert [await _collect(engine, p, GREEDY) for p in PROMPTS] == old
            return results, engine.weight_version
        finally:
            await engine.shutdown()

    results, version = asyncio.run(main())
    assert isinstance(results["bad"], ValueError) and "shape" in str(results["bad"])
    assert isinstance(results["die"], Exception) and not isinstance(results["die"], ValueError)
    assert version == 0


def test_update_from_gguf_file(two_models, tmp_path, monkeypatch):
    """A GGUF file of the same architecture updates an engine loaded from another GGUF; the
    quantized weights stay in their format and outputs equal a fresh engine's."""
    import importlib.util

    import gguf

    spec = importlib.util.spec_from_file_location("gguf_writer", Path(__file__).parents[1] / "models/test_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    write_gguf = module.write_gguf

    monkeypatch.setenv("LIVELM_CACHE_DIR", str(tmp_path / "cache"))
    a, b = two_models
    ga = write_gguf(a, tmp_path / "a.gguf", gguf.GGMLQuantizationType.Q8_0)
    gb = write_gguf(b, tmp_path / "b.gguf", gguf.GGMLQuantizationType.Q8_0)
    fresh = _tokens(LLM(str(gb), kv_cache_gib=0.02))
    llm = LLM(str(ga), kv_cache_gib=0.02)
    assert _tokens(llm) != fresh
    llm.engine.update_weights(gb)
    assert _tokens(llm) == fresh
    assert llm.engine.runner.model.layers[0].self_attn.o_proj.fmt == "q8_0"
    # Quantized tensors into a float engine are dequantized, as the loader does.
    plain_fresh = _tokens(LLM(str(gb), quantization="none", kv_cache_gib=0.02))
    plain = LLM(str(a), quantization="none", kv_cache_gib=0.02)
    plain.engine.update_weights(gb)
    assert _tokens(plain) == plain_fresh


def test_sampling_logprobs_equal_processed_log_softmax(llama_dir):
    """``sampling_logprobs`` = log-softmax of the processed logits (temperature, top-k) at
    the sampled token, recomputed here with transformers; greedy rows report 0.0."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), torch_dtype=torch.float32).eval()
    llm = LLM(str(llama_dir), kv_cache_gib=0.02)
    cases = [
        SamplingParams(temperature=0.7, top_k=20, max_tokens=10, seed=3, sampling_logprobs=True, ignore_eos=True),
        SamplingParams(temperature=1.3, max_tokens=10, seed=4, sampling_logprobs=True, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=10, seed=5, sampling_logprobs=True, logprobs=2,
                       ignore_eos=True),
    ]
    prompt_ids = llm.engine.prompt_ids(PROMPTS[0])
    for params in cases:
        out = llm.generate([prompt_ids], params)[0].outputs[0]
        ids = torch.tensor([prompt_ids + out.token_ids])
        with torch.no_grad():
            logits = hf(ids).logits[0, len(prompt_ids) - 1 : -1].float()
        s = logits / params.temperature
        if params.top_k:
            kth = s.topk(params.top_k, dim=-1).values[:, -1:]
            s = s.masked_fill(s < kth, -math.inf)
        want = torch.log_softmax(s, dim=-1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        assert len(out.sampling_logprobs) == len(out.token_ids)
        assert torch.allclose(torch.tensor(out.sampling_logprobs), want, atol=2e-4), params
        if params.temperature != 1.0:  # differs from the raw logprobs, so the test tells them apart
            raw = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
            assert not torch.allclose(raw, want, atol=1e-3)
    greedy = llm.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=4, sampling_logprobs=True))
    assert greedy[0].outputs[0].sampling_logprobs == [0.0] * len(greedy[0].outputs[0].token_ids)
    with pytest.raises(ValueError, match="sampling_logprobs"):
        SamplingParams(sampling_logprobs=1)


def test_staging_reads_only(two_models):
    """Staging builds beside the live model: until applied, outputs do not change."""
    a, b = two_models
    llm = LLM(str(a), kv_cache_gib=0.02)
    before = _tokens(llm)
    staged = llm.engine.stage_weights(str(b))
    assert _tokens(llm) == before
    llm.engine.apply_weights(staged)
    assert _tokens(llm) == _tokens(LLM(str(b), kv_cache_gib=0.02))


def test_saved_subset_file(two_models, tmp_path):
    """A .safetensors file with only some tensors is a valid (partial) update."""
    a, b = two_models
    w = _weights(b)
    part = {k: v for k, v in w.items() if ".layers.1." in k}
    save_file(part, str(tmp_path / "part.safetensors"))
    llm = LLM(str(a), kv_cache_gib=0.02)
    llm.engine.update_weights(tmp_path / "part.safetensors")
    expected = LLM(str(a), kv_cache_gib=0.02)
    expected.engine.update_weights({k: v for k, v in w.items() if ".layers.1." in k})
    assert _tokens(llm) == _tokens(expected)
