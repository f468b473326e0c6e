"""GGUF -> HF conversion: weights, config and tokenizer of tiny llama / qwen2 / qwen3 models
written to GGUF here (as llama.cpp's converter would) must come back as the originals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from kquant_reference import quantize as reference_quantize
from safetensors.torch import load_file
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
}  # fmt: skip


def _gguf_name(hf_name: str) -> str:
    *path, module, kind = hf_name.split(".")
    layer = [p for p in path if p.isdigit()]
    prefix = f"blk.{layer[0]}." if layer else ""
    return f"{prefix}{_GGUF_NAMES[module]}.{kind}"


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


def write_gguf(hf_dir: Path, path: Path, qtype: Q | Callable[[str], Q] = Q.F32,
               extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Write the tiny HF model in ``hf_dir`` as a GGUF file, 2-D weights stored as ``qtype``
    (or as ``qtype(gguf_name)``: a type per tensor, as llama.cpp's mixes such as Q4_K_M do;
    K-quants by the tests' reference quantizer), plus ``extra_tensors`` (GGUF name -> fp32
    array, e.g. ``rope_freqs.weight``)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = cfg["model_type"]
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
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(cfg["vocab_size"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _add_tokenizer(writer, hf_dir, cfg["vocab_size"])
    for gguf_name, array in (extra_tensors or {}).items():
        writer.add_tensor(gguf_name, array.astype(np.float32))
    for name, t in load_file(hf_dir / "model.safetensors").items():
        w = t.numpy()
        wtype = qtype(_gguf_name(name)) if callable(qtype) else qtype
        if arch == "llama" and ".q_proj." in name:
            w = _permute(w, n_head)
        elif arch == "llama" and ".k_proj." in name:
            w = _permute(w, n_kv)
        if w.ndim == 1 or wtype == Q.F32:  # llama.cpp keeps 1-D tensors (norms, biases) in F32
            writer.add_tensor(_gguf_name(name), w.astype(np.float32))
        elif wtype == Q.F16:
            writer.add_tensor(_gguf_name(name), w.astype(np.float16))
        else:
            writer.add_tensor(_gguf_name(name), reference_quantize(w, wtype), raw_dtype=wtype)
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
    if w.dim() == 1 or qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.half().float()
    return torch.from_numpy(gguf.quants.dequantize(reference_quantize(w.numpy(), qtype), qtype))


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
