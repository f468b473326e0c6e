"""Gemma, Gemma 2 and Gemma 3 (text) against transformers: greedy token-identical under every
scheduler setting with prompts longer than the sliding window; the features that set Gemma
apart are all exercised (soft caps that change the output, its own scale and rotary per
layer type); its config fields read as transformers reads them, and refused where livelm
would run them wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from oracle import (
    SCHEDULER_SETTINGS,
    assert_greedy_matches,
    greedy_references,
    hf_logprobs,
    load_hf_model,
)

from livelm import SamplingParams
from livelm.engine.llm import LLM
from livelm.models.model_config import ModelConfig

# Up to 263 tokens: far past the sliding window (24) of the tiny models' sliding layers.
PROMPT_LENS = [1, 3, 8, 17, 48, 97, 177, 263]
NEW_TOKENS = 24
MODELS = {
    # Gemma (1): a Llama with 1 + weight norms, GeGLU ("gelu" in its config) and scaled embeddings.
    "gemma": ("gemma", {}),
    # Layers alternate sliding (window 24) and global, scores and logits soft-capped.
    "gemma2": ("gemma2", {"num_hidden_layers": 4}),
    # Sliding, global, sliding; q/k norms; theta 10k on sliding layers, 1M on global ones.
    "gemma3": ("gemma3", {"num_hidden_layers": 3}),
    # Tied embeddings and head, as the released models have them.
    "gemma3_tied": ("gemma3", {"num_hidden_layers": 3, "tie_word_embeddings": True}),
    # Gemma 3 4B+ checkpoints: the text model under language_model.*, a vision tower beside.
    "gemma3_multimodal": ("gemma3_multimodal", {"num_hidden_layers": 3}),
    # Gemma 3 4B-style: linear RoPE scaling (factor 8) on the global layers only.
    "gemma3_scaled": ("gemma3", {
        "num_hidden_layers": 3,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    }),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, tuple[Path, list[list[int]], list[list[int]]]]:
    """Per model: (dir, prompts, transformers' greedy continuations)."""
    return greedy_references(tmp_path_factory.mktemp("gemma_models"), MODELS, PROMPT_LENS, NEW_TOKENS)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("setting", list(SCHEDULER_SETTINGS))
def test_greedy_matches_transformers(references, name: str, setting: str) -> None:
    d, prompts, expected = references[name]
    assert_greedy_matches(d, prompts, expected, setting)


def test_config_reads_what_sets_gemma_apart(references) -> None:
    cfg1 = ModelConfig.from_dir(references["gemma"][0])
    assert (cfg1.activation, cfg1.norm_offset, cfg1.sandwich_norms) == ("gelu_tanh", 1.0, False)
    assert cfg1.embedding_scale == pytest.approx(64**0.5) and cfg1.sliding_windows == ()
    assert cfg1.attention_scale == pytest.approx(16**-0.5)
    cfg2 = ModelConfig.from_dir(references["gemma2"][0])
    assert cfg2.activation == "gelu_tanh" and cfg2.norm_offset == 1.0 and cfg2.sandwich_norms
    assert cfg2.embedding_scale == pytest.approx(64**0.5)
    assert cfg2.attention_scale == pytest.approx(24**-0.5)  # query_pre_attn_scalar, not head_dim 16
    assert (cfg2.attn_softcap, cfg2.final_softcap) == (1.5, 4.0)
    assert cfg2.sliding_windows == (24, None, 24, None)
    assert cfg2.local_rope is None
    cfg3 = ModelConfig.from_dir(references["gemma3_scaled"][0])
    assert cfg3.qk_norm and cfg3.attn_softcap is None and cfg3.final_softcap is None
    assert cfg3.sliding_windows == (24, None, 24)
    assert (cfg3.rope.rope_type, cfg3.rope.factor, cfg3.rope.theta) == ("linear", 8.0, 1_000_000.0)
    assert cfg3.local_rope is not None
    assert (cfg3.local_rope.rope_type, cfg3.local_rope.theta) == ("default", 10_000.0)
    assert cfg3.rope_of(0) is cfg3.local_rope and cfg3.rope_of(1) is cfg3.rope


def _without(model_dir: Path, out: Path, **changes) -> Path:
    """A copy of a model directory with config.json fields changed."""
    out.mkdir()
    for f in model_dir.iterdir():
        (out / f.name).symlink_to(f)
    (out / "config.json").unlink()
    raw = json.loads((model_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**raw, **changes}))
    return out


