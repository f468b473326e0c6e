"""GGUF files of Phi-3 (LongRoPE with partial rotary; F32, Q8_0 and a K-quant mix) and of
the mixture-of-experts families (Qwen2-MoE with its shared expert and a dense layer,
Qwen3-MoE, Mixtral as a ``llama`` file with expert tensors; float types, and Q8_0 /
K-quant files whose experts are dequantized at load), written here as llama.cpp's
converter writes them: configs equal the originals, greedy token-identical to transformers
(on the original model, or on gguf-py's dequantization of the file's blocks) under the
default and chunked-prefill scheduler settings, every expert reached, refusals named."""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import gguf
import pytest
import torch
from oracle import (
    SCHEDULER_SETTINGS,
    assert_greedy_matches,
    hf_greedy,
    load_hf_model,
    random_prompts,
    record_routing,
)
from test_gguf import assert_tp2_equals_tp1, dequantized_copy, write_gguf
from tiny_models import TOKENIZER_VOCAB, build_tiny_model

from livelm import SamplingParams
from livelm.engine.llm import LLM
from livelm.layers.quantized import QuantEmbedding, QuantLinear
from livelm.models.gguf_convert import convert_gguf_to_hf
from livelm.models.loader import load_model

Q = gguf.GGMLQuantizationType
PROMPT_LENS = [1, 3, 8, 17, 48, 97, 177, 263]
# Within Phi-3's original context (64), decoded past it: see tests/models/test_moe_phi3.py
# for why LongRoPE prompts stay inside it.
LONGROPE_PROMPT_LENS = [1, 3, 8, 17, 33, 48, 55, 63]
NEW_TOKENS = 24


def _longrope(pairs: int) -> dict:
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(pairs)],
            "long_factor": [1.5 + 0.5 * i for i in range(pairs)]}


# Phi-3.5-style LongRoPE on Phi-4-mini's partial rotary (0.75 of head_dim 16: 6 pairs).
_PHI3 = dict(max_position_embeddings=1024, original_max_position_embeddings=64, partial_rotary_factor=0.75,
             rope_scaling=_longrope(6), head_dim=16)
