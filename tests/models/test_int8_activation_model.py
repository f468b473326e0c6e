"""int8 activations end to end (``activation_quantization="int8"``): which layers take them,
how close the model stays to fp32 activations on the same quantized weights, and the
option's errors.

Stated agreement, measured on these prompts (16 prompts x 32 greedy tokens, the tiny
random models, every scheduler setting the correctness suite uses): see AGREEMENT below.
The figure is a measurement, not an identity: rounding x to 8 bits per 32-block moves
logits by ~1e-2 of their range, which flips near-ties of a random model's argmax; the
accuracy bound that counts is the default model's perplexity (benchmarks/perplexity.py,
docs/quantization.md)."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from quant_oracle import livelm_logits

from livelm import SamplingParams
from livelm.config import EngineConfig
from livelm.engine.llm import LLM
from livelm.layers.quantized import QuantLinear
from livelm.models.loader import load_model

# Llama only: the tiny random Qwen2/Qwen3 models put probability ~1 on one token at every
# step, so their greedy agreement (512/512, logprob differences 0) says nothing.
ARCHS = ["llama"]
PROMPT_LENS = [1, 2, 5, 8, 13, 17, 31, 48, 64, 97, 130, 177, 220, 263, 300, 16]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=0)
SETTINGS = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 64},
    "tiny_budget": {"max_num_batched_tokens": 7, "max_num_seqs": 5},
    "preemption": {"num_kv_blocks": 30, "max_num_batched_tokens": 256},
}
# Per weight format: the least fraction of greedy tokens equal to fp32 activations' (up to
# each sequence's first divergence), and the largest log-probability difference of an
# agreeing token. Measured on every setting (AVX512-VNNI build): q8_0
# 481/512 tokens (0.94; logprob difference at most 0.015), q4_0 435/512 (0.85; 0.013),
# q4_1 395-422/512 (0.77-0.82; 0.018). The bounds leave some margin.
AGREEMENT = {"q8_0": (0.85, 0.05), "q4_0": (0.75, 0.05), "q4_1": (0.7, 0.05)}
CPU = torch.device("cpu")


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(n)] for n in PROMPT_LENS]


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_every_linear_layer_takes_int8_activations_and_stays_close(tiny_model_dirs, fmt):
    """Teacher-forced logits through the prefill (GEMM) and the one-token (row) kernels,
    within 5% of the logits' range of the fp32-activation model's on the same weights."""
    src = tiny_model_dirs["llama"]
    fp32 = load_model(src, torch.float32, CPU, 256, quantization=fmt)
    int8 = load_model(src, torch.float32, CPU, 256, quantization=fmt, activation_quantization="int8")
    linears = [m for m in int8.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.int8_activations for m in linears)
    assert not any(m.int8_activations for m in fp32.modules() if isinstance(m, QuantLinear))
    ids = list(range(3, 70, 3))
    for one_at_a_time in (False, True):
        want = livelm_logits(fp32, ids, one_token_at_a_time=one_at_a_time)
        got = livelm_logits(int8, ids, one_token_at_a_time=one_at_a_time)
        spread = float(want.amax(-1).sub(want.amin(-1)).min())
        assert float((got - want).abs().max()) < 0.05 * spread, one_at_a_time
        assert not torch.equal(got, want)  # the activations really were rounded


@pytest.fixture(scope="module")
def fp32_activation_outputs(tiny_model_dirs):
    """Greedy outputs with fp32 activations, per architecture and weight format."""
    return {(arch, fmt): LLM(str(tiny_model_dirs[arch]), quantization=fmt).generate(_prompts(), GREEDY,
                                                                                     use_tqdm=False)
            for arch in ARCHS for fmt in AGREEMENT}


@pytest.mark.parametrize("fmt", list(AGREEMENT))
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_agreement_with_fp32_activations(tiny_model_dirs, fp32_activation_outputs, arch, setting, fmt):
    llm = LLM(str(tiny_model_dirs[arch]), quantization=fmt, activation_quantization="int8", **SETTINGS[setting])
    outputs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    agreeing = total = 0
    worst = 0.0
    for got, want in zip(outputs, fp32_activation_outputs[(arch, fmt)], strict=True):
        toks, ref = got.outputs[0].token_ids, want.outputs[0].token_ids
        assert len(toks) == len(ref) == GREEDY.max_tokens
        same = next((i for i, (a, b) in enumerate(zip(toks, ref, strict=True)) if a != b), len(toks))
        agreeing, total = agreeing + same, total + len(toks)
        for i in range(same):
            t = toks[i]
            worst = max(worst, abs(got.outputs[0].logprobs[i][t].logprob - want.outputs[0].logprobs[i][t].logprob))
    least, tolerance = AGREEMENT[fmt]
    print(f"{arch} {setting} {fmt}: {agreeing}/{total} greedy tokens agree, logprob diff <= {worst:.4f}")
    assert agreeing / total >= least
    assert worst < tolerance
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0


def test_formats_without_int8_kernels_keep_fp32_activations(tiny_model_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="livelm"):
        model = load_model(tiny_model_dirs["llama"], torch.float32, CPU, 256, quantization="q5_0",
                           activation_quantization="int8")
    assert not any(m.int8_activations for m in model.modules() if isinstance(m, QuantLinear))
    assert "keep fp32 activations (q5_0 weights have no int8 kernel" in caplog.text
    assert "has no effect: no linear layer holds q8_0/q4_0/q4_1 weights" in caplog.text


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="unknown activation_quantization 'int4'; choose one of none, int8"):
        EngineConfig(activation_quantization="int4")
    with pytest.raises(ValueError, match="runs on CPU kernels only"):
        EngineConfig(activation_quantization="int8", device="cuda")
    with pytest.raises(ValueError, match="runs on CPU kernels only, not on meta"):
        load_model("unused", torch.float32, torch.device("meta"), 16, activation_quantization="int8")


def test_the_flags_reach_the_engine():
    from livelm.entrypoints.cli import _engine_kwargs, build_parser
    from livelm.entrypoints.openai.api_server import engine_kwargs_from_args

    parser = build_parser()
    assert engine_kwargs_from_args(parser.parse_args(["serve", "--activation-quantization", "int8"])) == {
        "activation_quantization": "int8"} | engine_kwargs_from_args(parser.parse_args(["serve"]))
    assert "activation_quantization" not in engine_kwargs_from_args(parser.parse_args(["serve"]))
    generate = parser.parse_args(["generate", "hi", "--activation-quantization", "int8"])
    assert _engine_kwargs(generate)["activation_quantization"] == "int8"
    assert _engine_kwargs(parser.parse_args(["generate", "hi"]))["activation_quantization"] == "none"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--activation-quantization", "int4"])
