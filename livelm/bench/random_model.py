"""A random-weight Llama of SmolLM2-135M's shape, with a full-vocabulary tokenizer.

The model behind ``livelm bench --random-weights`` and the ``--random-smollm2-shape``
flag of the ``benchmarks/`` scripts. Nothing here downloads anything: the model and its
tokenizer are built locally.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json).
SMOLLM2_135M_SHAPE: dict = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=0,
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
_BUILD_MARKER = ".livelm-benchmark-model-v1"


def build_full_vocab_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Save a byte-level BPE tokenizer whose vocabulary has exactly ``vocab_size`` ids.

    Ids 0-2 are SmolLM2's special tokens, then the 256 byte-level symbols, then synthetic
    ASCII word pieces (``"Ġab"``, ``"abc"``, ...) each with its merge rule, so that every
    id the model can sample decodes to real text, as with a real checkpoint's tokenizer
    (a small tokenizer would make the detokenizer see unknown ids and emit nothing).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    chars += [chr(c) for c in range(ord("A"), ord("Z") + 1)] + list("0123456789")
    merges: list[tuple[str, str]] = []

    def add(left: str, right: str) -> str | None:
        piece = left + right
        if len(vocab) >= vocab_size or piece in vocab:
            return None
        vocab[piece] = len(vocab)
        merges.append((left, right))
        return piece

    pairs = [p for a in ["Ġ", *chars] for b in chars if (p := add(a, b)) is not None]
    for left in pairs:
        for right in chars:
            add(left, right)
    if len(vocab) < vocab_size:
        raise ValueError(f"cannot synthesize {vocab_size} tokens (got {len(vocab)})")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.save_pretrained(out_dir)


def build_random_smollm2_shape(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight Llama of SmolLM2-135M's shape in ``out_dir`` (built once, then reused).

    Weights use transformers' default init (normal, std 0.02), fp32, safetensors. The
    tokenizer is :func:`build_full_vocab_tokenizer`'s (49152 ids, no download).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / _BUILD_MARKER).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_full_vocab_tokenizer(out, SMOLLM2_135M_SHAPE["vocab_size"])
    torch.manual_seed(seed)
    config = LlamaConfig(**SMOLLM2_135M_SHAPE)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    gen = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(gen))
    (out / _BUILD_MARKER).write_text(f"built in {time.perf_counter() - t0:.1f}s\n")
    return out


def random_default_shape_model(cache_dir: Path | None = None) -> Path:
    """A random-weight Llama of the default model's (SmolLM2-135M's) shape, built once."""
    from livelm.models.default_model import cache_root

    out = (cache_dir or cache_root()) / "bench" / "random-smollm2-135m-shape"
    return build_random_smollm2_shape(out)
