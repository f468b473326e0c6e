"""KV cache dtypes (issue 21): a bfloat16 or float16 cache against the float32 one, on
every tiny architecture and scheduler setting, both attention backends (the C++ kernels
read a bfloat16 cache in place; float16 runs on the torch path).

Stated tolerance: greedy tokens identical to the float32 cache's on these prompts (that is
what was measured: 16 prompts x 32 tokens x 3 architectures), and the log-probability of
every sampled token within 2e-2 (bfloat16, 8 mantissa bits) or 2e-3 (float16) of the
float32 cache's. Prefix-cache hits and preemption read the rounded cache like any step."""

from __future__ import annotations

import random

import pytest
import torch

from livelm import SamplingParams
from livelm.config import EngineConfig
from livelm.engine.llm import LLM

ARCHS = ["llama", "qwen2", "qwen3"]
PROMPT_LENS = [1, 2, 5, 8, 13, 17, 31, 48, 64, 97, 130, 177, 220, 263, 300, 16]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=0)
TOLERANCE = {"bfloat16": 2e-2, "float16": 2e-3}
SETTINGS = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 64},
    "tiny_budget": {"max_num_batched_tokens": 7, "max_num_seqs": 5},
    "preemption": {"num_kv_blocks": 30, "max_num_batched_tokens": 256},
    "torch_attention": {"max_num_batched_tokens": 64, "attention_backend": "torch"},
}


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def fp32_outputs(tiny_model_dirs):
    """The float32 cache's greedy outputs per architecture (the baseline)."""
    return {arch: LLM(str(tiny_model_dirs[arch])).generate(_prompts(), GREEDY, use_tqdm=False) for arch in ARCHS}


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_compact_caches_agree_with_float32(tiny_model_dirs, fp32_outputs, arch, setting, kv_dtype):
    llm = LLM(str(tiny_model_dirs[arch]), kv_cache_dtype=kv_dtype, **SETTINGS[setting])
    runner = llm.engine.runner
    assert runner.kv_caches[0][0].dtype == getattr(torch, kv_dtype)
    expected_backend = "cpu" if kv_dtype == "bfloat16" and setting != "torch_attention" else "torch"
    if expected_backend == "cpu" and runner.attn_backend.name != "cpu":
        pytest.skip("no C++ compiler here: the torch path runs these settings")
    assert runner.attn_backend.name == expected_backend
    outputs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    for got, want in zip(outputs, fp32_outputs[arch], strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for tok, lp, ref in zip(got.outputs[0].token_ids, got.outputs[0].logprobs, want.outputs[0].logprobs,
                                strict=True):
            assert abs(lp[tok].logprob - ref[tok].logprob) < TOLERANCE[kv_dtype]
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0


def test_a_prefix_hit_reads_the_same_rounded_kv(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_dtype="bfloat16")
    prompt = _prompts(1)[13]  # 220 tokens: 13 full blocks to reuse
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    second = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert llm.engine.stats().prefix_cache_hit_tokens >= 208
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_the_cache_takes_half_the_memory_per_token(llama_dir):
    full = LLM(str(llama_dir), num_kv_blocks=32)
    half = LLM(str(llama_dir), num_kv_blocks=32, kv_cache_dtype="bfloat16")
    assert half.engine.kv_block_bytes * 2 == full.engine.kv_block_bytes
    assert half.engine.runner.kv_cache.nbytes * 2 == full.engine.runner.kv_cache.nbytes
    # The default pool holds twice the tokens in the same memory.
    cfg = dict(max_model_len=256, max_num_seqs=4, kv_cache_gib=full.engine.kv_block_bytes * 8 / 2**30)
    assert LLM(str(llama_dir), kv_cache_dtype="bfloat16", **cfg).engine.stats().num_total_blocks == 16
    assert LLM(str(llama_dir), **cfg).engine.stats().num_total_blocks == 8


@pytest.mark.parametrize("bad", ["fp8", "int8", "", "BFLOAT16", None, 16])
def test_unknown_kv_cache_dtypes_are_refused(bad):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16, float16"):
        EngineConfig(kv_cache_dtype=bad)


def test_the_cpu_backend_refuses_a_float16_cache(llama_dir):
    with pytest.raises(ValueError, match="float32 or bfloat16 KV cache"):
        LLM(str(llama_dir), kv_cache_dtype="float16", attention_backend="cpu")


def test_the_flags_reach_the_engine():
    from livelm.entrypoints.cli import _engine_kwargs, build_parser
    from livelm.entrypoints.openai.api_server import engine_kwargs_from_args

    parser = build_parser()
    serve = parser.parse_args(["serve", "--kv-cache-dtype", "bfloat16"])
    assert engine_kwargs_from_args(serve)["kv_cache_dtype"] == "bfloat16"
    assert "kv_cache_dtype" not in engine_kwargs_from_args(parser.parse_args(["serve"]))  # engine default
    generate = parser.parse_args(["generate", "hi", "--kv-cache-dtype", "float16"])
    assert _engine_kwargs(generate)["kv_cache_dtype"] == "float16"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--kv-cache-dtype", "fp8"])