# K-quants need rows of whole 256-weight blocks: hidden 256, intermediate 512 (head_dim 64).
_PHI3_K = dict(_PHI3, hidden_size=256, intermediate_size=512, head_dim=64, rope_scaling=_longrope(24))
# Q8_0 experts need 32-wide rows: experts 64 wide (the default tiny ones are 48).
_QWEN2_MOE = {"mlp_only_layers": [1], "num_hidden_layers": 3}
# A Q4_K_M-like MoE mix: 256-wide rows everywhere (experts 256 wide, hidden 256).
_MIXTRAL_K = dict(hidden_size=256, moe_intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def _mix(types: dict[str, Q | tuple[Q, ...]]):
    def type_of(gguf_name: str) -> Q:
        parts = gguf_name.split(".")
        t = types.get(parts[2] if parts[0] == "blk" else parts[0], Q.F32)
        return t[int(parts[1]) % len(t)] if isinstance(t, tuple) else t
    return type_of


_PHI3_MIX = {"attn_qkv": Q.Q6_K, "attn_output": Q.Q5_K, "ffn_up": Q.Q4_K, "ffn_down": (Q.Q6_K, Q.Q5_0),
             "token_embd": Q.Q4_K, "output": Q.Q6_K}
_MIXTRAL_MIX = {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_K,
                "ffn_gate_exps": Q.Q4_K, "ffn_up_exps": Q.Q4_K, "ffn_down_exps": (Q.Q6_K, Q.Q5_K),
                "token_embd": Q.Q8_0, "output": Q.Q6_K}

# name -> (transformers arch, config overrides, GGUF type(s), prompt lengths)
MODELS: dict[str, tuple[str, dict, object, list[int]]] = {
    "phi3_f32": ("phi3", _PHI3, Q.F32, LONGROPE_PROMPT_LENS),
    "phi3_q8_0": ("phi3", _PHI3, Q.Q8_0, LONGROPE_PROMPT_LENS),
    "phi3_k_mix": ("phi3", _PHI3_K, _mix(_PHI3_MIX), LONGROPE_PROMPT_LENS),
    "phi3_plain_f16": ("phi3", {"sliding_window": 48}, Q.F16, PROMPT_LENS),
    "qwen2_moe_f32": ("qwen2_moe", _QWEN2_MOE, Q.F32, PROMPT_LENS),
    "qwen2_moe_q8_0": ("qwen2_moe", dict(_QWEN2_MOE, moe_intermediate_size=64), Q.Q8_0, PROMPT_LENS),
    "qwen3_moe_bf16": ("qwen3_moe", {}, Q.BF16, PROMPT_LENS),
    "qwen3_moe_unnormalized_f32": ("qwen3_moe", {"norm_topk_prob": False}, Q.F32, PROMPT_LENS),
    "mixtral_f16": ("mixtral", {}, Q.F16, PROMPT_LENS),
    "mixtral_k_mix": ("mixtral", _MIXTRAL_K, _mix(_MIXTRAL_MIX), PROMPT_LENS),
}
FLOAT = [n for n in MODELS if n.endswith(("f32", "f16", "bf16"))]
MOE = [n for n in MODELS if MODELS[n][0] != "phi3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path, Path, list[list[int]], list[list[int]]]]:
    """Per model: (original HF dir, converted dir, the oracle's HF dir: the file's values,
    prompts, transformers' greedy continuations on the oracle's dir)."""
    root = tmp_path_factory.mktemp("phi3_moe_gguf")
    out = {}
    for name, (arch, overrides, qtype, lens) in MODELS.items():
        hf_dir = build_tiny_model(root / name, arch, **overrides)
        gguf_file = write_gguf(hf_dir, root / f"{name}.gguf", qtype)
        converted = convert_gguf_to_hf(gguf_file, root / f"{name}-hf")
        oracle_dir = hf_dir if qtype == Q.F32 else dequantized_copy(hf_dir, root / f"{name}-values", qtype)
        rng = random.Random(7)
        prompts = [[rng.randrange(3, TOKENIZER_VOCAB) for _ in range(n)] for n in lens]
        hf = load_hf_model(oracle_dir)
        out[name] = (hf_dir, converted, oracle_dir, prompts, [hf_greedy(hf, p, NEW_TOKENS) for p in prompts])
    return out


_CONFIG_KEYS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "rope_parameters", "sliding_window",
    "partial_rotary_factor", "original_max_position_embeddings", "num_experts", "num_local_experts",
    "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
    "mlp_only_layers", "decoder_sparse_step",
)  # fmt: skip


@pytest.mark.parametrize("name", FLOAT)
def test_config_and_logits_match(models, name: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir, converted, oracle_dir, _, _ = models[name]
    ref, got = AutoConfig.from_pretrained(hf_dir), AutoConfig.from_pretrained(converted)
    for key in _CONFIG_KEYS:
        assert getattr(got, key, None) == getattr(ref, key, None), key
    # A config may name head_dim or leave it to hidden_size / heads (the file cannot tell).
    head_dim = [getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads for c in (got, ref)]
    assert head_dim[0] == head_dim[1]
    if MODELS[name][0] == "phi3" and "rope_scaling" in MODELS[name][1]:
        assert got.rope_parameters["rope_type"] == "longrope"  # read back from the factor tensors
    # transformers itself loads the converted directory (per-expert tensors, fused Phi-3
    # projections) to the same logits as the file's values.
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(oracle_dir).eval()(ids).logits
        have = AutoModelForCausalLM.from_pretrained(converted).eval()(ids).logits
    torch.testing.assert_close(have, want, rtol=0, atol=1e-6)


# Every model under the default and chunked-prefill settings; one Phi-3 and one MoE file
# under the correctness suite's other settings too.
_GREEDY_CASES = [(n, s) for n in MODELS for s in ("default", "chunked_prefill")]
_GREEDY_CASES += [(n, s) for n in ("phi3_f32", "qwen2_moe_q8_0") for s in SCHEDULER_SETTINGS
                  if s not in ("default", "chunked_prefill")]


@pytest.mark.parametrize(("name", "setting"), _GREEDY_CASES)
def test_greedy_matches_transformers(models, name: str, setting: str) -> None:
    _, converted, _, prompts, expected = models[name]
    short = MODELS[name][3] is LONGROPE_PROMPT_LENS and setting == "preemption"  # short prompts: a smaller pool
    assert_greedy_matches(converted, prompts, expected, setting, **({"num_kv_blocks": 12} if short else {}))


@pytest.mark.parametrize("name", MOE)
def test_every_expert_reached(models, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_routing(monkeypatch)
    _, converted, _, prompts, expected = models[name]
    llm = LLM(str(converted))
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    num_experts = llm.engine.model_config.moe.num_experts
    assert set(torch.cat([s.flatten() for s in seen]).tolist()) == set(range(num_experts))


@pytest.mark.parametrize("name", ["phi3_q8_0", "phi3_k_mix"])
def test_phi3_quantized_tensors_kept(models, name: str) -> None:
    _, converted, _, _, _ = models[name]
    qtype = MODELS[name][2]
    fmt = (lambda n: (qtype(n) if callable(qtype) else qtype).name.lower())  # noqa: E731
    model = load_model(converted, torch.float32, torch.device("cpu"), 256)
    assert isinstance(model.embed_tokens, QuantEmbedding) and model.embed_tokens.fmt == fmt("token_embd.weight")
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.fmt == fmt("output.weight")
    for i, layer in enumerate(model.layers):
        # attn_qkv and Phi-3's gate|up ffn_up are one tensor each: one kernel, the file's format
        assert isinstance(layer.self_attn.qkv_proj, QuantLinear)
        assert layer.self_attn.qkv_proj.fmt == fmt(f"blk.{i}.attn_qkv.weight")
        assert layer.mlp.gate_up_proj.fmt == fmt(f"blk.{i}.ffn_up.weight")
        assert layer.mlp.down_proj.fmt == fmt(f"blk.{i}.ffn_down.weight")


@pytest.mark.parametrize("name", ["qwen2_moe_q8_0", "mixtral_k_mix"])
def test_moe_quantized_file(models, name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Attention, embedding and head stay in the file's formats; the experts (float-only in
    livelm) are kept quantized in the converted file and dequantized at load, with a warning."""
    hf_dir, converted, oracle_dir, _, _ = models[name]
    qtype = MODELS[name][2]
    fmt = (lambda n: (qtype(n) if callable(qtype) else qtype).name.lower())  # noqa: E731
    path = write_gguf(hf_dir, tmp_path / "m.gguf", qtype)
    with caplog.at_level(logging.WARNING, logger="livelm"):
        convert_gguf_to_hf(path, tmp_path / "out")
    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors if t.name.endswith("_exps.weight"))
    listed = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    assert f"expert tensors stored quantized ({listed})" in caplog.text
    model = load_model(converted, torch.float32, torch.device("cpu"), 256)
    assert model.embed_tokens.fmt == fmt("token_embd.weight") and model.lm_head.fmt == fmt("output.weight")
    from safetensors.torch import load_file

    values = load_file(oracle_dir / "model.safetensors")
    for i, layer in enumerate(model.layers):
        assert layer.self_attn.o_proj.fmt == fmt(f"blk.{i}.attn_output.weight")
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        assert experts.gate_up_proj.dtype == torch.float32  # dequantized at load
        prefix = f"model.layers.{i}.block_sparse_moe.experts" if "mixtral" in name else f"model.layers.{i}.mlp.experts"
        down = "w2" if "mixtral" in name else "down_proj"
        e = experts.num_experts - 1
        h = experts.hidden_size
        assert torch.equal(experts.down_proj[e * h:(e + 1) * h], values[f"{prefix}.{e}.{down}.weight"])


def test_phi3_attention_factor_kept_when_not_derived(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The file's LongRoPE attention factor differs from the one transformers derives from the
    # two lengths: the config must carry it (else every rotated position would be off).
    real = gguf.GGUFWriter.add_rope_scaling_attn_factors
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_scaling_attn_factors", lambda self, v: real(self, 1.25))
    out = convert_gguf_to_hf(write_gguf(models["phi3_f32"][0], tmp_path / "m.gguf"), tmp_path / "out")
    from transformers import AutoConfig

    got = AutoConfig.from_pretrained(out).rope_parameters
    assert got["attention_factor"] == 1.25 and got["rope_type"] == "longrope"
    assert "attention_factor" not in AutoConfig.from_pretrained(models["phi3_f32"][1]).rope_parameters


def test_missing_tensor_and_key_are_named(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_dir = models["qwen2_moe_f32"][0]
    path = write_gguf(hf_dir, tmp_path / "no_experts.gguf", drop=("blk.2.ffn_up_exps.weight",))
    with pytest.raises(ValueError, match=r"qwen2moe model lacks tensor 'blk\.2\.ffn_up_exps\.weight'"):
        convert_gguf_to_hf(path, tmp_path / "out")
    path = write_gguf(models["phi3_f32"][0], tmp_path / "no_qkv.gguf", drop=("blk.1.attn_qkv.weight",))
    with pytest.raises(ValueError, match=r"phi3 model lacks tensor 'blk\.1\.attn_qkv\.weight'"):
        convert_gguf_to_hf(path, tmp_path / "out")
    path = write_gguf(models["phi3_f32"][0], tmp_path / "half_longrope.gguf", drop=("rope_factors_short.weight",))
    with pytest.raises(ValueError, match=r"'rope_factors_long\.weight' but lacks tensor 'rope_factors_short\.weight'"):
        convert_gguf_to_hf(path, tmp_path / "out")
    monkeypatch.setattr(gguf.GGUFWriter, "add_expert_used_count", lambda self, n: None)
    path = write_gguf(models["mixtral_f16"][0], tmp_path / "no_used_count.gguf")
    with pytest.raises(ValueError, match=r"mixtral model lacks metadata key 'llama\.expert_used_count'"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensor_parallel_quantized_moe_file(tmp_path: Path) -> None:
    """A Q8_0 Qwen2-MoE file (shared expert, a dense layer) under TP=2: each rank keeps its
    rows of the file's Q8_0 embedding and head, its block-aligned share of the quantized
    shared expert and dense MLP, its share of the (dequantized) experts; greedy as TP=1."""
    from livelm.layers.tensor_parallel import VocabParallelEmbedding

    hf_dir = build_tiny_model(tmp_path / "hf", "qwen2_moe", **dict(_QWEN2_MOE, moe_intermediate_size=64))
    converted = convert_gguf_to_hf(write_gguf(hf_dir, tmp_path / "m.gguf", Q.Q8_0), tmp_path / "out")

    def check(llm) -> None:  # noqa: ANN001
        model, vocab = llm.engine.runner.model, llm.engine.model_config.vocab_size
        assert isinstance(model.embed_tokens, VocabParallelEmbedding)
        table = model.embed_tokens.inner
        assert isinstance(table, QuantEmbedding) and table.fmt == "q8_0" and table.out_features == vocab // 2
        shared = model.layers[0].mlp.inner.shared_expert
        assert isinstance(shared.down_proj, QuantLinear) and shared.down_proj.in_features == 32
        assert model.layers[0].mlp.inner.experts.down_proj.shape[1] == 32

    assert_tp2_equals_tp1(converted, random_prompts([1, 9, 40, 120], seed=3), NEW_TOKENS, check)
