"""Offline SentencePiece-style tokenizers for tests (Llama-2-like BPE, Unigram+Metaspace)."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Le café coûte trois euros. Ça va très bien, merci!",
    "日本語のテキストも少し含めます。",
    "Emoji 🚀🔥✨ math ∑ ∫",
] * 4
_SP_SPECIALS = ["<unk>", "<s>", "</s>"]
_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def llama2_style() -> PreTrainedTokenizerFast:
    """BPE + byte fallback laid out like Llama-2: <unk> <s> </s>, 256 byte tokens, pieces."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    # A fixed small alphabet leaves most accented, CJK and emoji characters to byte
    # fallback (and keeps training deterministic: no ties in choosing the alphabet).
    alphabet = sorted(set("▁abcdefghijklmnopqrstuvwxyzTLEÇé.,!:"))
    trainer = trainers.BpeTrainer(
        vocab_size=120, initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False
    )
    trained.train_from_iterator(_SP_CORPUS, trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(_SP_SPECIALS + _BYTE_TOKENS)}
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    )
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(_SP_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def unigram_metaspace() -> PreTrainedTokenizerFast:
    """Unigram + byte fallback with a Metaspace pre-tokenizer and decoder (T5/Gemma-like).

    The vocabulary is written by hand (Unigram training is not deterministic): single
    characters, a few "▁word" pieces, and byte fallback for every other character.
    """
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzTLEÇé.,!:'0123456789日本🚀"))
    words = ["▁the", "▁quick", "▁brown", "▁fox", "▁café", "▁c", "▁a", "▁très", "th", "ing"]
    vocab = [(p, 0.0) for p in _SP_SPECIALS + _BYTE_TOKENS]
    vocab += [("▁", -2.0)] + [(w, -3.0) for w in words] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    tok.add_special_tokens(_SP_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