def test_soft_caps_change_the_tiny_model(references, tmp_path) -> None:
    """The oracle tests here mean something for soft-capping only if the tiny model's caps
    bite: without either cap, transformers' own log-probabilities move by more than 0.05
    (the final cap is monotonic, so only log-probabilities can show it), and without the
    attention cap some greedy argmax changes."""
    d, prompts, _ = references["gemma2"]
    ids = prompts[-1]
    capped = hf_logprobs(load_hf_model(d), ids)
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        uncapped = hf_logprobs(load_hf_model(_without(d, tmp_path / field, **{field: None})), ids)
        assert (uncapped - capped).abs().max() > 0.05, field
        if field == "attn_logit_softcapping":
            assert (uncapped.argmax(-1) != capped.argmax(-1)).any()


def test_prompt_logprobs_match_transformers(references) -> None:
    """Teacher-forced log-probabilities at every prompt position (soft-capped logits, the
    windowed and global layers over 263 tokens) equal transformers'."""
    for name in ("gemma2", "gemma3"):
        d, prompts, _ = references[name]
        ids = prompts[-1]
        want = hf_logprobs(load_hf_model(d), ids)
        llm = LLM(str(d))
        out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        got = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        torch.testing.assert_close(got, want[torch.arange(len(ids) - 1), torch.tensor(ids[1:])],
                                   atol=2e-4, rtol=0)


def test_sinks_policy_refused_on_gemma(references) -> None:
    """kv_policy 'sinks' neither soft-caps nor rotates per layer type: refused, naming why,
    even where the window would not cut (a context no longer than it)."""
    d = references["gemma2"][0]
    llm = LLM(str(d), max_model_len=24, block_size=8)
    params = SamplingParams(max_tokens=2, extra={"kv_policy": "sinks", "kv_window": 16, "num_sink_tokens": 4})
    with pytest.raises(ValueError, match="soft-caps"):
        llm.generate([[5, 6, 7]], params, use_tqdm=False)


@pytest.mark.parametrize(("changes", "message"), [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"attn_logit_softcapping": -1.0}, "attn_logit_softcapping must be a positive number"),
    ({"final_logit_softcapping": "30"}, "final_logit_softcapping must be a positive number"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be a positive number"),
    ({"hidden_activation": "relu"}, "unsupported activation 'relu'"),
    ({"layer_types": ["sliding_attention"]}, "layer_types must name"),
])
def test_bad_gemma_configs_refused(references, changes: dict, message: str) -> None:
    raw = json.loads((references["gemma2"][0] / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**raw, **changes})


def test_gemma_configs_tie_unless_they_say_not(references) -> None:
    """Gemma's config classes tie embeddings and head by default, and Hub configs often
    leave the field out: read as tied."""
    for name in ("gemma", "gemma2", "gemma3"):
        raw = json.loads((references[name][0] / "config.json").read_text())
        raw.pop("tie_word_embeddings")
        assert ModelConfig.from_dict(raw).tie_word_embeddings, name


def test_multimodal_checkpoint_runs_its_text_model(references) -> None:
    """A Gemma 3 multimodal checkpoint's config is its text_config (Hub configs hold only
    the fields that differ from Gemma3TextConfig's defaults); its vision tower is skipped."""
    raw = json.loads((references["gemma3_multimodal"][0] / "config.json").read_text())
    assert raw["architectures"] == ["Gemma3ForConditionalGeneration"]
    cfg = ModelConfig.from_dict(raw)
    assert cfg.architecture == "Gemma3ForCausalLM" and cfg.num_layers == 3
    sparse = {"architectures": ["Gemma3ForConditionalGeneration"], "eos_token_id": [1, 106],
              "text_config": {"hidden_size": 2560, "num_hidden_layers": 34, "sliding_window": 1024}}
    hub = ModelConfig.from_dict(sparse)
    assert (hub.vocab_size, hub.head_dim, hub.num_heads, hub.attention_scale) == (262_208, 256, 8, 256**-0.5)
    assert hub.eos_token_ids == (1, 106) and hub.tie_word_embeddings
    assert hub.sliding_windows.count(None) == 5  # every 6th of 34 layers is global


def test_v4_style_gemma3_config() -> None:
    """A Gemma 3 config.json as the Hub holds them (transformers 4: rope_theta,
    rope_local_base_freq, rope_scaling for the global layers, sliding_window_pattern, no
    layer_types): read as transformers 5 converts it."""
    raw = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 100,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 7, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 512,
        "sliding_window_pattern": 6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "hidden_activation": "gelu_pytorch_tanh",
    }
    cfg = ModelConfig.from_dict(raw)
    assert cfg.sliding_windows == (512, 512, 512, 512, 512, None, 512)
    assert (cfg.rope.rope_type, cfg.rope.factor, cfg.rope.theta) == ("linear", 8.0, 1_000_000.0)
    assert (cfg.local_rope.rope_type, cfg.local_rope.theta) == ("default", 10_000.0)
    no_theta = ModelConfig.from_dict({k: v for k, v in raw.items() if k not in ("rope_theta", "rope_scaling")})
    assert no_theta.rope.theta == 1_000_000.0  # Gemma 3's default for its global layers
