"""Tokenizing text that arrives in pieces, committing only tokens that cannot change.

Appending text can change how the end of the text tokenizes ("hel" + "lo" is not
"hel", "lo"), so the tail after the last safe boundary stays uncommitted and is
re-tokenized when the next piece arrives. A boundary is safe where a token ends right
before a whitespace-led word: Hugging Face's byte-level and SentencePiece
pre-tokenizers never merge across it, so the tokens before it are those of the whole
text. Pieces may be bytes that split a multi-byte character; the partial character
waits for its remaining bytes.
"""

from __future__ import annotations

import codecs
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from livelm.core.token_ids import common_prefix_len

if TYPE_CHECKING:  # a type only: importing transformers costs ~0.7 s of start-up
    from transformers import PreTrainedTokenizerBase

# Without a whitespace boundary (long CJK runs, minified code), commit tokens that end at
# least this many characters before the end, so the pending tail stays bounded; the
# final check in `close()` recomputes from any token that changed after all.
_FALLBACK_HOLDBACK_CHARS = 256


@dataclass(frozen=True)
class InputUpdate:
    """Token ids to feed the engine: keep the first ``keep`` committed ids, then append."""

    keep: int
    append: list[int]


class StreamingTextInput:
    """The growing text of a streamed prompt and its committed token ids."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.closed = False
        self._prefix_ids, self._prefix_only, self._tail_only = _tokenizer_traits(tokenizer)
        self._encoded: tuple[str, list[int]] | None = None  # (text, current_ids() of it)
        self.committed_ids: list[int] = list(self._prefix_ids)
        self._committed_chars = 0
        self._committed_at_boundary = False  # the commit point is a safe boundary (a tail may start there)

    @property
    def pending_text(self) -> str:
        """Text received but not yet committed as tokens."""
        return self.text[self._committed_chars :]

    def append(self, chunk: str | bytes) -> InputUpdate:
        """Add a piece of text (bytes may split a character); returns newly stable ids."""
        if self.closed:
            raise ValueError("input is closed: no more text can be appended")
        if isinstance(chunk, bytes):
            chunk = self._decoder.decode(chunk)
        elif not isinstance(chunk, str):
            raise ValueError("a text chunk must be str or bytes")
        self.text += chunk
        tail_only = self._tail_only and self._committed_at_boundary
        return self._commit_stable(self._committed_chars if tail_only else 0)

    def replace(self, text: str) -> InputUpdate:
        """Revise the whole input (update mode): keep the longest common token prefix."""
        if self.closed:
            raise ValueError("input is closed: it can no longer be replaced")
        self._decoder.reset()
        self.text = text
        return self._commit_stable()

    def current_ids(self) -> list[int]:
        """Tokens of all text so far, as a one-shot prompt of it would be tokenized."""
        if self._encoded is None or self._encoded[0] != self.text:
            self._encoded = (self.text, self.tokenizer(self.text).input_ids)
        return list(self._encoded[1])

    def checkpoint(self) -> tuple:
        """Everything :meth:`restore` needs to undo later calls (a refused chunk)."""
        return (self.text, list(self.committed_ids), self._committed_chars, self._committed_at_boundary, self.closed,
                self._decoder.getstate())

    def restore(self, checkpoint: tuple) -> None:
        """Return to the state of a :meth:`checkpoint`."""
        self.text, committed, self._committed_chars, self._committed_at_boundary, self.closed, decoder_state = checkpoint
        self.committed_ids = list(committed)
        self._decoder.setstate(decoder_state)

    def close(self) -> InputUpdate:
        """No more input: commit the tail, correcting any token that changed after all."""
        if not self.closed:
            tail = self._decoder.decode(b"", final=True)
            self.text += tail
            self.closed = True
        final = self.current_ids()
        keep = common_prefix_len(self.committed_ids, final)
        self.committed_ids = final
        self._committed_chars = len(self.text)
        return InputUpdate(keep, final[keep:])

    def _commit_stable(self, start: int = 0) -> InputUpdate:
        """Commit the tokens before the last safe boundary, tokenizing from ``start`` (0, or
        the last commit point when tails tokenize alone: its tokens are committed already)."""
        # From 0 the whole text is tokenized: a tail alone would differ at its start for
        # SentencePiece-style normalizers that prepend "▁" to every input.
        enc = self.tokenizer(self.text[start:], add_special_tokens=False, return_offsets_mapping=True)
        offsets = [(a + start, b + start) for a, b in enc["offset_mapping"]]
        head = self.committed_ids if start else self._prefix_ids
        if self._prefix_only:
            self._encoded = (self.text, head + enc["input_ids"])
        cut_token, cut_char, at_boundary = _safe_cut(self.text, offsets)
        stable = head + enc["input_ids"][:cut_token]
        keep = common_prefix_len(self.committed_ids, stable)
        self.committed_ids = stable
        if cut_token:
            self._committed_chars, self._committed_at_boundary = cut_char, at_boundary
        elif not start:
            self._committed_chars, self._committed_at_boundary = 0, False
        return InputUpdate(keep, stable[keep:])


@functools.lru_cache(maxsize=16)
def _tokenizer_traits(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], bool, bool]:
    """What a stream needs to know about its tokenizer, probed once per tokenizer:

    - the special tokens a one-shot encode puts before the text (a BOS);
    - whether a one-shot encode is just those ids + the plain encode (no EOS or other
      special tokens after the text): then the encode done for committing also gives
      current_ids(), and the last piece, close_input and a reply tokenize once, not 3x;
    - whether the text after a safe boundary tokenizes alone as it does inside the whole
      text (byte-level BPE: yes; a normalizer that prepends "▁" or strips: no): then an
      append tokenizes only the uncommitted tail, so a stream that runs for hours costs
      the same per piece as a fresh one.
    """
    prefix_ids = tokenizer("", add_special_tokens=True).input_ids
    prefix_only = all(
        tokenizer(t).input_ids == prefix_ids + tokenizer(t, add_special_tokens=False).input_ids
        for t in ("Hello world", " a b\n")
    )
    return prefix_ids, prefix_only, prefix_only and _tails_tokenize_alone(tokenizer)


def _tails_tokenize_alone(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when, on probe texts, the tokens after every safe boundary are those of the
    text after it alone (see :meth:`StreamingTextInput._commit_stable`)."""
    probes = (
        "The quick brown fox, 3.14159 and 12345 items! Le café coûte trois euros.",
        "def add(a, b):\n    return a + b  # done  x 日本語 のテキスト 🚀🔥 ok",
    )
    for text in probes:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        for i in range(1, len(offsets)):
            if _boundary_before(text, offsets, i):
                end = offsets[i - 1][1]
                if tokenizer(text[end:], add_special_tokens=False).input_ids != ids[i:]:
                    return False
    return True


