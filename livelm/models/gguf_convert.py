"""Convert a GGUF file (llama.cpp's format) into a Hugging Face-format model directory.

The engine loads only HF-format directories, so a GGUF is turned once into `config.json`,
`model.safetensors` and tokenizer files. Quantized weights stay in the file's own format:
Q8_0 / Q4_0 / Q4_1 blocks are repacked bit-exactly, Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K blocks
kept byte for byte (livelm/quant/gguf_repack.py), float tensors stored as fp32; other
types (Q2_K, Q3_K, the IQ types, ...) are refused by name. The tokenizer is rebuilt by
transformers' own GGUF tokenizer conversion.

Families: llama, qwen2, qwen3, gemma, gemma2, gemma3 (norms stored as 1 + weight by llama.cpp, read
back; attention scale and layer types derived as llama.cpp does), phi3 (fused q|k|v and gate|up kept fused, LongRoPE factors
read back into rope_scaling), and the mixture-of-experts qwen2moe, qwen3moe and Mixtral (a
``llama`` file with expert tensors): stacked experts are split into the per-expert tensors
of the HF checkpoints (models/gguf_names.py, models/gguf_families.py). livelm's experts
are float parameters, so quantized expert tensors are kept in their format in the
converted file and dequantized when the model loads (a warning says how much memory that
takes); every other quantized tensor stays quantized as for dense models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from livelm.models.gguf_families import gemma_config, moe_config, phi3_config
from livelm.models.gguf_metadata import field as _field
from livelm.models.gguf_metadata import require
from livelm.models.gguf_names import (
    EXPERT,
    FAMILIES,
    GEMMA_FAMILIES,
    GGUF_ARCHITECTURES,
    MOE_FAMILIES,
    ROPE_FACTORS,
    check_layer_tensors,
    gguf_family,
    hf_tensor_name,
)
from livelm.models.gguf_rope import ROPE_FREQS, llama3_scaling_from_rope_freqs

logger = logging.getLogger("livelm")

# Part of every cache key for converted models: bump it when the output of a conversion
# changes, so that caches made by an older livelm are not reused.
# 2: quantized weights kept quantized (was: dequantized to fp32); 3: Q5_0/Q5_1/K-quants
# kept as GGUF blocks (was: requantized to q4_1 / q8_0).
CONVERSION_VERSION = 3

# The GGUF tensor types livelm loads (livelm/quant/gguf_repack.py keeps each in its own
# format); listed here so that importing this module does not import torch.
SUPPORTED_TENSOR_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

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


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for llama models.

    llama.cpp reorders each head's rows from HF's "rotate half" layout (first half, second
    half) to GPT-J's interleaved pairs: reshape(n_head, 2, d/2, ...).swapaxes(1, 2). The
    inverse views the rows as (n_head, d/2, 2, ...) and swaps back.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_tensors(reader: Any, family: str) -> None:
    for tensor in reader.tensors:
        hf_tensor_name(tensor.name, family)
        if tensor.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which livelm "
                f"does not support; supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )


def _read_weights(reader: Any, family: str, n_head: int, n_head_kv: int) -> dict[str, Any]:
    """HF name -> fp32 tensor, or QuantizedTensor for quantized 2-D weights (owning copies:
    the reader memory-maps the file read-only). Stacked expert tensors become one tensor per
    expert, in the file's format."""
    import torch

    from livelm.quant.formats import QuantizedTensor
    from livelm.quant.gguf_repack import repack_gguf_tensor

    weights: dict[str, Any] = {}
    kept: dict[str, int] = {}
    quantized_experts: dict[str, int] = {}
    expert_weights = 0
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, family)
        type_name = tensor.tensor_type.name
        if name == ROPE_FREQS or name in ROPE_FACTORS:
            weights[name] = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
            continue
        # GGUF lists dimensions fastest-first; numpy/torch want them slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if EXPERT in name:
            if len(shape) != 3:
                raise ValueError(f"GGUF tensor {tensor.name!r} has shape {shape}; expert tensors are [n_expert, rows, cols]")
            # Rows of whole blocks in every format: expert e's bytes are the e-th slice.
            per_expert = np.asarray(tensor.data).reshape(shape[0], -1)
            for e in range(shape[0]):
                w = repack_gguf_tensor(per_expert[e], type_name, shape[1:])
                weights[name.replace(EXPERT, str(e))] = w if isinstance(w, QuantizedTensor) else w.contiguous().clone()
            if type_name not in ("F32", "F16", "BF16"):
                quantized_experts[type_name] = quantized_experts.get(type_name, 0) + 1
            expert_weights += math.prod(shape)
            continue
        w = repack_gguf_tensor(tensor.data, type_name, shape)
        if isinstance(w, QuantizedTensor):
            kept[w.fmt] = kept.get(w.fmt, 0) + 1
        elif name.endswith(".shared_expert_gate.weight"):
            w = w.reshape(1, -1)  # llama.cpp stores Qwen2-MoE's [1, H] shared-expert gate as [H]
        if family in GEMMA_FAMILIES and tensor.name.endswith("norm.weight"):
            # llama.cpp stores Gemma's norms as 1 + weight (what they scale by); livelm, as
            # transformers, adds the 1 itself. Exact for |weight| < 0.5 (Sterbenz).
            w = w - 1.0
        heads = n_head if ".attn_q." in tensor.name else n_head_kv if ".attn_k." in tensor.name else 0
        if family in ("llama", "mixtral") and heads:
            # Rows are independent in every format, so permuting them is exact.
            perm = torch.from_numpy(_unpermute_rows(np.arange(shape[0]), heads).copy())
            w = w.index_rows(perm) if isinstance(w, QuantizedTensor) else w[perm]
        weights[name] = w if isinstance(w, QuantizedTensor) else w.contiguous().clone()
    if kept:
        logger.info("GGUF quantized tensors kept as stored: %s", ", ".join(f"{n} {f}" for f, n in sorted(kept.items())))
    if quantized_experts:
        logger.warning(
            "GGUF expert tensors stored quantized (%s): livelm's mixture-of-experts path is float-only, "
            "so they are dequantized when the model loads: %.2f GiB of expert weights in float32 "
            "(half that in bfloat16), against their size in the file",
            ", ".join(f"{n} {t}" for t, n in sorted(quantized_experts.items())), expert_weights * 4 / 2**30,
        )
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


