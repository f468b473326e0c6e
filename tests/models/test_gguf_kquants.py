"""Tiny GGUFs in llama.cpp's K-quant mixes (Q4_K / Q5_K / Q6_K / Q5_0 / Q5_1 / Q8_0, a type
per tensor as Q4_K_M files have): every tensor kept in its own format (fused q|k|v and
gate|up split by format rather than requantized), quantized embeddings and LM heads as
stored, and greedy tokens identical to transformers running gguf-py's dequantization of the
same blocks, under every scheduler setting of the correctness suite."""

from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import pytest
import torch
from oracle import SCHEDULER_SETTINGS, assert_greedy_matches, hf_greedy, load_hf_model
from safetensors.torch import load_file
from test_gguf import dequantized_copy, write_gguf
from tiny_models import TOKENIZER_VOCAB, build_tiny_model

from livelm.layers.quantized import QuantEmbedding, QuantLinear, SplitQuantLinear
from livelm.models.gguf_convert import convert_gguf_to_hf
from livelm.models.loader import Checkpoint, load_model
from livelm.quant.formats import dequantize

Q = gguf.GGMLQuantizationType
# K-quants need rows of whole 256-weight blocks: hidden 256, intermediate 512.
_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)

# GGUF tensor name (without "blk.N.") -> type; ffn_down by layer, as Q4_K_M varies it.
MIXES: dict[str, dict] = {
    # llama, untied: q/k Q4_K with a Q6_K v (q|k|v split in two formats), gate Q5_0 with up
    # Q5_1, Q5_K o, Q6_K / Q4_K down, a Q4_K embedding table and a Q6_K output head.
    "llama_q4_k_m": {"arch": "llama", "tied": False, "types": {
        "attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_K,
        "ffn_gate": Q.Q5_0, "ffn_up": Q.Q5_1, "ffn_down": (Q.Q6_K, Q.Q4_K),
        "token_embd": Q.Q4_K, "output": Q.Q6_K}},
    # qwen2 (q/k/v biases: the split's bias), tied: a Q6_K table read as embedding and head,
    # Q5_K q/k with a Q8_0 v, gate|up in one format (one fused kernel), Q5_1 / Q5_0 down.
    "qwen2_tied_q6_k": {"arch": "qwen2", "tied": True, "types": {
        "attn_q": Q.Q5_K, "attn_k": Q.Q5_K, "attn_v": Q.Q8_0, "attn_output": Q.Q4_K,
        "ffn_gate": Q.Q6_K, "ffn_up": Q.Q6_K, "ffn_down": (Q.Q5_1, Q.Q5_0),
        "token_embd": Q.Q6_K}},
    # qwen3 (q/k norms), untied: q|k|v in one format (Q8_0) and gate|up in one K-quant
    # (Q4_K: fused kernels), a Q5_0 embedding table and a Q5_1 output head.
    "qwen3_q5_embeddings": {"arch": "qwen3", "tied": False, "shape": {"head_dim": 64}, "types": {
        "attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "attn_v": Q.Q8_0, "attn_output": Q.Q6_K,
        "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "ffn_down": (Q.Q5_K,),
        "token_embd": Q.Q5_0, "output": Q.Q5_1}},
}


def _type_of(mix: dict, gguf_name: str) -> Q:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        t = mix["types"].get(parts[2], Q.F32)  # norms (and biases) stay F32
        return t[int(parts[1]) % len(t)] if isinstance(t, tuple) else t
    return mix["types"].get(parts[0], Q.F32)


def _hf_name_type(mix: dict, hf_name: str) -> Q:
    from test_gguf import _gguf_name

    return _type_of(mix, _gguf_name(hf_name))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path, list[list[int]], list[list[int]], Path]]:
    """Per mix: (its GGUF file, converted dir, prompts, transformers' greedy on the
    dequantized weights, the dequantized HF dir)."""
    root = tmp_path_factory.mktemp("kquant_gguf")
    rng = random.Random(11)
    prompts = [[rng.randrange(3, TOKENIZER_VOCAB) for _ in range(n)] for n in (1, 5, 19, 50, 120, 210)]
    out = {}
    for name, mix in MIXES.items():
        hf_dir = build_tiny_model(root / name, mix["arch"], tie_word_embeddings=mix["tied"],
                                  **_SHAPE | mix.get("shape", {}))
        gguf_file = write_gguf(hf_dir, root / f"{name}.gguf", lambda n, mix=mix: _type_of(mix, n))
        converted = convert_gguf_to_hf(gguf_file, root / f"{name}-hf")
        # The oracle's weights: gguf-py's dequantization of the very blocks in the file.
        ref_dir = dequantized_copy(hf_dir, root / f"{name}-dequantized", lambda n, mix=mix: _type_of(mix, n))
        hf = load_hf_model(ref_dir)
        out[name] = (gguf_file, converted, prompts, [hf_greedy(hf, p, 24) for p in prompts], ref_dir)
    return out


