"""The CUDA path (torch attention, bf16/fp32): runs only where a GPU is present."""

from __future__ import annotations

import random

import pytest
import torch
from oracle import hf_greedy, load_hf_model

from livelm import SamplingParams
from livelm.engine.llm import LLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_greedy_matches_transformers_fp32(llama_dir):
    hf = load_hf_model(llama_dir)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (1, 17, 64, 200)]
    expected = [hf_greedy(hf, p, 24) for p in prompts]
    llm = LLM(str(llama_dir), device="cuda", dtype="float32", max_num_batched_tokens=64)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_cuda_bf16_default_dtype_runs_and_samples(llama_dir):
    llm = LLM(str(llama_dir), device="cuda")
    assert llm.engine.dtype == torch.bfloat16
    outs = llm.generate([[5, 6, 7]] * 4, SamplingParams(temperature=0.8, seed=1, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "fp8"])
def test_cuda_compact_kv_caches_stay_close_to_float32(llama_dir, kv_dtype):
    """fp8 (e4m3) is the CUDA KV format: same tolerances as on CPU (tests/engine/
    test_kv_cache_dtype.py): bfloat16 greedy-identical, fp8 at least half the tokens before
    the first divergences, agreeing tokens' log-probabilities within 2e-2 / 0.1."""
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (1, 5, 17, 64, 130, 200)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    base = LLM(str(llama_dir), device="cuda", dtype="float32").generate(prompts, params, use_tqdm=False)
    llm = LLM(str(llama_dir), device="cuda", dtype="float32", kv_cache_dtype=kv_dtype, max_num_batched_tokens=64)
    assert llm.engine.runner.kv_caches[0][0].dtype == {"bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[kv_dtype]
    outs = llm.generate(prompts, params, use_tqdm=False)
    tolerance = {"bfloat16": 2e-2, "fp8": 0.1}[kv_dtype]
    agreeing = total = 0
    for got, want in zip(outs, base, strict=True):
        toks, ref = got.outputs[0].token_ids, want.outputs[0].token_ids
        if kv_dtype == "bfloat16":
            assert toks == ref
        same = next((i for i, (a, b) in enumerate(zip(toks, ref, strict=True)) if a != b), len(toks))
        for i in range(same):
            assert abs(got.outputs[0].logprobs[i][toks[i]].logprob - want.outputs[0].logprobs[i][toks[i]].logprob) < tolerance
        agreeing, total = agreeing + same, total + len(toks)
    assert agreeing >= total // 2
