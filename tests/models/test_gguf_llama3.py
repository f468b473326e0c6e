"""Llama 3.1-3.3 GGUFs: the ``rope_freqs`` tensor (llama3 rope scaling) read back into the
config, tied-embedding (3.2-style) and untied files, greedy token-identical to transformers
on the original checkpoint under every scheduler setting."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from oracle import SCHEDULER_SETTINGS, assert_greedy_matches, hf_greedy, load_hf_model
from test_gguf import write_gguf
from tiny_models import TOKENIZER_VOCAB, build_tiny_model

from livelm.models.gguf_convert import convert_gguf_to_hf
from livelm.models.gguf_rope import llama3_scaling_from_rope_freqs

Q = gguf.GGMLQuantizationType
# head_dim 32, theta 10000: two pairs fall in the blended band of Llama 3's scaling.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
_SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)


def converter_rope_freqs(cfg: dict) -> np.ndarray:
    """rope_freqs as llama.cpp's convert_hf_to_gguf computes it (written out here, not
    taken from livelm, so a shared mistake cannot cancel out)."""
    scaling = cfg["rope_parameters"]
    base = scaling["rope_theta"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path, list[list[int]], list[list[int]]]]:
    """Per variant: (original HF dir, converted dir, prompts, transformers' greedy)."""
    root = tmp_path_factory.mktemp("llama3_gguf")
    rng = random.Random(5)
    prompts = [[rng.randrange(3, TOKENIZER_VOCAB) for _ in range(n)] for n in (1, 4, 19, 50, 120, 210)]
    out = {}
    for name, tied in (("llama3.1", False), ("llama3.2_tied", True)):
        hf_dir = build_tiny_model(root / name, "llama", tie_word_embeddings=tied, rope_scaling=dict(LLAMA3), **_SHAPE)
        cfg = json.loads((hf_dir / "config.json").read_text())
        extra = {"rope_freqs.weight": converter_rope_freqs(cfg)}
        gguf_file = write_gguf(hf_dir, root / f"{name}.gguf", Q.F32, extra)
        converted = convert_gguf_to_hf(gguf_file, root / f"{name}-hf")
        hf = load_hf_model(hf_dir)
        out[name] = (hf_dir, converted, prompts, [hf_greedy(hf, p, 24) for p in prompts])
    return out


@pytest.mark.parametrize("name", ["llama3.1", "llama3.2_tied"])
def test_config_recovers_llama3_scaling(models, name: str) -> None:
    hf_dir, converted, _, _ = models[name]
    want = json.loads((hf_dir / "config.json").read_text())
    got = json.loads((converted / "config.json").read_text())
    assert got["rope_parameters"] == want["rope_parameters"]
    assert got["tie_word_embeddings"] == want["tie_word_embeddings"]
    from safetensors import safe_open

    with safe_open(converted / "model.safetensors", "pt") as f:
        assert "rope_freqs.weight" not in f.keys()
        assert ("lm_head.weight" in f.keys()) == (not want["tie_word_embeddings"])


@pytest.mark.parametrize("name", ["llama3.1", "llama3.2_tied"])
@pytest.mark.parametrize("setting", list(SCHEDULER_SETTINGS))
def test_greedy_matches_transformers(models, name: str, setting: str) -> None:
    _, converted, prompts, expected = models[name]
    assert_greedy_matches(converted, prompts, expected, setting)


def test_real_llama31_rope_freqs_recovered() -> None:
    # Llama 3.1 8B's own values: head_dim 128, theta 500000, factor 8, band 1..4 of 8192.
    cfg = {"rope_parameters": {**LLAMA3, "rope_theta": 500000.0}, "hidden_size": 4096, "num_attention_heads": 32}
    got = llama3_scaling_from_rope_freqs(converter_rope_freqs(cfg), 500000.0, 128, None)
    assert got == {**LLAMA3}
    cfg["rope_parameters"]["factor"] = 32.0  # Llama 3.2 1B/3B
    assert llama3_scaling_from_rope_freqs(converter_rope_freqs(cfg), 500000.0, 128, None)["factor"] == 32.0


def test_rope_freqs_of_no_llama3_scaling_refused() -> None:
    divisors = np.linspace(1.0, 8.0, 16) ** 1.7  # not of the llama3 form
    with pytest.raises(ValueError, match="matches no llama3 rope scaling"):
        llama3_scaling_from_rope_freqs(divisors, 10000.0, 32, None)
    with pytest.raises(ValueError, match="has 3 entries; the model rotates 16 pairs"):
        llama3_scaling_from_rope_freqs(np.ones(3), 10000.0, 32, None)
