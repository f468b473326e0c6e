"""RoPE scaling as transformers defines it (linear, dynamic NTK, llama3, YaRN, LongRoPE):
livelm's cos/sin tables equal transformers' rotary embedding bit for bit, and tiny Llama
models of each type are greedy token-identical to transformers past the original context
under every scheduler setting."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from oracle import SCHEDULER_SETTINGS, assert_greedy_matches, hf_greedy, load_hf_model
from tiny_models import TOKENIZER_VOCAB, build_tiny_model

from livelm.models.model_config import ModelConfig
from livelm.models.rope import RotaryEmbedding

ORIGINAL = 64  # the original context: every test reaches past it
SCALINGS: dict[str, dict] = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                    "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.5, "truncate": False},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": ORIGINAL,
                 "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + i for i in range(8)]},
}
# Dynamic NTK scales past max_position_embeddings itself (transformers reads no original
# length for it), so its model says 64 and the engine is allowed further.
_MAX_POSITIONS = {"dynamic": ORIGINAL}
# Prompts within the original context, decoded past it (see livelm/models/rope.py for why
# dynamic and longrope need that), and long prompts for the static types.
SHORT_LENS = [1, 5, 17, 40, 55, 63]
LONG_LENS = [70, 130, 200]
NEW_TOKENS = 40


def _config(kind: str):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=_MAX_POSITIONS.get(kind, 1024),
                       rope_scaling=dict(SCALINGS[kind]))


def _hf_rotary(config):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_tables_equal_transformers(kind: str) -> None:
    config = _config(kind)
    ours = RotaryEmbedding(16, 300, ModelConfig.from_dict({**config.to_dict(), "architectures": ["LlamaForCausalLM"]}).rope)
    hf = _hf_rotary(config)
    x = torch.zeros(1, 1, 16)
    if kind in ("dynamic", "longrope"):
        # Sequence-length dependent in transformers: prefill within the original context,
        # then one position per call, as a decode does.
        rows = [hf(x, torch.arange(ORIGINAL - 1)[None])]
        rows += [hf(x, torch.tensor([[p]])) for p in range(ORIGINAL - 1, 300)]
        cos, sin = (torch.cat([r[i][0] for r in rows]) for i in (0, 1))
    else:
        cos, sin = (t[0] for t in hf(x, torch.arange(300)[None]))
    assert torch.equal(ours.cos, cos[:, :8]) and torch.equal(cos[:, :8], cos[:, 8:])
    assert torch.equal(ours.sin, sin[:, :8])
    if kind in ("yarn", "yarn_mscale", "longrope"):
        assert not torch.equal(ours.cos[0], torch.ones(8)), "the attention factor scales cos"


def test_longrope_partial_rotary_tables() -> None:
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=1024,
                        original_max_position_embeddings=ORIGINAL, partial_rotary_factor=0.5,
                        rope_scaling={"type": "su", "original_max_position_embeddings": ORIGINAL,
                                      "short_factor": [1.0, 1.1, 1.2, 1.3],
                                      "long_factor": [2.0, 3.0, 5.0, 8.0]})
    raw = {**config.to_dict(), "architectures": ["Phi3ForCausalLM"]}
    ours = RotaryEmbedding(16, 200, ModelConfig.from_dict(raw).rope)
    hf = Phi3RotaryEmbedding(config)
    x = torch.zeros(1, 1, 16)
    rows = [hf(x, torch.arange(ORIGINAL)[None])] + [hf(x, torch.tensor([[p]])) for p in range(ORIGINAL, 200)]
    cos = torch.cat([r[0][0] for r in rows])
    assert ours.rotary_dim == 8 and torch.equal(ours.cos, cos[:, :4])


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, tuple[Path, list[list[int]], list[list[int]]]]:
    root = tmp_path_factory.mktemp("rope_models")
    rng = random.Random(3)
    refs = {}
    for kind, scaling in SCALINGS.items():
        d = build_tiny_model(root / kind, "llama", rope_scaling=dict(scaling),
                             max_position_embeddings=_MAX_POSITIONS.get(kind, 1024))
        hf = load_hf_model(d)
        lens = SHORT_LENS + ([] if kind in ("dynamic", "longrope") else LONG_LENS)
        prompts = [[rng.randrange(3, TOKENIZER_VOCAB) for _ in range(n)] for n in lens]
        refs[kind] = (d, prompts, [hf_greedy(hf, p, NEW_TOKENS) for p in prompts])
    return refs


@pytest.mark.parametrize("kind", list(SCALINGS))
@pytest.mark.parametrize("setting", list(SCHEDULER_SETTINGS))
def test_greedy_matches_transformers(references, kind: str, setting: str) -> None:
    d, prompts, expected = references[kind]
    extra: dict = {"max_model_len": 1024}
    if setting == "preemption" and kind in ("dynamic", "longrope"):
        extra["num_kv_blocks"] = 14  # shorter prompts: a smaller pool still preempts
    assert_greedy_matches(d, prompts, expected, setting, **extra)


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ({"rope_type": "ntk-by-parts", "factor": 2.0}, "unsupported rope type 'ntk-by-parts'"),
        ({"rope_type": "linear"}, "needs a 'factor'"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8},
         "short_factor has 3 entries"),
    ],
)
def test_bad_rope_config_refused(scaling: dict, message: str) -> None:
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
           "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4,
           "rope_scaling": scaling}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(raw)