@pytest.mark.parametrize("name", list(MIXES))
def test_every_tensor_kept_in_its_format(models, name: str) -> None:
    gguf_file, converted, _, _, ref_dir = models[name]
    mix = MIXES[name]
    checkpoint = Checkpoint([converted / "model.safetensors"])
    reference = load_file(ref_dir / "model.safetensors")
    reader = gguf.GGUFReader(gguf_file)
    raw = {t.name: bytes(t.data.tobytes()) for t in reader.tensors}
    from test_gguf import _gguf_name

    tensors = dict(checkpoint.tensors())
    assert tensors.keys() == reference.keys()
    for key, got in tensors.items():
        if reference[key].dim() == 1:
            assert torch.equal(got, reference[key]), key
            continue
        fmt = _hf_name_type(mix, key).name.lower()
        assert checkpoint.formats[key] == fmt, key
        assert torch.equal(dequantize(got), reference[key]), key
        if got.fmt not in ("q8_0", "q4_0", "q4_1") and not (mix["arch"] == "llama" and key.endswith(("q_proj.weight", "k_proj.weight"))):
            assert got.qs.numpy().tobytes() == raw[_gguf_name(key)], key  # the file's own bytes
    conv = json.loads((converted / "config.json").read_text())
    assert conv["tie_word_embeddings"] == mix["tied"]


@pytest.mark.parametrize("name", list(MIXES))
def test_loaded_modules_keep_the_file_formats(models, name: str) -> None:
    _, converted, _, _, _ = models[name]
    mix = MIXES[name]
    model = load_model(converted, torch.float32, torch.device("cpu"), 256)
    types = mix["types"]
    assert isinstance(model.embed_tokens, QuantEmbedding)
    assert model.embed_tokens.fmt == types["token_embd"].name.lower()
    assert isinstance(model.lm_head, QuantLinear)
    head = types["token_embd"] if mix["tied"] else types["output"]
    assert model.lm_head.fmt == head.name.lower()
    if mix["tied"]:
        assert model.lm_head.qs is model.embed_tokens.qs
    for i, layer in enumerate(model.layers):
        qkv = layer.self_attn.qkv_proj
        want = [types["attn_q"], types["attn_k"], types["attn_v"]]
        if len(set(want)) > 1:  # q/k in one format, v in another: one kernel per part
            assert isinstance(qkv, SplitQuantLinear)
            assert [p.fmt for p in qkv.parts] == [t.name.lower() for t in want]
        else:
            assert isinstance(qkv, QuantLinear) and qkv.fmt == want[0].name.lower()
        assert (qkv.bias is not None) == (mix["arch"] == "qwen2")
        gate_up = layer.mlp.gate_up_proj
        if types["ffn_gate"] == types["ffn_up"]:
            assert isinstance(gate_up, QuantLinear) and gate_up.fmt == types["ffn_gate"].name.lower()
        else:
            assert [p.fmt for p in gate_up.parts] == [types["ffn_gate"].name.lower(), types["ffn_up"].name.lower()]
        down = types["ffn_down"][i % len(types["ffn_down"])]
        assert layer.mlp.down_proj.fmt == down.name.lower()
        assert layer.self_attn.o_proj.fmt == types["attn_output"].name.lower()


@pytest.mark.parametrize("name", list(MIXES))
@pytest.mark.parametrize("setting", list(SCHEDULER_SETTINGS))
def test_greedy_matches_transformers(models, name: str, setting: str) -> None:
    _, converted, prompts, expected, _ = models[name]
    assert_greedy_matches(converted, prompts, expected, setting)


def test_split_linear_is_refused_by_live_weight_updates(models) -> None:
    from livelm.engine.llm import LLM

    _, converted, _, _, _ = models["llama_q4_k_m"]
    llm = LLM(str(converted), kv_cache_gib=0.05)
    w = torch.zeros(128, 256)
    with pytest.raises(ValueError, match=r"qkv_proj keeps its parts.*q4_k, q4_k, q6_k.*not supported"):
        llm.engine.update_weights({"model.layers.0.self_attn.v_proj.weight": w})
