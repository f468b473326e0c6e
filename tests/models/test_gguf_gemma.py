"""GGUF files of Gemma, Gemma 2 and Gemma 3, written here as llama.cpp's converter writes them
(norms stored as 1 + weight; soft caps, window and the sliding layers' RoPE base as keys;
the attention scale only where llama.cpp could not derive it): configs equal the
originals, greedy token-identical to transformers (on the original model, or on gguf-py's
dequantization of the file's blocks) under the correctness suite's scheduler settings."""

from __future__ import annotations

import random
from pathlib import Path

import gguf
import pytest
from oracle import (
    SCHEDULER_SETTINGS,
    assert_greedy_matches,
    hf_greedy,
    load_hf_model,
    random_prompts,
)
from test_gguf import assert_tp2_equals_tp1, dequantized_copy, write_gguf
from tiny_models import TOKENIZER_VOCAB, build_tiny_model

from livelm.models.gguf_convert import convert_gguf_to_hf
from livelm.models.model_config import ModelConfig

Q = gguf.GGMLQuantizationType
PROMPT_LENS = [1, 3, 8, 17, 48, 97, 177, 263]  # past the tiny models' window of 24
NEW_TOKENS = 24

_GEMMA2 = {"num_hidden_layers": 4}
# query_pre_attn_scalar = head_dim: the scale llama.cpp derives, so the file has no key for it.
_GEMMA3 = {"num_hidden_layers": 3, "query_pre_attn_scalar": 16, "tie_word_embeddings": True}
_GEMMA3_SCALED = {
    "num_hidden_layers": 6,  # llama.cpp's default pattern: every 6th layer global
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
}
# K-quants need rows of whole 256-weight blocks.
_GEMMA2_K = dict(_GEMMA2, hidden_size=256, intermediate_size=512, head_dim=64)


def _k_mix(gguf_name: str) -> Q:
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
    return {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_K, "ffn_gate": Q.Q4_K,
            "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q6_K}.get(kind, Q.F32)


# name -> (transformers arch, config overrides, GGUF type(s))
MODELS: dict[str, tuple[str, dict, object]] = {
    "gemma_f32": ("gemma", {}, Q.F32),
    "gemma2_f32": ("gemma2", _GEMMA2, Q.F32),
    "gemma2_q8_0": ("gemma2", _GEMMA2, Q.Q8_0),
    "gemma2_k_mix": ("gemma2", _GEMMA2_K, _k_mix),
    "gemma3_f32": ("gemma3", _GEMMA3, Q.F32),
    "gemma3_scaled_f16": ("gemma3", _GEMMA3_SCALED, Q.F16),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path, list[list[int]], list[list[int]]]]:
    """Per model: (original HF dir, converted dir, prompts, transformers' greedy
    continuations on the file's values)."""
    root = tmp_path_factory.mktemp("gemma_gguf")
    out = {}
    for name, (arch, overrides, qtype) in MODELS.items():
        hf_dir = build_tiny_model(root / name, arch, **overrides)
        gguf_file = write_gguf(hf_dir, root / f"{name}.gguf", qtype)
        converted = convert_gguf_to_hf(gguf_file, root / f"{name}-hf")
        oracle_dir = hf_dir if qtype == Q.F32 else dequantized_copy(hf_dir, root / f"{name}-values", qtype)
        rng = random.Random(5)
        prompts = [[rng.randrange(3, TOKENIZER_VOCAB) for _ in range(n)] for n in PROMPT_LENS]
        hf = load_hf_model(oracle_dir)
        out[name] = (hf_dir, converted, prompts, [hf_greedy(hf, p, NEW_TOKENS) for p in prompts])
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_config_equals_the_original(models, name: str) -> None:
    """What livelm reads from the converted config equals what it reads from the original
    (soft caps, the attention scale, which layers slide, both rotaries, the tie)."""
    hf_dir, converted, _, _ = models[name]
    assert ModelConfig.from_dir(converted) == ModelConfig.from_dir(hf_dir)


@pytest.mark.parametrize("name", ["gemma_f32", "gemma2_f32", "gemma3_f32"])
@pytest.mark.parametrize("setting", list(SCHEDULER_SETTINGS))
def test_float_files_match_transformers(models, name: str, setting: str) -> None:
    _, converted, prompts, expected = models[name]
    assert_greedy_matches(converted, prompts, expected, setting)


@pytest.mark.parametrize("name", ["gemma2_q8_0", "gemma2_k_mix", "gemma3_scaled_f16"])
@pytest.mark.parametrize("setting", ["default", "chunked_prefill"])
def test_other_files_match_transformers_on_their_values(models, name: str, setting: str) -> None:
    _, converted, prompts, expected = models[name]
    assert_greedy_matches(converted, prompts, expected, setting)


def test_norms_come_back_exactly(models) -> None:
    """1 + weight in the file, weight in the converted checkpoint: bit-exact for these
    norms (|weight| < 0.5), so the model scales by exactly transformers' 1 + weight."""
    from safetensors.torch import load_file

    hf_dir, converted, _, _ = models["gemma3_f32"]
    original, back = load_file(hf_dir / "model.safetensors"), load_file(converted / "model.safetensors")
    norms = [k for k in original if k.endswith("norm.weight")]
    assert len(norms) == 3 * 6 + 1  # four per layer, q/k norms, the final norm
    for key in norms:
        assert (1 + back[key]).equal(1 + original[key]), key


def test_the_27b_attention_scale_rule(monkeypatch) -> None:
    """Without an attention.scale key, llama.cpp scales a 46-layer Gemma 2 (27B) by
    hidden_size / heads, other sizes by the head dimension, and alternates sliding and
    global layers; livelm reads such files alike."""
    import livelm.models.gguf_families as families

    keys = {"gemma2.attention.sliding_window": 4096}
    monkeypatch.setattr(families, "field", lambda reader, key, default=None: keys.get(key, default))
    monkeypatch.setattr(families, "require", lambda reader, key, family: keys[key])
    assert families.gemma_config(None, "gemma2", 46, 4608, 32, 128)["query_pre_attn_scalar"] == 144
    assert families.gemma_config(None, "gemma2", 42, 3584, 16, 256)["query_pre_attn_scalar"] == 256
    types = families.gemma_config(None, "gemma2", 4, 64, 4, 16)["layer_types"]
    assert types == ["sliding_attention", "full_attention"] * 2


def test_tensor_parallel_q8_0_gemma3_file(tmp_path: Path) -> None:
    """A Q8_0 Gemma 3 file (tied head, scaled embeddings) under TP=2: each rank's quantized
    embedding holds half the vocabulary, its tied head reads those very blocks, the scale
    comes after the ranks' lookups are summed; greedy as TP=1."""
    from livelm.layers.quantized import QuantEmbedding

    hf_dir = build_tiny_model(tmp_path / "hf", "gemma3", **_GEMMA3)
    converted = convert_gguf_to_hf(write_gguf(hf_dir, tmp_path / "m.gguf", Q.Q8_0), tmp_path / "out")

    def check(llm) -> None:  # noqa: ANN001
        model, cfg = llm.engine.runner.model, llm.engine.model_config
        assert cfg.tie_word_embeddings and cfg.embedding_scale is not None
        table = model.embed_tokens.inner
        assert isinstance(table, QuantEmbedding) and table.fmt == "q8_0"
        assert table.out_features == cfg.vocab_size // 2 and model.lm_head.inner.qs is table.qs

    assert_tp2_equals_tp1(converted, random_prompts([1, 8, 48, 130], seed=6), NEW_TOKENS, check)
