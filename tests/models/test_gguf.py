"""GGUF -> HF conversion: weights, config and tokenizer of tiny llama / qwen2 / qwen3 models
written to GGUF here (as llama.cpp's converter would) must come back as the originals."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from kquant_reference import quantize as reference_quantize
from safetensors.torch import load_file, save_file
from tiny_models import _CORPUS, CHATML_TEMPLATE, SPECIAL_TOKENS

from livelm.models import gguf_convert
from livelm.models.gguf_convert import convert_gguf_to_hf, file_sha256

ARCHS = ["llama", "qwen2", "qwen3"]
Q = gguf.GGMLQuantizationType

# llama.cpp's tensor names, written out here rather than taken from the converter so that a
# wrong mapping there cannot cancel out against the same mistake in this writer.
_GGUF_NAMES = {
    "embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
    # Phi-3's fused projections; the MoE router and Qwen2-MoE's shared-expert gate
    "qkv_proj": "attn_qkv", "gate_up_proj": "ffn_up",
    "gate": "ffn_gate_inp", "shared_expert_gate": "ffn_gate_inp_shexp",
}  # fmt: skip
# One expert's projection (Qwen's names, Mixtral's w1/w3/w2) -> its stacked ffn_*_exps tensor.
_EXPERT_PARTS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
# transformers model_type -> general.architecture, as llama.cpp's converter writes it.
GGUF_ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "mixtral": "llama", "gemma3_text": "gemma3"}


# Gemma's norms around attention and the MLP, as llama.cpp names them.
_GEMMA_NORMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}


def _gguf_name(hf_name: str, gemma: bool = False) -> str:
    *path, module, kind = hf_name.split(".")
    layer = [p for p in path if p.isdigit()]
    prefix = f"blk.{layer[0]}." if layer else ""
    if gemma and module in _GEMMA_NORMS:
        return f"{prefix}{_GEMMA_NORMS[module]}.{kind}"
    if "experts" in path:
        return f"{prefix}ffn_{_EXPERT_PARTS[module]}_exps.{kind}"
    if "shared_expert" in path:
        return f"{prefix}{_GGUF_NAMES[module]}_shexp.{kind}"
    return f"{prefix}{_GGUF_NAMES.get(module) or _GEMMA_NORMS[module]}.{kind}"


def written_type(hf_name: str, w: torch.Tensor | np.ndarray, qtype: Q | Callable[[str], Q]) -> Q:
    """The type ``write_gguf`` stores HF tensor ``hf_name`` in: 1-D tensors (norms, biases,
    Qwen2-MoE's shared-expert gate, which llama.cpp stores as [H]) and MoE routers
    (``ffn_gate_inp``, never quantized by llama.cpp) F32, the rest ``qtype``."""
    name = _gguf_name(hf_name)
    if w.ndim == 1 or name.endswith(("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")):
        return Q.F32
    return qtype(name) if callable(qtype) else qtype


def stored_values(w: torch.Tensor, qtype: Q) -> torch.Tensor:
    """What a GGUF reader gets back from ``w`` stored as ``qtype`` (gguf-py's dequantization
    of the tests' quantizer's blocks): the weights of the transformers oracle."""
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.half().float()
    return torch.from_numpy(gguf.quants.dequantize(reference_quantize(w.numpy(), qtype), qtype))


def dequantized_copy(hf_dir: Path, out_dir: Path, qtype: Q | Callable[[str], Q]) -> Path:
    """``hf_dir`` with every weight replaced by what ``write_gguf(hf_dir, ..., qtype)``
    stores of it (rows quantize independently, so llama's q/k row permutation and the
    stacking of experts do not change the values)."""
    out_dir.mkdir(parents=True)
    for f in hf_dir.iterdir():
        if f.suffix != ".safetensors":
            (out_dir / f.name).write_bytes(f.read_bytes())
    state = {k: stored_values(w, written_type(k, w, qtype)).contiguous()
             for k, w in load_file(hf_dir / "model.safetensors").items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of llama q/k rows (rotate-half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _add_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int) -> None:
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [""] * len(vocab)
    for text, index in vocab.items():
        tokens[index] = text
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    # llama.cpp pads the list up to the embedding rows with unused placeholder tokens.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def _add_family_metadata(writer: gguf.GGUFWriter, cfg: dict, arch: str) -> dict[str, np.ndarray]:
    """Phi-3's rope and window keys, and the MoE shapes, as llama.cpp's converter writes
    them; returns Phi-3's LongRoPE factor tensors (GGUF name -> fp32 array)."""
    factors: dict[str, np.ndarray] = {}
    if arch == "phi3":
        rope = cfg["rope_parameters"]
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        writer.add_rope_dimension_count(int(partial * cfg["hidden_size"]) // cfg["num_attention_heads"])
        original = cfg["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(cfg.get("sliding_window") or 0)
        if rope.get("rope_type") == "longrope":
            scale = cfg["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
            factors["rope_factors_long.weight"] = np.array(rope["long_factor"], np.float32)
            factors["rope_factors_short.weight"] = np.array(rope["short_factor"], np.float32)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(cfg["sliding_window"])
        period = 2 if arch == "gemma2" else 6  # llama.cpp's fixed patterns: every n-th layer global
        sliding = [t == "sliding_attention" for t in cfg["layer_types"]]
        if sliding != [bool((i + 1) % period) for i in range(len(sliding))]:
            writer.add_sliding_window_pattern(sliding)  # the per-layer flags newer files carry
        if cfg["query_pre_attn_scalar"] != (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]):
            writer.add_attention_scale(cfg["query_pre_attn_scalar"] ** -0.5)  # llama.cpp derives it otherwise
        if arch == "gemma2":
            for key in ("attn_logit_softcapping", "final_logit_softcapping"):
                if cfg.get(key) is not None:
                    writer.add_float32(f"gemma2.{key}", cfg[key])
        else:
            writer.add_float32("gemma3.rope.freq_base_swa", cfg["rope_parameters"]["sliding_attention"]["rope_theta"])
            full = cfg["rope_parameters"]["full_attention"]
            if full.get("rope_type", "default") != "default":
                writer.add_rope_scaling_type(gguf.RopeScalingType(full["rope_type"]))
                writer.add_rope_scaling_factor(full["factor"])
    if "num_experts_per_tok" in cfg:
        writer.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
        if "moe_intermediate_size" in cfg:
            writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
        # llama.cpp fixes the routing normalisation per architecture (renormalised for
        # qwen3moe and Mixtral, not for qwen2moe); a model that differs says so in this key.
        if "norm_topk_prob" in cfg and cfg["norm_topk_prob"] != (arch == "qwen3moe"):
            writer.add_expert_weights_norm(cfg["norm_topk_prob"])
    return factors


def _add_weight(writer: gguf.GGUFWriter, name: str, w: np.ndarray, wtype: Q) -> None:
    if wtype == Q.F32:
        writer.add_tensor(name, w.astype(np.float32))
    elif wtype == Q.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:  # row-wise blocks: a stacked [E, rows, cols] tensor quantizes as its rows
        raw = reference_quantize(w.reshape(-1, w.shape[-1]), wtype)
        writer.add_tensor(name, raw.reshape(*w.shape[:-1], raw.shape[-1]), raw_dtype=wtype)


def assert_tp2_equals_tp1(model_dir: Path, prompts: list[list[int]], new_tokens: int,
                          check_tp2: Callable[[object], None]) -> None:
    """Greedy continuations of ``prompts`` at tensor_parallel_size 2 equal those at 1 (64-token
    steps); ``check_tp2`` inspects the TP=2 engine's LLM before it closes."""
    from livelm import SamplingParams
    from livelm.engine.llm import LLM

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    runs = []
    for tp in (1, 2):
        llm = LLM(str(model_dir), tensor_parallel_size=tp, num_threads=2, max_num_batched_tokens=64)
        try:
            runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
            if tp == 2:
                check_tp2(llm)
        finally:
            llm.engine.close()
    assert runs[1] == runs[0]


def write_gguf(hf_dir: Path, path: Path, qtype: Q | Callable[[str], Q] = Q.F32,
               extra_tensors: dict[str, np.ndarray] | None = None,
               drop: tuple[str, ...] = ()) -> Path:
    """Write the tiny HF model in ``hf_dir`` as a GGUF file, 2-D weights stored as ``qtype``
    (or as ``qtype(gguf_name)``: a type per tensor, as llama.cpp's mixes such as Q4_K_M do;
    K-quants by the tests' reference quantizer; see :func:`written_type`), plus
    ``extra_tensors`` (GGUF name -> fp32 array, e.g. ``rope_freqs.weight``), without the
    GGUF tensors named in ``drop`` (for the refusal tests). MoE experts are stacked into
    ``ffn_*_exps`` tensors, Phi-3's fused projections kept fused, as llama.cpp does."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCH.get(cfg["model_type"], cfg["model_type"])
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg["rope_parameters"]
    writer.add_rope_freq_base((rope["full_attention"] if "full_attention" in rope else rope)["rope_theta"])
    writer.add_vocab_size(cfg["vocab_size"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    elif arch != "phi3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    factors = _add_family_metadata(writer, cfg, arch)
    _add_tokenizer(writer, hf_dir, cfg["vocab_size"])
    for gguf_name, array in {**factors, **(extra_tensors or {})}.items():
        if gguf_name not in drop:
            writer.add_tensor(gguf_name, array.astype(np.float32))
    experts: dict[str, dict[int, np.ndarray]] = {}
    sandwich = arch in ("gemma2", "gemma3")  # Gemma 1's norms are named as Llama's
    for name, t in load_file(hf_dir / "model.safetensors").items():
        w = t.numpy()
        gguf_name = _gguf_name(name, sandwich)
        if arch in ("gemma", "gemma2", "gemma3") and name.endswith("norm.weight"):
            w = w + np.float32(1.0)  # llama.cpp stores Gemma's norms as what they scale by
        if arch == "llama" and ".q_proj." in name:
            w = _permute(w, n_head)
        elif arch == "llama" and ".k_proj." in name:
            w = _permute(w, n_kv)
        if gguf_name in drop:
            continue
        if gguf_name.endswith("_exps.weight"):
            experts.setdefault(gguf_name, {})[int(name.split(".experts.")[1].split(".")[0])] = w
            continue
        if gguf_name.endswith("ffn_gate_inp_shexp.weight"):
            w = w.reshape(-1)  # llama.cpp's [H] for Qwen2-MoE's [1, H] shared-expert gate
        _add_weight(writer, gguf_name, w, written_type(name, w, qtype))
    for gguf_name, by_expert in experts.items():
        stacked = np.stack([by_expert[e] for e in sorted(by_expert)])
        _add_weight(writer, gguf_name, stacked, qtype(gguf_name) if callable(qtype) else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny(tiny_model_dirs: dict[str, Path]) -> dict[str, Path]:
    """The session's tiny llama / qwen2 / qwen3 HF directories (built by conftest.py)."""
    return tiny_model_dirs


def _convert(tiny: dict[str, Path], tmp_path: Path, arch: str, qtype: Q) -> Path:
    (tmp_path / "src").mkdir()
    gguf_file = write_gguf(tiny[arch], tmp_path / "src" / f"{arch}.gguf", qtype)
    return convert_gguf_to_hf(gguf_file, tmp_path / "out")


def _expected(w: torch.Tensor, qtype: Q) -> torch.Tensor:
    return w if w.dim() == 1 else stored_values(w, qtype)


_WEIGHT_CASES = [(arch, q) for arch in ARCHS for q in (Q.F32, Q.F16, Q.Q8_0)]
# The other types gguf can write (the K-quants need 256-wide rows: tests/models/test_gguf_kquants.py).
_WEIGHT_CASES += [("llama", q) for q in (Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)]


@pytest.mark.parametrize(("arch", "qtype"), _WEIGHT_CASES, ids=lambda v: getattr(v, "name", v))
def test_weights_round_trip(tiny: dict[str, Path], tmp_path: Path, arch: str, qtype: Q) -> None:
    from livelm.models.loader import Checkpoint
    from livelm.quant.formats import QuantizedTensor, dequantize

    out = _convert(tiny, tmp_path, arch, qtype)
    original = load_file(tiny[arch] / "model.safetensors")
    converted = dict(Checkpoint([out / "model.safetensors"]).tensors())
    assert converted.keys() == original.keys()
    for name, w in original.items():
        got = converted[name]
        # Quantized 2-D weights stay quantized (GGUF's own blocks); their values are exact.
        assert isinstance(got, QuantizedTensor) == (w.dim() == 2 and qtype.name.startswith("Q")), name
        if isinstance(got, QuantizedTensor):
            assert got.fmt == qtype.name.lower()
            got = dequantize(got)
        assert got.dtype == torch.float32
        assert torch.equal(got, _expected(w, qtype)), name


@pytest.mark.parametrize("arch", ARCHS)
def test_config_and_logits_match(tiny: dict[str, Path], tmp_path: Path, arch: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    out = _convert(tiny, tmp_path, arch, Q.F32)
    ref, got = AutoConfig.from_pretrained(tiny[arch]), AutoConfig.from_pretrained(out)
    for key in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "rope_parameters", "architectures",
    ):  # fmt: skip
        assert getattr(got, key, None) == getattr(ref, key, None), key
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny[arch]).eval()(ids).logits
        have = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(have, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trip(tiny: dict[str, Path], tmp_path: Path, arch: str) -> None:
    from transformers import AutoTokenizer

    out = _convert(tiny, tmp_path, arch, Q.F32)
    ref, got = AutoTokenizer.from_pretrained(tiny[arch]), AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": _CORPUS[3]}, {"role": "assistant", "content": "ok 42"}]
    texts = [*_CORPUS, "".join(SPECIAL_TOKENS) + " a<|im_end|>b", "  two  spaces\n\n\tend "]
    texts.append(ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    for text in texts:
        ids = ref.encode(text, add_special_tokens=True)
        assert got.encode(text, add_special_tokens=True) == ids, text
        assert got.decode(ids) == text
    assert got.chat_template == CHATML_TEMPLATE
    assert (
        json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    )
    assert got.apply_chat_template(chat, add_generation_prompt=True) == ref.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (got.bos_token_id, got.eos_token_id) == (0, 2)


def test_wrong_sha256_is_rejected(tiny: dict[str, Path], tmp_path: Path) -> None:
    path = write_gguf(tiny["qwen2"], tmp_path / "m.gguf")
    actual = file_sha256(path)
    with pytest.raises(ValueError, match="sha256 mismatch") as err:
        convert_gguf_to_hf(path, tmp_path / "out", expected_sha256="0" * 64)
    assert actual in str(err.value) and "0" * 64 in str(err.value)
    assert not (tmp_path / "out").exists()
    assert (
        convert_gguf_to_hf(path, tmp_path / "out", expected_sha256=actual) / "config.json"
    ).is_file()


def _write_bare_gguf(
    path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q | None]]
) -> Path:
    """A GGUF with only ``tensors`` (name -> (data, raw type)) and no model metadata."""
    writer = gguf.GGUFWriter(str(path), arch)
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q8_1, Q.IQ2_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS, Q.TQ1_0],
                         ids=lambda q: q.name)
