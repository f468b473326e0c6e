"""Phi-3 and the mixture-of-experts families (Qwen2-MoE with its shared expert, Qwen3-MoE,
Mixtral) against transformers: greedy token-identical under every scheduler setting, every
expert reached, and the refusal of quantized experts (their GGUF files:
tests/models/test_gguf_phi3_moe.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from oracle import (
    SCHEDULER_SETTINGS,
    assert_greedy_matches,
    greedy_references,
    load_hf_model,
    record_routing,
)

from livelm import SamplingParams
from livelm.engine.llm import LLM

PROMPT_LENS = [1, 3, 8, 17, 48, 97, 177, 263]
# LongRoPE: transformers rotates a whole forward call with the long factors once it reaches
# past the original context (64 here), earlier positions included; livelm rotates each
# position by its own place (models/rope.py). They agree on prompts within the original
# context decoded past it, which these are (8 prompts x 24 new tokens still preempt).
LONGROPE_PROMPT_LENS = [1, 3, 8, 17, 33, 48, 55, 63]
NEW_TOKENS = 24

# Phi-3 with LongRoPE (short/long factors, Phi-3.5 style) and Phi-4-mini's partial rotary;
# the original context (64) is inside the prompts' range, so both factor sets are used.
_PHI3 = dict(
    max_position_embeddings=1024,
    original_max_position_embeddings=64,
    partial_rotary_factor=0.75,
    rope_scaling={
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.05 * i for i in range(6)],
        "long_factor": [1.5 + 0.5 * i for i in range(6)],
    },
    head_dim=16,
)
MODELS = {
    "phi3": ("phi3", _PHI3),
    "phi3_plain": ("phi3", {}),
    # layer 1 dense (mlp_only_layers): Qwen2-MoE's mixed stacks
    "qwen2_moe": ("qwen2_moe", {"mlp_only_layers": [1], "num_hidden_layers": 3}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe_unnormalized": ("qwen3_moe", {"norm_topk_prob": False}),
    "mixtral": ("mixtral", {}),
}
MOE = ["qwen2_moe", "qwen3_moe", "qwen3_moe_unnormalized", "mixtral"]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, tuple[Path, list[list[int]], list[list[int]]]]:
    """Per model: (dir, prompts, transformers' greedy continuations)."""
    return greedy_references(tmp_path_factory.mktemp("arch_models"), MODELS,
                             lambda o: LONGROPE_PROMPT_LENS if "rope_scaling" in o else PROMPT_LENS, NEW_TOKENS)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("setting", list(SCHEDULER_SETTINGS))
def test_greedy_matches_transformers(references, name: str, setting: str) -> None:
    d, prompts, expected = references[name]
    short = name == "phi3" and setting == "preemption"  # short prompts need a smaller pool
    assert_greedy_matches(d, prompts, expected, setting, **({"num_kv_blocks": 12} if short else {}))


@pytest.mark.parametrize("name", MOE)
def test_every_expert_reached(references, name: str, monkeypatch) -> None:
    seen = record_routing(monkeypatch)
    d, prompts, expected = references[name]
    llm = LLM(str(d))
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    num_experts = llm.engine.model_config.moe.num_experts
    assert set(torch.cat([s.flatten() for s in seen]).tolist()) == set(range(num_experts))


@pytest.mark.parametrize("quantization", ["q8_0", "int8"])
def test_quantized_experts_refused(references, quantization: str) -> None:
    d = references["qwen3_moe"][0]
    with pytest.raises(ValueError, match=rf"quantization='{quantization}'.*mixture-of-experts.*'none'"):
        LLM(str(d), quantization=quantization)


def test_moe_logprobs_match_transformers(references) -> None:
    from oracle import hf_logprobs

    d, prompts, expected = references["qwen2_moe"]
    hf = load_hf_model(d)
    llm = LLM(str(d))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    out = llm.generate([prompts[5]], params, use_tqdm=False)[0].outputs[0]
    ref = hf_logprobs(hf, prompts[5] + out.token_ids)
    for j, (tok, pos) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert abs(pos[tok].logprob - float(ref[len(prompts[5]) - 1 + j, tok])) < 1e-3
