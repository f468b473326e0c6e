"""IncrementalDetokenizer and detokenize_token against ``tokenizer.decode`` as the oracle.

Three offline tokenizers cover the decoder families that matter: the byte-level BPE of
``tiny_models`` (GPT-2 / SmolLM2 / Qwen style, tokens split UTF-8 characters), a Llama-2
style BPE (normalizer adds "▁", byte fallback, decoder Replace+ByteFallback+Fuse+Strip)
and a Unigram with a Metaspace pre-tokenizer and decoder plus byte fallback.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import build_tokenizer
from tokenizer_builders import llama2_style, unigram_metaspace
from transformers import AutoTokenizer

from livelm.engine.detokenizer import IncrementalDetokenizer, detokenize_token

FFFD = "\ufffd"
EXAMPLES = 200  # per tokenizer; raise it locally to hunt for counterexamples

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Le café coûte trois euros. Ça va très bien, merci! Naïve façade.",
    "日本語のテキストも少し含めます。東京は日本の首都です。",
    "Emoji too: 🚀🔥✨ and math: ∑ ∫ √ π ≈ 3.14159.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Unseen: Ωμέγα Ж ħ 𝄞 漢字 한국어 👩‍👩‍👧 ok",
    "  leading spaces, double  spaces and a trailing one ",
]
@pytest.fixture(scope="module")
def tokenizers_by_name(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bpe_tokenizer")
    build_tokenizer(out)
    return {
        "byte_bpe": AutoTokenizer.from_pretrained(out),
        "llama2": llama2_style(),
        "unigram": unigram_metaspace(),
    }


TOKENIZER_NAMES = ["byte_bpe", "llama2", "unigram"]


def _decode(tok, ids: list[int], skip: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def _stream(tok, prompt: list[int], ids: list[int], sizes: list[int], skip: bool = True):
    """Feed ``ids`` in groups of ``sizes`` (cycled); return (deltas, finish text, det)."""
    det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)] if sizes else 1
        deltas.append(det.add_tokens(ids[i : i + n]))
        i, k = i + n, k + 1
    tail = det.finish()
    return deltas, tail, det


def _is_byte_token(tok, token_id: int) -> bool:
    token = tok.convert_ids_to_tokens(token_id)
    return isinstance(token, str) and len(token) == 6 and token.startswith("<0x")


# --- real text -------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
@pytest.mark.parametrize("text", TEXTS)
def test_real_text_one_token_at_a_time(tokenizers_by_name: dict, name: str, text: str) -> None:
    tok = tokenizers_by_name[name]
    ids = tok.encode(text, add_special_tokens=False)
    expected = _decode(tok, ids)
    det = IncrementalDetokenizer(tok, [])
    for k, token_id in enumerate(ids, start=1):
        delta = det.add_tokens([token_id])
        assert FFFD not in delta  # valid text never shows a half character
        assert expected.startswith(det.text)
        # Latency: all text up to the last complete character is out, except an open
        # byte-fallback run, which is settled by the next ordinary token.
        if not _is_byte_token(tok, token_id):
            assert det.text == _decode(tok, ids[:k]).rstrip(FFFD), k
    tail = det.finish()
    # Only an open byte-fallback run at the very end is still held (see the module doc).
    assert tail == "" or _is_byte_token(tok, ids[-1])
    assert det.text == expected
    assert det.token_ids == ids


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_split_characters_are_held_until_complete(tokenizers_by_name: dict, name: str) -> None:
    tok = tokenizers_by_name[name]
    text = "👩 漢字 Ж 🚀日本 ok"  # the first few are in no training corpus
    ids = tok.encode(text, add_special_tokens=False)
    single = [_decode(tok, [i]) for i in ids]
    assert any(FFFD in s for s in single), "test needs tokens that split a character"
    deltas, tail, det = _stream(tok, [], ids, [1])
    assert "".join(deltas) + tail == text
    assert all(FFFD not in d for d in deltas + [tail])


@pytest.mark.parametrize("name", ["llama2", "unigram"])
def test_sentencepiece_prompt_context_keeps_leading_space(
    tokenizers_by_name: dict, name: str
) -> None:
    tok = tokenizers_by_name[name]
    prompt = tok.encode("The quick", add_special_tokens=False)
    out = tok.encode("brown fox", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(out[0]).startswith("▁")
    deltas, tail, _ = _stream(tok, prompt, out, [1])
    text = "".join(deltas) + tail
    # Appended to the prompt's text the completion reads right...
    assert _decode(tok, prompt) + text == _decode(tok, prompt + out) == "The quick brown fox"
    # ...while decode() of the output alone drops the first token's space.
    assert text == " " + _decode(tok, out)
    # With no prompt (or a prompt with no visible text) the output is decoded standalone.
    for prompt in ([], [tok.bos_token_id]):
        deltas, tail, _ = _stream(tok, prompt, out, [1])
        assert "".join(deltas) + tail == _decode(tok, out)


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_prompt_ending_inside_a_character(tokenizers_by_name: dict, name: str) -> None:
    tok = tokenizers_by_name[name]
    ids = tok.encode("ok 🚀🔥 done", add_special_tokens=False)
    for split in range(1, len(ids)):
        prompt, out = ids[:split], ids[split:]
        deltas, tail, _ = _stream(tok, prompt, out, [1])
        text = "".join(deltas) + tail
        # Output bytes are decoded on their own: a character begun in the prompt is not
        # completed into the output (it reads as U+FFFD, as decode(out) has it).
        assert text.lstrip(" ") == _decode(tok, out).lstrip(" ")


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_special_tokens(tokenizers_by_name: dict, name: str) -> None:
    tok = tokenizers_by_name[name]
    eos = tok.eos_token_id
    text_ids = tok.encode("a the cat café 🚀", add_special_tokens=False)
    for k in range(len(text_ids) + 1):  # a special token at every position, then a final one
        ids = text_ids[:k] + [eos] + text_ids[k:] + [eos]
        for skip in (True, False):
            deltas, tail, _ = _stream(tok, [], ids, [1], skip=skip)
            assert "".join(deltas) + tail == _decode(tok, ids, skip=skip), (k, skip)
    assert tok.eos_token in "".join(_stream(tok, [], ids, [1], skip=False)[0])


@pytest.mark.parametrize("name", ["llama2", "unigram"])
def test_byte_run_spans_a_skipped_special_token(tokenizers_by_name: dict, name: str) -> None:
    tok = tokenizers_by_name[name]
    byte = {b: tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    euro = [byte[0xE2], byte[0x82], byte[0xAC]]
    word = tok.encode("the", add_special_tokens=False)
    eos = tok.eos_token_id
    # With skip_special_tokens the decoder sees one run E2 82 AC FF: all of it turns to
    # U+FFFD, so the valid-looking "€" must not be emitted before the run ends.
    for tail in ([byte[0xFF]], euro):
        ids = word + euro + [eos] + tail + word
        for skip in (True, False):
            for size in range(1, 7):  # every way the run can fall into add_tokens calls
                for first in range(1, size + 1):
                    deltas, rest, _ = _stream(tok, [], ids, [first, size], skip=skip)
                    assert "".join(deltas) + rest == _decode(tok, ids, skip=skip), (tail, skip)


def test_add_tokens_edge_cases(tokenizers_by_name: dict) -> None:
    tok = tokenizers_by_name["byte_bpe"]
    det = IncrementalDetokenizer(tok, tok.encode("Hi"))
    assert det.add_tokens([]) == ""
    assert det.text == "" and det.token_ids == []
    det.add_tokens(tok.encode(" there"))
    assert det.finish() == "" and det.finished and det.finish() == ""
    assert det.text == " there"
    with pytest.raises(RuntimeError):
        det.add_tokens([5])


# --- random ids: the property test ----------------------------------------------------


def _id_sequences(tok) -> st.SearchStrategy[list[int]]:
    """Random ids (including a few the tokenizer does not know, as a model with padded
    embeddings can sample) mixed with stretches of real text tokens."""
    n = len(tok)
    byte_ids = [i for i in range(n) if _is_byte_token(tok, i)]
    specials = sorted(set(tok.all_special_ids))
    # Tokens that begin with a space marker, whose space decoders like to strip.
    spaced = [
        i for i, t in enumerate(tok.convert_ids_to_tokens(list(range(n)))) if t[:1] in ("▁", "Ġ")
    ]
    texts = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    piece = st.one_of(
        st.lists(st.integers(0, n + 15), min_size=1, max_size=4),
        st.lists(st.sampled_from(specials), min_size=1, max_size=2),
        st.lists(st.sampled_from(spaced), min_size=1, max_size=2),
        st.builds(
            lambda ids, a, b: ids[min(a, b) : max(a, b) + 1],
            st.sampled_from(texts),
            st.integers(0, 60),
            st.integers(0, 60),
        ),
    )
    if byte_ids:  # runs of byte tokens, random or spelling valid UTF-8
        by_value = {tok.convert_ids_to_tokens(i): i for i in byte_ids}
        utf8_run = st.text(min_size=1, max_size=2).map(
            lambda t: [by_value[f"<0x{b:02X}>"] for b in t.encode("utf-8")]
        )
        piece = st.one_of(
            piece, st.lists(st.sampled_from(byte_ids), min_size=1, max_size=5), utf8_run
        )
    return st.lists(piece, max_size=12).map(lambda parts: [i for p in parts for i in p])


def _random_stream_test(tok, sentencepiece: bool) -> None:
    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    # (prompt, ends cleanly): after a clean end the output is exactly what it adds to the
    # prompt's text; after a prompt ending inside a character (or a byte-fallback run)
    # the output's bytes are decoded on their own.
    prompts = [
        ([], True),
        (enc("Answer: the"), True),
        (enc("The quick") + [tok.eos_token_id], True),
        ([tok.eos_token_id], True),
        (enc("ok 🚀")[:-1], False),
        (enc("ok 👩")[:-1], False),
    ]

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        ids=_id_sequences(tok),
        sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
        skip=st.booleans(),
        prompt_case=st.sampled_from(prompts),
    )
    def check(ids: list[int], sizes: list[int], skip: bool, prompt_case: tuple) -> None:
        prompt, clean = prompt_case
        deltas, tail, det = _stream(tok, prompt, ids, sizes, skip=skip)
        text = "".join(deltas) + tail
        assert det.text == text and det.token_ids == ids
        # The oracle is decode(). Each delta is final, so a U+FFFD in a delta is one the
        # full decode has at that spot too.
        standalone = _decode(tok, ids, skip)
        assert text == standalone or (sentencepiece and prompt and text == " " + standalone)
        if clean:
            full, head = _decode(tok, prompt + ids, skip), _decode(tok, prompt, skip)
            assert full.startswith(head)
            assert text == full[len(head) :]

    check()


def _random_text_test(tok) -> None:
    alphabet = st.one_of(
        st.sampled_from(list("ab é日本🚀▁\n")),
        st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters=FFFD),
    )

    @settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=st.text(alphabet, max_size=30), sizes=st.lists(st.integers(1, 3), min_size=1))
    def check(text: str, sizes: list[int]) -> None:
        ids = tok.encode(text, add_special_tokens=False)
        deltas, tail, _ = _stream(tok, [], ids, sizes)
        expected = _decode(tok, ids)
        assert "".join(deltas) + tail == expected
        if FFFD not in expected:  # (a tokenizer may not round-trip every code point)
            assert all(FFFD not in d for d in deltas + [tail])  # never a half character

    check()


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_random_text_never_shows_half_characters(tokenizers_by_name: dict, name: str) -> None:
    _random_text_test(tokenizers_by_name[name])


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_random_ids_match_decode(tokenizers_by_name: dict, name: str) -> None:
    _random_stream_test(tokenizers_by_name[name], sentencepiece=name != "byte_bpe")


# --- cost: a small window, whatever the length -----------------------------------------


class _CountingTokenizer:
    """Delegates to a tokenizer and records the length of every decode call."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self._tok.decode(ids, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tok, name)


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_window_stays_small(tokenizers_by_name: dict, name: str) -> None:
    tok = tokenizers_by_name[name]
    ids = tok.encode(" ".join(TEXTS * 6), add_special_tokens=False)
    assert len(ids) > 500
    counting = _CountingTokenizer(tok)
    prompt = tok.encode("Say:", add_special_tokens=False)
    det = IncrementalDetokenizer(counting, prompt)
    for token_id in ids:
        det.add_tokens([token_id])
    det.finish()
    head = _decode(tok, prompt)
    assert det.text == _decode(tok, prompt + ids)[len(head) :]
    # Every decode looks at a handful of ids; only a byte-fallback run, which the decoder
    # must see whole, makes a window longer.
    longest_run = run = 0
    for token_id in ids:
        run = run + 1 if _is_byte_token(tok, token_id) else 0
        longest_run = max(longest_run, run)
    assert max(counting.lengths) <= longest_run + 6
    assert sum(counting.lengths) / len(ids) < 8
    assert len(counting.lengths) < 3 * len(ids)


# --- decoded_token strings ---------------------------------------------------------------


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_detokenize_token(tokenizers_by_name: dict, name: str) -> None:
    tok = tokenizers_by_name[name]
    ids = tok.encode("Hello the world", add_special_tokens=False)
    words = [detokenize_token(tok, i) for i in ids]
    assert "".join(words).strip() == "Hello the world"
    assert any(w.startswith(" ") for w in words)  # spaces are kept, also with "▁" tokens
    assert detokenize_token(tok, tok.eos_token_id) == tok.eos_token
    assert detokenize_token(tok, len(tok) + 10) == ""
    partial = tok.encode("👩", add_special_tokens=False)
    assert FFFD in "".join(detokenize_token(tok, i) for i in partial)