def _build_config(reader: Any, arch: str, family: str, weights: dict[str, Any], names: set[str]) -> Any:
    from transformers import AutoConfig

    model_type, architecture = FAMILIES[family]
    n_head = int(require(reader, f"{arch}.attention.head_count", family))
    hidden = int(require(reader, f"{arch}.embedding_length", family))
    num_layers = int(require(reader, f"{arch}.block_count", family))
    # qwen3 stores its head size as key_length; llama as the rope dimension (full rotary);
    # Phi-3's rope dimension is the rotated part only (partial rotary).
    head_dim = _field(reader, f"{arch}.attention.key_length")
    if head_dim is None:
        head_dim = hidden // n_head if family == "phi3" else _field(reader, f"{arch}.rope.dimension_count", hidden // n_head)
    embed = weights["model.embed_tokens.weight"]
    kwargs: dict[str, Any] = dict(
        vocab_size=int(embed.shape[0]),  # the tensor, not the vocab list, sizes the model
        hidden_size=hidden,
        num_hidden_layers=num_layers,
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
    if family in MOE_FAMILIES:
        kwargs.update(moe_config(reader, arch, family, names, num_layers))
    if "intermediate_size" not in kwargs:
        width = _field(reader, f"{arch}.feed_forward_length")
        if width is None and family in MOE_FAMILIES and not kwargs["mlp_only_layers"]:
            width = kwargs["moe_intermediate_size"]  # no dense MLP for it to size
        elif width is None:
            width = require(reader, f"{arch}.feed_forward_length", family)
        kwargs["intermediate_size"] = int(width)
    # Qwen2, Qwen2-MoE, Phi-3 and Mixtral configs have no head_dim unless it is unusual.
    if family not in ("qwen2", "qwen2moe", "phi3", "mixtral") or int(head_dim) != hidden // n_head:
        kwargs["head_dim"] = int(head_dim)
    if family not in ("qwen2", "qwen2moe") and "model.layers.0.self_attn.q_proj.bias" in weights:
        kwargs["attention_bias"] = True  # qwen2 always has q/k/v biases; others only if present
    if (scaling := _rope_scaling(reader, arch)) is not None:
        kwargs["rope_scaling"] = scaling
    if family == "phi3":
        kwargs.update(phi3_config(reader, weights, int(head_dim), kwargs["max_position_embeddings"]))
    elif family in GEMMA_FAMILIES and family != "gemma":  # Gemma 1 has no caps, windows or own scale
        kwargs.update(gemma_config(reader, family, num_layers, hidden, n_head, int(head_dim)))
    elif family == "mixtral" and (window := _field(reader, f"{arch}.attention.sliding_window")):
        kwargs["sliding_window"] = int(window)
    if ROPE_FREQS in weights:
        if family != "llama":
            raise ValueError(f"GGUF tensor {ROPE_FREQS!r} is supported for llama files only, not {family}")
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
    """Convert a GGUF file of a supported family (llama, qwen2, qwen3, phi3, qwen2moe,
    qwen3moe, Mixtral) into an HF-format directory at ``out_dir``.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (HF tensor
    names, llama q/k rows un-permuted, stacked experts split per expert; quantized weights
    as ``<name>.qs/.d/.m`` listed in the file's ``livelm.quant`` metadata, see
    livelm/quant/storage.py) and the tokenizer files with the chat template. The result is
    built in a temporary sibling directory and renamed into place, so an interrupted
    conversion never leaves a partial ``out_dir``; an existing ``out_dir`` is replaced.
    Raises ValueError for a sha256 mismatch (when ``expected_sha256`` is given), an
    unsupported architecture, tensor type or tensor name, and a missing metadata key or
    tensor the family needs.
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
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} in {gguf_path} is not supported; "
            f"supported: {', '.join(GGUF_ARCHITECTURES)} (Mixtral as llama)"
        )
    names = {t.name for t in reader.tensors}
    family = gguf_family(arch, names)
    _check_tensors(reader, family)  # names and types before any slow work, so a bad file fails fast
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"GGUF file {gguf_path} carries no tokenizer (tokenizer.ggml.tokens)")
    num_layers = int(require(reader, f"{arch}.block_count", family))
    check_layer_tensors(names, family, num_layers, shared_expert=family == "qwen2moe")
    n_head = int(require(reader, f"{arch}.attention.head_count", family))
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        logger.info(
            "converting %s (%s, %d tensors) to %s", gguf_path, family, len(reader.tensors), out_dir
        )
        weights = _read_weights(reader, family, n_head, n_head_kv)
        _build_config(reader, arch, family, weights, names).save_pretrained(tmp)
        _write_generation_config(reader, tmp)
        for name in (ROPE_FREQS, *ROPE_FACTORS):
            weights.pop(name, None)  # now the config's rope_scaling
        tensors, metadata = flatten_for_safetensors(weights)
        save_file(tensors, str(tmp / "model.safetensors"), metadata=metadata)
        del weights
        _write_tokenizer(gguf_path, reader, tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
