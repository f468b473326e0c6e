"""Convert a GGUF file (llama.cpp's format) into a Hugging Face-format model directory.

The engine loads only HF-format directories, so a GGUF is turned once into `config.json`,
`model.safetensors` and tokenizer files. Quantized weights stay in the file's own format:
Q8_0 / Q4_0 / Q4_1 blocks are repacked bit-exactly, Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K blocks
kept byte for byte (livelm/quant/gguf_repack.py), float tensors stored as fp32; other
types (Q2_K, Q3_K, the IQ types, ...) are refused by name. The tokenizer is rebuilt by
transformers' own GGUF tokenizer conversion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from livelm.models.gguf_rope import ROPE_FREQS, llama3_scaling_from_rope_freqs

logger = logging.getLogger("livelm")

# Part of every cache key for converted models: bump it when the output of a conversion
# changes, so that caches made by an older livelm are not reused.
# 2: quantized weights kept quantized (was: dequantized to fp32); 3: Q5_0/Q5_1/K-quants
# kept as GGUF blocks (was: requantized to q4_1 / q8_0).
CONVERSION_VERSION = 3

# general.architecture -> (transformers model_type, architectures entry)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

# The GGUF tensor types livelm loads (livelm/quant/gguf_repack.py keeps each in its own
# format); listed here so that importing this module does not import torch.
SUPPORTED_TENSOR_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# llama.cpp pre-tokenizer names whose regex first isolates every digit ("\p{N}") and then
# applies the GPT-2 split, as the original tokenizers do. transformers builds only the GPT-2
# split for them, which tokenizes digit runs differently wherever the vocabulary holds
# multi-digit merges, so we put the digit split back.
_DIGIT_SPLIT_PRE_TOKENIZERS = {
    "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva",
}  # fmt: skip


def file_sha256(path: Path, chunk_size: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in chunks so a multi-GB file never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar, string or list (gguf-version independent)."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return default
    from gguf import GGUFValueType

    def value(part: np.ndarray, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        if vtype == GGUFValueType.FLOAT32:
            # The shortest decimal that rounds to this float32: 1e-05 rather than
            # 9.999999747378752e-06, the value the original config.json held.
            return float(str(part[0]))
        return part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [value(field.parts[i], field.types[-1]) for i in field.data]
    return value(field.parts[field.data[0]], field.types[0])


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    if gguf_name == ROPE_FREQS:
        return ROPE_FREQS  # llama3 rope scaling: read back into rope_scaling (gguf_rope.py)
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent we know of")


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for llama models.

    llama.cpp reorders each head's rows from HF's "rotate half" layout (first half, second
    half) to GPT-J's interleaved pairs: reshape(n_head, 2, d/2, ...).swapaxes(1, 2). The
    inverse views the rows as (n_head, d/2, 2, ...) and swaps back.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_tensors(reader: Any) -> None:
    for tensor in reader.tensors:
        _hf_tensor_name(tensor.name)
        if tensor.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which livelm "
                f"does not support; supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )


def _read_weights(reader: Any, arch: str, n_head: int, n_head_kv: int) -> dict[str, Any]:
    """HF name -> fp32 tensor, or QuantizedTensor for quantized 2-D weights (owning copies:
    the reader memory-maps the file read-only)."""
    import torch

    from livelm.quant.formats import QuantizedTensor
    from livelm.quant.gguf_repack import repack_gguf_tensor

    weights: dict[str, Any] = {}
    kept: dict[str, int] = {}
    for tensor in reader.tensors:
        name = _hf_tensor_name(tensor.name)
        if name == ROPE_FREQS:
            weights[name] = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
            continue
        # GGUF lists dimensions fastest-first; numpy/torch want them slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        w = repack_gguf_tensor(tensor.data, tensor.tensor_type.name, shape)
        if isinstance(w, QuantizedTensor):
            kept[w.fmt] = kept.get(w.fmt, 0) + 1
        heads = n_head if ".attn_q." in tensor.name else n_head_kv if ".attn_k." in tensor.name else 0
        if arch == "llama" and heads:
            # Rows are independent in every format, so permuting them is exact.
            perm = torch.from_numpy(_unpermute_rows(np.arange(shape[0]), heads).copy())
            w = w.index_rows(perm) if isinstance(w, QuantizedTensor) else w[perm]
        weights[name] = w if isinstance(w, QuantizedTensor) else w.contiguous().clone()
    if kept:
        logger.info("GGUF quantized tensors kept as stored: %s", ", ".join(f"{n} {f}" for f, n in sorted(kept.items())))
    return weights


def _rope_scaling(reader: Any, arch: str) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if factor is not None:
        scaling["factor"] = float(factor)
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _build_config(reader: Any, arch: str, weights: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    model_type, architecture = ARCHITECTURES[arch]
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    # qwen3 stores its head size as key_length; llama as the rope dimension (full rotary).
    head_dim = _field(reader, f"{arch}.attention.key_length")
    if head_dim is None:
        head_dim = _field(reader, f"{arch}.rope.dimension_count", hidden // n_head)
    embed = weights["model.embed_tokens.weight"]
    kwargs: dict[str, Any] = dict(
        vocab_size=int(embed.shape[0]),  # the tensor, not the vocab list, sizes the model
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="lm_head.weight" not in weights,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_eos_token_ids(reader),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    if arch != "qwen2" or int(head_dim) != hidden // n_head:
        kwargs["head_dim"] = int(head_dim)  # Qwen2's config has no head_dim unless it is unusual
    if arch != "qwen2" and "model.layers.0.self_attn.q_proj.bias" in weights:
        kwargs["attention_bias"] = True  # qwen2 always has q/k/v biases; others only if present
    if (scaling := _rope_scaling(reader, arch)) is not None:
        kwargs["rope_scaling"] = scaling
    if ROPE_FREQS in weights:
        if arch != "llama":
            raise ValueError(f"GGUF tensor {ROPE_FREQS!r} is supported for llama files only, not {arch}")
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        kwargs["rope_scaling"] = llama3_scaling_from_rope_freqs(
            weights[ROPE_FREQS].numpy(), kwargs["rope_theta"], int(head_dim), original
        )
    config = AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [architecture]
    config.dtype = "float32"
    return config


def _write_tokenizer(gguf_path: Path, reader: Any, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    # transformers looks for tokenizer files next to the GGUF; a private directory holding
    # only a link to it keeps unrelated files there from being picked up.
    with tempfile.TemporaryDirectory() as src:
        link = Path(src) / "model.gguf"
        try:
            link.symlink_to(gguf_path.resolve())
        except OSError:  # no symlinks (some Windows set-ups): copy instead
            shutil.copyfile(gguf_path, link)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(src, gguf_file=link.name)

    if _field(reader, "tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE_TOKENIZERS:
        from tokenizers import pre_tokenizers

        backend = tokenizer.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)

    # Newer transformers writes the template to chat_template.jinja only; keep a copy in
    # tokenizer_config.json too so that readers of either layout find it.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    if template is not None:
        tokenizer_config["chat_template"] = template
    for key in ("is_local", "local_files_only"):  # loading options, not tokenizer facts
        tokenizer_config.pop(key, None)
    config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))


def _eos_token_ids(reader: Any) -> int | list[int] | None:
    """EOS, plus the end-of-turn token when a chat model has a distinct one."""
    ids = [
        _field(reader, "tokenizer.ggml.eos_token_id"),
        _field(reader, "tokenizer.ggml.eot_token_id"),
    ]
    ids = [i for i in dict.fromkeys(ids) if i is not None]
    return ids[0] if len(ids) == 1 else (ids or None)


def _write_generation_config(reader: Any, out_dir: Path) -> None:
    gen: dict[str, Any] = {
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_token_ids(reader),
    }
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        gen["pad_token_id"] = pad
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, replacing an older conversion there."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, out_dir)


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    expected_sha256: str | None = None,
) -> Path:
    """Convert a llama / qwen2 / qwen3 GGUF file into an HF-format directory at ``out_dir``.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (HF tensor
    names, llama q/k rows un-permuted; quantized weights as ``<name>.qs/.d/.m`` listed in the
    file's ``livelm.quant`` metadata, see livelm/quant/storage.py) and the tokenizer files with the chat template. The
    result is built in a temporary sibling directory and renamed into place, so an
    interrupted conversion never leaves a partial ``out_dir``; an existing ``out_dir`` is
    replaced. Raises ValueError for a sha256 mismatch (when ``expected_sha256`` is given), an
    unsupported architecture, tensor type or tensor name.
    """
    from gguf import GGUFReader
    from safetensors.torch import save_file

    from livelm.quant.storage import flatten_for_safetensors

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file not found: {gguf_path}")
    if expected_sha256 is not None:
        actual = file_sha256(gguf_path)
        if actual != expected_sha256.lower():
            raise ValueError(
                f"sha256 mismatch for {gguf_path}: expected {expected_sha256}, got {actual}"
            )

    reader = GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} in {gguf_path} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    _check_tensors(reader)  # names and types before any slow work, so a bad file fails fast
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"GGUF file {gguf_path} carries no tokenizer (tokenizer.ggml.tokens)")
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        logger.info(
            "converting %s (%s, %d tensors) to %s", gguf_path, arch, len(reader.tensors), out_dir
        )
        weights = _read_weights(reader, arch, n_head, n_head_kv)
        _build_config(reader, arch, weights).save_pretrained(tmp)
        _write_generation_config(reader, tmp)
        weights.pop(ROPE_FREQS, None)  # now the config's rope_scaling
        tensors, metadata = flatten_for_safetensors(weights)
        save_file(tensors, str(tmp / "model.safetensors"), metadata=metadata)
        del weights
        _write_tokenizer(gguf_path, reader, tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
