"""Tiny random-weight models (Llama, Qwen2, Qwen3) and a byte-level BPE tokenizer, built at
test time in a temporary directory so that no test downloads anything."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Streaming inputs arrive in chunks while the model keeps working on them.",
    "Le café coûte trois euros. Ça va très bien, merci! Naïve façade.",
    "日本語のテキストも少し含めます。東京は日本の首都です。",
    "Emoji too: 🚀🔥✨ and math: ∑ ∫ √ π ≈ 3.14159.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation !?.,;:'\"()[]{}",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB = 400


def build_tokenizer(out_dir: Path) -> None:
    """Train a small byte-level BPE tokenizer and save it (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)


def _common_config(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_tiny_model(out_dir: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model of ``arch`` ("llama", "qwen2", "qwen3") to ``out_dir``."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    vocab = TOKENIZER_VOCAB + 16  # a few unused rows, as real checkpoints often have
    cfg = _common_config(vocab)
    cfg.update(overrides)
    if arch == "llama":
        cfg.setdefault("tie_word_embeddings", False)
        config, cls = LlamaConfig(**cfg), LlamaForCausalLM
    elif arch == "qwen2":
        cfg.setdefault("tie_word_embeddings", True)
        config, cls = Qwen2Config(**cfg), Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg.setdefault("tie_word_embeddings", True)
        cfg.setdefault("head_dim", 32)
        config, cls = Qwen3Config(**cfg), Qwen3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    # Random init gives near-uniform logits; scale weights up so greedy argmax is decisive
    # (ties would make the token-identity oracle test flaky for reasons unrelated to us).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen = {"bos_token_id": 0, "eos_token_id": 2}
    (out_dir / "generation_config.json").write_text(json.dumps(gen))
    return out_dir
