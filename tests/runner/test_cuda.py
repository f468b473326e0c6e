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