def _safe_cut(text: str, offsets: list[tuple[int, int]]) -> tuple[int, int, bool]:
    """(number of tokens, character position, whether it is a pre-token boundary) of the
    last commit point in ``text``."""
    # Scan from the end for a token that ends right before " word" (space then non-space);
    # the token after it must start a new pre-token, whatever text follows later.
    for i in range(len(offsets) - 1, 0, -1):
        if _boundary_before(text, offsets, i):
            return i, offsets[i - 1][1], True
    # No such boundary: a token far enough from the end (close() corrects it if it changed).
    for i in range(len(offsets) - 1, 0, -1):
        end = offsets[i - 1][1]
        if len(text) - end >= _FALLBACK_HOLDBACK_CHARS and offsets[i][0] >= end:
            return i, end, False
    return 0, 0, False


def _boundary_before(text: str, offsets: list[tuple[int, int]], i: int) -> bool:
    """Whether token ``i`` starts a new pre-token whatever text follows: the token before it
    ends right before " word" (a space, then non-space, after non-space)."""
    end = offsets[i - 1][1]
    return (
        end + 1 < len(text) and text[end] == " " and not text[end + 1].isspace() and not text[end - 1].isspace()
        and offsets[i][0] >= end  # a token boundary, not the inside of a token
    )

