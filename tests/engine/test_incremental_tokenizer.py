"""Text arriving in pieces tokenizes exactly like the whole text at once."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import build_tokenizer
from tokenizer_builders import llama2_style, unigram_metaspace
from transformers import AutoTokenizer

from livelm.engine.incremental_tokenizer import StreamingTextInput

TEXT = (
    "The quick brown fox jumps over the lazy dog. Le café coûte trois euros, très bien! "
    "日本語のテキストも少し含めます。 Emoji 🚀🔥✨ and numbers 3.14159 and 12345.\n\n"
    "def add(a, b):\n    return a + b   # trailing  spaces  "
) * 2


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d)
    return {"byte_bpe": AutoTokenizer.from_pretrained(d), "llama2": llama2_style(), "unigram": unigram_metaspace()}


def _pieces(data, cuts):
    cuts = sorted(set(c for c in cuts if 0 < c < len(data)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# Not the llama2-style test tokenizer: it has no pre-tokenizer and learned merges across
# "▁" ("▁The▁quick▁bro"), which real SentencePiece models never do, so none of its
# boundaries is stable until the input closes (close() still makes its tokens exact).
@pytest.mark.parametrize("name", ["byte_bpe", "unigram"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, len(TEXT.encode())), max_size=30), as_bytes=st.booleans())
def test_random_chunkings_commit_only_stable_tokens(tokenizers, name, cuts, as_bytes):
    tok = tokenizers[name]
    data = TEXT.encode() if as_bytes else TEXT
    if not as_bytes:
        cuts = [c % (len(TEXT) + 1) for c in cuts]
    stream = StreamingTextInput(tok)
    expected = tok(TEXT).input_ids
    for piece in _pieces(data, cuts):
        update = stream.append(piece)
        # Nothing committed is ever taken back: every commit is a prefix of the final ids.
        assert update.keep == len(stream.committed_ids) - len(update.append)
        assert stream.committed_ids == expected[: len(stream.committed_ids)]
    before_close = len(stream.committed_ids)
    final = stream.close()
    assert final.keep == before_close, "a committed token changed at close"
    assert stream.committed_ids == expected


def test_long_input_commits_as_it_arrives(tokenizers):
    tok = tokenizers["byte_bpe"]
    stream = StreamingTextInput(tok)
    for word in TEXT.split(" "):
        stream.append(word + " ")
    # All but a short tail is committed before the input is closed.
    assert len(stream.pending_text) < 40
    assert len(stream.committed_ids) > len(tok(TEXT).input_ids) - 20


def test_replace_keeps_the_longest_common_prefix(tokenizers):
    tok = tokenizers["byte_bpe"]
    stream = StreamingTextInput(tok)
    stream.append("The quick brown fox jumps over the lazy dog. Paris is the capital ")
    old = list(stream.committed_ids)
    update = stream.replace("The quick brown cat jumps over the lazy dog. Paris is the capital ")
    first_diff = next(i for i, (a, b) in enumerate(zip(old, stream.committed_ids, strict=False)) if a != b)
    assert update.keep == first_diff
    assert stream.committed_ids[: update.keep] == old[: update.keep]
    stream.close()
    assert stream.committed_ids == tok("The quick brown cat jumps over the lazy dog. Paris is the capital ").input_ids


def test_cross_word_merges_are_corrected_at_close(tokenizers):
    tok = tokenizers["llama2"]
    stream = StreamingTextInput(tok)
    for i in range(0, len(TEXT), 37):
        stream.append(TEXT[i : i + 37])
    stream.close()
    assert stream.committed_ids == tok(TEXT).input_ids


def test_errors_after_close_and_bad_chunks(tokenizers):
    stream = StreamingTextInput(tokenizers["byte_bpe"])
    with pytest.raises(ValueError, match="str or bytes"):
        stream.append(3)
    stream.append("hello")
    stream.close()
    with pytest.raises(ValueError, match="closed"):
        stream.append(" more")
    with pytest.raises(ValueError, match="closed"):
        stream.replace("x")


def test_appends_tokenize_only_the_uncommitted_tail(tokenizers):
    tok = tokenizers["byte_bpe"]
    stream = StreamingTextInput(tok)
    assert stream._tail_only  # byte-level BPE: a tail after " word" tokenizes alone
    assert not StreamingTextInput(tokenizers["llama2"])._tail_only  # merges across "▁": no
    seen: list[int] = []
    calls = tok.__class__.__call__

    def recording(self, text, *args, **kwargs):
        seen.append(len(text))
        return calls(self, text, *args, **kwargs)

    text = TEXT * 8
    words = text.split(" ")
    try:
        tok.__class__.__call__ = recording
        for word in words:
            stream.append(word + " ")
    finally:
        tok.__class__.__call__ = calls
    # Each append tokenized its piece plus the held-back tail, never the whole text.
    assert len(seen) == len(words)
    assert max(seen) < 120 < len(text)
    stream.close()
    assert stream.committed_ids == tok(text + " ").input_ids


@pytest.mark.parametrize("name", ["byte_bpe", "unigram"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, 1200), max_size=25))
def test_long_runs_without_spaces_are_exact_at_close(tokenizers, name, cuts):
    # 600 characters without a space: commits fall back to a hold-back distance, which is
    # not a pre-token boundary, so the next append must tokenize from the start again.
    tok = tokenizers[name]
    text = "Intro words here. " + "日本語のテキスト" * 75 + " and then words again, " + TEXT
    stream = StreamingTextInput(tok)
    for piece in _pieces(text, [c % (len(text) + 1) for c in cuts]):
        stream.append(piece)
    stream.close()
    assert stream.committed_ids == tok(text).input_ids
