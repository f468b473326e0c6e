"""Tiny random-weight models (Llama, Mistral, Qwen2, Qwen3, Phi-3, and the mixture-of-experts
Qwen2-MoE, Qwen3-MoE and Mixtral) and a byte-level BPE tokenizer, built at
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


# Mixture-of-experts shapes: 8 experts, 2 per token, so that a batch reaches every expert.
MOE_CONFIG = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48)


def _hf_classes(arch: str, cfg: dict):
    """(config, model class) of ``arch``, with the family's own defaults filled into cfg."""
    import transformers as t

    if arch == "llama":
        cfg.setdefault("tie_word_embeddings", False)
        return t.LlamaConfig(**cfg), t.LlamaForCausalLM
    if arch == "mistral":
        cfg.setdefault("tie_word_embeddings", False)
        cfg.setdefault("sliding_window", None)  # transformers' default (4096) would not slide here
        return t.MistralConfig(**cfg), t.MistralForCausalLM
    if arch == "qwen2":
        cfg.setdefault("tie_word_embeddings", True)
        return t.Qwen2Config(**cfg), t.Qwen2ForCausalLM
    if arch == "qwen3":
        cfg.setdefault("tie_word_embeddings", True)
        cfg.setdefault("head_dim", 32)
        return t.Qwen3Config(**cfg), t.Qwen3ForCausalLM
    if arch == "phi3":
        cfg.setdefault("tie_word_embeddings", False)
        cfg.setdefault("pad_token_id", 0)
        return t.Phi3Config(**cfg), t.Phi3ForCausalLM
    if arch == "qwen2_moe":
        cfg.setdefault("tie_word_embeddings", False)
        cfg.update({k: cfg.get(k, v) for k, v in MOE_CONFIG.items()})
        cfg.setdefault("shared_expert_intermediate_size", 64)
        cfg.setdefault("decoder_sparse_step", 1)
        cfg.setdefault("norm_topk_prob", False)
        return t.Qwen2MoeConfig(**cfg), t.Qwen2MoeForCausalLM
    if arch == "qwen3_moe":
        cfg.setdefault("tie_word_embeddings", False)
        cfg.setdefault("head_dim", 32)
        cfg.update({k: cfg.get(k, v) for k, v in MOE_CONFIG.items()})
        cfg.setdefault("decoder_sparse_step", 1)
        cfg.setdefault("norm_topk_prob", True)
        return t.Qwen3MoeConfig(**cfg), t.Qwen3MoeForCausalLM
    if arch == "mixtral":
        cfg.setdefault("tie_word_embeddings", False)
        cfg["num_local_experts"] = cfg.pop("num_experts", MOE_CONFIG["num_experts"])
        cfg.setdefault("num_experts_per_tok", MOE_CONFIG["num_experts_per_tok"])
        # Mixtral's experts are its MLP: moe_intermediate_size (default 48) sizes them.
        cfg["intermediate_size"] = cfg.pop("moe_intermediate_size", None) or 48
        return t.MixtralConfig(**cfg), t.MixtralForCausalLM
    if arch == "gemma3_multimodal":  # Gemma 3 4B+: a Gemma 3 text model beside a vision tower
        text_cls, _ = _hf_classes("gemma3", cfg)
        vision = t.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14)
        config = t.Gemma3Config(text_config=text_cls, vision_config=vision, mm_tokens_per_image=4,
                                tie_word_embeddings=cfg["tie_word_embeddings"])
        return config, t.Gemma3ForConditionalGeneration
    if arch == "gemma":
        cfg.setdefault("tie_word_embeddings", False)  # untied: see gemma2 / gemma3 below
        cfg.setdefault("head_dim", 16)
        cfg.setdefault("hidden_act", "gelu")  # the released configs' legacy name for the tanh GELU
        return t.GemmaConfig(**cfg), t.GemmaForCausalLM
    if arch in ("gemma2", "gemma3"):
        # Untied by default although released Gemmas tie: a tiny random tied head mostly
        # repeats one token (its own embedding's direction), a weak oracle.
        cfg.setdefault("tie_word_embeddings", False)
        cfg.setdefault("head_dim", 16)
        cfg.setdefault("query_pre_attn_scalar", 24)  # not head_dim: the scale is its own field
        cfg.setdefault("sliding_window", 24)
        if arch == "gemma2":  # its layers alternate sliding, global, ...
            cfg.setdefault("attn_logit_softcapping", 1.5)  # caps that bite: tiny random scores are small
            cfg.setdefault("final_logit_softcapping", 4.0)
            return t.Gemma2Config(**cfg), t.Gemma2ForCausalLM
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["num_hidden_layers"])]
        cfg.setdefault("layer_types", types)
        return t.Gemma3TextConfig(**cfg), t.Gemma3ForCausalLM
    raise ValueError(arch)


def build_tiny_model(out_dir: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model of ``arch`` ("llama", "mistral", "qwen2", "qwen3", "phi3",
    "qwen2_moe", "qwen3_moe", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_multimodal") to ``out_dir``; ``overrides`` go to its config."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    vocab = TOKENIZER_VOCAB + 16  # a few unused rows, as real checkpoints often have
    cfg = _common_config(vocab)
    cfg.update(overrides)
    config, cls = _hf_classes(arch, cfg)
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    # Gemma multiplies embeddings by sqrt(hidden_size): unit-variance rows after it (larger
    # ones make its tied head repeat the input token, a degenerate oracle).
    embed_std = getattr(config, "text_config", config).hidden_size ** -0.5 if arch.startswith("gemma") else 1.0
    # Random init gives near-uniform logits; scale weights up so greedy argmax is decisive
    # (ties would make the token-identity oracle test flaky for reasons unrelated to us).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() >= 2:  # matrices, and MoE experts stacked [E, out, in]
                p.normal_(0.0, 0.08 if "embed" not in name else embed_std)
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen = {"bos_token_id": 0, "eos_token_id": 2}
    (out_dir / "generation_config.json").write_text(json.dumps(gen))
    return out_dir


def build_layer_draft(target_dir: Path, out_dir: Path, num_layers: int = 1) -> Path:
    """A draft model for speculative decoding: ``target_dir``'s model cut to its first
    ``num_layers`` layers (embedding, head and tokenizer kept), so it shares the target's
    vocabulary and often, not always, predicts the target's greedy token."""
    import shutil

    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(target_dir).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out_dir / f.name)
    config = json.loads((Path(target_dir) / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    (out_dir / "config.json").write_text(json.dumps(config))
    tensors = {}
    for f in Path(target_dir).glob("*.safetensors"):
        for name, t in load_file(str(f)).items():
            parts = name.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) >= num_layers:
                continue
            tensors[name] = t
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