def test_unsupported_tensor_type_is_named(tmp_path: Path, qtype: Q) -> None:
    # Raw blocks of a type livelm does not load: refused, by name, before they are read.
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    tensors = {"blk.0.ffn_up.weight": (np.zeros((4, type_size), np.uint8), qtype)}
    path = _write_bare_gguf(tmp_path / "bad.gguf", "llama", tensors)
    with pytest.raises(ValueError, match=rf"blk\.0\.ffn_up\.weight.*type {qtype.name},.*does not support.*supported.*Q5_0.*Q6_K"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("arch", "tensor", "message"),
    [
        ("gpt2", "token_embd.weight", "architecture 'gpt2'"),
        ("llama", "blk.0.mystery.weight", "'blk.0.mystery.weight' has no Hugging Face"),
        # llama.cpp's old Mixtral layout, one tensor per expert (now stacked ffn_gate_exps)
        ("llama", "blk.0.ffn_gate.3.weight", "'blk.0.ffn_gate.3.weight' has no Hugging Face"),
        ("phi3", "blk.0.ffn_gate_exps.weight", r"'blk.0.ffn_gate_exps.weight' has no Hugging Face.*phi3"),
    ],
)
def test_unsupported_model_is_rejected(
    tmp_path: Path, arch: str, tensor: str, message: str
) -> None:
    path = _write_bare_gguf(
        tmp_path / "m.gguf", arch, {tensor: (np.zeros((4, 8), np.float32), None)}
    )
    with pytest.raises(ValueError, match=message):
        convert_gguf_to_hf(path, tmp_path / "out")


def test_interrupted_conversion_leaves_nothing(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_gguf(tiny["qwen3"], tmp_path / "src.gguf")

    def boom(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "_write_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(path, tmp_path / "cache" / "out")
    assert list((tmp_path / "cache").iterdir()) == []


def test_engine_greedy_tokens_match_safetensors(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livelm.engine.llm import LLM
    from livelm.sampling_params import SamplingParams

    monkeypatch.setenv("LIVELM_CACHE_DIR", str(tmp_path / "cache"))
    gguf_file = write_gguf(tiny["llama"], tmp_path / "tiny-llama.gguf")
    prompts = [_CORPUS[0], _CORPUS[4], "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    params = SamplingParams(temperature=0, max_tokens=12)
    outputs = {}
    for name, model in (("hf", tiny["llama"]), ("gguf", gguf_file)):
        llm = LLM(model=str(model), dtype="float32", device="cpu", kv_cache_gib=0.05)
        outputs[name] = [
            o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)
        ]
    assert outputs["gguf"] == outputs["hf"]
    assert all(len(ids) > 0 for ids in outputs["hf"])
