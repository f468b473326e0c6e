"""Incremental detokenization: turn a stream of token ids into a stream of text deltas.

Decoding the whole output after every token costs O(n) per token, and decoding each token
on its own is wrong: a multi-byte UTF-8 character can be split across tokens (byte-level
BPE, ``<0xE2>`` byte-fallback tokens), SentencePiece decoders drop the leading space of the
first token they see, and byte-fallback runs are only valid or invalid as a whole. So we
decode a small *window* of recent token ids, starting at an "anchor" token whose text has
already been emitted, and emit what the window adds beyond that text, holding back the
tail that is not yet settled:

- text ending in U+FFFD may be a character still waiting for its last bytes;
- text of an open run of byte-fallback tokens may still turn into U+FFFD (the
  ``ByteFallback`` decoder renders a whole run as U+FFFD when any byte of it is invalid).

When nothing is held back the window slides forward to its last token with visible text.
Everything is torch-free; the tokenizer is any Hugging Face tokenizer with ``decode``.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

_REPLACEMENT_CHAR = "\ufffd"
# The exact rule of the tokenizers ByteFallback decoder for a single-byte token.
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# A prompt anchor is searched only among the last few prompt tokens: past them the prompt
# is garbage at its end (e.g. a long invalid byte run) and output is decoded standalone.
_PROMPT_ANCHOR_SEARCH = 8
# Longest UTF-8 character in bytes, minus one: how far back an incomplete character at the
# end of the prompt can have started (each token carries at least one byte).
_MAX_CONTINUATION_BYTES = 3
# While text is held back the window grows; past this many ids we look for a later start,
# among the last _TRIM_SEARCH ids.
_TRIM_WINDOW_AT = 4
_TRIM_SEARCH = 6


def _without_incomplete_tail(text: str) -> int:
    """Length of ``text`` without a final U+FFFD, which may be a character whose last
    bytes are still to come. Only one: lossy UTF-8 decoding (Rust's and Python's alike)
    renders an incomplete final sequence as a single U+FFFD, so any earlier one is final.
    """
    return len(text) - 1 if text.endswith(_REPLACEMENT_CHAR) else len(text)


class _TokenTable:
    """Facts about single tokens of one tokenizer, cached because every step needs them."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        # Weak, because the table is cached in a WeakKeyDictionary keyed by the tokenizer:
        # a strong reference from the value would keep the key alive forever.
        try:
            self._tokenizer_ref: Callable[[], Any] = weakref.ref(tokenizer)
        except TypeError:
            self._tokenizer_ref = lambda: tokenizer
        self._skip = skip_special_tokens
        # Ids that decode() removes before its decoder runs. Both sources are merged
        # because either alone may miss some (added tokens flagged special are skipped
        # although all_special_ids lists only the named bos/eos/unk/pad ones).
        self._skipped: frozenset[int] = frozenset()
        if skip_special_tokens:
            added = getattr(tokenizer, "added_tokens_decoder", None) or {}
            flagged = {i for i, t in added.items() if getattr(t, "special", False)}
            self._skipped = frozenset(flagged | set(getattr(tokenizer, "all_special_ids", ())))
        self._info: dict[int, tuple[str, bool, bool, bool]] = {}

    def _lookup(self, token_id: int) -> tuple[str, bool, bool, bool]:
        info = self._info.get(token_id)
        if info is None:
            tokenizer = self._tokenizer_ref()
            text = tokenizer.decode(
                [token_id],
                skip_special_tokens=self._skip,
                clean_up_tokenization_spaces=False,
            )
            token = tokenizer.convert_ids_to_tokens(token_id)
            is_byte = isinstance(token, str) and _BYTE_FALLBACK_TOKEN.fullmatch(token) is not None
            # A token with text is certainly kept; one without is kept unless it is
            # unknown or a skipped special (a lone "▁" decodes to "" yet stays).
            kept = bool(text) or (isinstance(token, str) and token_id not in self._skipped)
            # A window may start at a token whose text is final and does not lean on its
            # neighbours: not a byte of a run, and either visible or a SentencePiece space
            # piece whose own space is all the decoder strips when it comes first.
            anchor = not is_byte and (bool(text) or (kept and token.startswith("\u2581")))
            info = self._info[token_id] = (text, is_byte, kept, anchor)
        return info

    def text(self, token_id: int) -> str:
        """The token decoded on its own ("" for skipped, unknown or stripped-away tokens)."""
        return self._lookup(token_id)[0]

    def is_byte(self, token_id: int) -> bool:
        """True for a byte-fallback token such as ``<0xE2>``."""
        return self._lookup(token_id)[1]

    def is_kept(self, token_id: int) -> bool:
        """False for ids that decode() drops (unknown ids, skipped special tokens)."""
        return self._lookup(token_id)[2]

    def is_anchor(self, token_id: int) -> bool:
        """True if a decoding window may start at this token (see ``_lookup``)."""
        return self._lookup(token_id)[3]


# Shared across requests so a server pays for each token's lookup once; weak so that a
# dropped tokenizer takes its tables with it.
_TABLES: weakref.WeakKeyDictionary[Any, dict[bool, _TokenTable]] = weakref.WeakKeyDictionary()
_TOKEN_STRINGS: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def _token_table(tokenizer: Any, skip_special_tokens: bool) -> _TokenTable:
    try:
        tables = _TABLES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable or not hashable: cache per detokenizer only
        return _TokenTable(tokenizer, skip_special_tokens)
    table = tables.get(skip_special_tokens)
    if table is None:
        table = tables[skip_special_tokens] = _TokenTable(tokenizer, skip_special_tokens)
    return table


def detokenize_token(tokenizer: Any, token_id: int) -> str:
    """Text of one token on its own, for ``Logprob.decoded_token``.

    Uses ``convert_ids_to_tokens`` + ``convert_tokens_to_string`` so that byte-level
    tokens read naturally (``"Ġthe"`` -> ``" the"``); a token that is only part of a
    UTF-8 character reads as U+FFFD. SentencePiece decoders strip the leading space of the
    first token they see, so a ``"▁the"`` token would read ``"the"``; we keep its space
    because in the output it continues earlier text. Ids the tokenizer does not know read
    as ``""``. Special tokens read as their content (``"<|im_end|>"``).
    """
    try:
        cache = _TOKEN_STRINGS.setdefault(tokenizer, {})
    except TypeError:
        cache = {}
    text = cache.get(token_id)
    if text is None:
        token = tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(token, str):
            text = ""
        else:
            text = tokenizer.convert_tokens_to_string([token])
            if token.startswith("\u2581") and not text.startswith(" "):
                text = " " + text
        cache[token_id] = text
    return text


class IncrementalDetokenizer:
    """Turns the output token ids of one sequence into text deltas, a few ids at a time.

    ``add_tokens(ids)`` returns the text those ids add; it may be ``""`` while the ids
    end inside a character (or inside a byte-fallback run), and the held text comes out
    with a later call. Call ``finish()`` when the sequence ends: it flushes text held back
    at the very end (an incomplete or invalid byte sequence, which decodes as U+FFFD).

    Guarantee: ``"".join(deltas) + finish()`` equals the output decoded *as a
    continuation of the prompt*. With an empty prompt that is exactly
    ``tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``.
    After a prompt it is the same for byte-level BPE tokenizers; SentencePiece-style
    tokenizers (Llama-2) keep the leading space of the first output token, which
    ``decode(output_ids)`` strips because it sees that token first (so a completion
    appended to its prompt reads right). A prompt that ends inside a multi-byte character
    does not lend its bytes to the output: output bytes are decoded on their own.
    ``clean_up_tokenization_spaces`` is never applied: it rewrites text across token
    boundaries (``"a ."`` -> ``"a."``) and is off for nearly all modern tokenizers.

    Each call decodes only a window of recent ids (usually 2 or 3), so the cost per token
    is constant; the window grows only while text is held back.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._table = _token_table(tokenizer, skip_special_tokens)
        self._output_ids: list[int] = []
        anchor = self._prompt_anchor(prompt_token_ids)
        # Ids decoded each step: an anchor whose text is already accounted for, then ids
        # whose text is not (fully) emitted yet. _consumed counts the window's chars that
        # are already emitted (or belong to the prompt).
        self._window: list[int] = [] if anchor is None else [anchor]
        self._consumed = 0 if anchor is None else len(self._table.text(anchor))
        self._pieces: list[str] = []
        self._run_open = False  # the window ends in a byte-fallback run
        self._finished = False

    @property
    def text(self) -> str:
        """All output text emitted so far (excluding text still held back)."""
        # Join lazily (and keep the join): deltas arrive often, full text is read rarely.
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def token_ids(self) -> list[int]:
        """All output token ids added so far (the live list: do not modify it)."""
        return self._output_ids

    @property
    def finished(self) -> bool:
        """True once ``finish()`` has been called."""
        return self._finished

    def add_tokens(self, new_token_ids: Sequence[int]) -> str:
        """Append output ids; return the text they complete (possibly ``""``)."""
        if self._finished:
            raise RuntimeError("add_tokens() called after finish()")
        if not new_token_ids:
            return ""
        self._output_ids.extend(new_token_ids)
        window = self._window
        window.extend(new_token_ids)
        table = self._table
        if self._run_open and all(table.is_byte(t) or not table.is_kept(t) for t in new_token_ids):
            # More bytes of an open byte-fallback run: nothing can be settled until the
            # run ends, so skip decoding (keeps a long run linear, not quadratic).
            return ""

        # The last token the decoder sees (ids it drops do not count: a byte run goes on
        # across a skipped special token) decides whether a byte-fallback run is open.
        last_kept = len(window) - 1
        while last_kept >= 0 and not table.is_kept(window[last_kept]):
            last_kept -= 1
        if last_kept >= 0 and table.is_byte(window[last_kept]):
            # An open byte-fallback run can still be invalidated by its next byte, which
            # turns the whole run into U+FFFDs: settle only the text before the run.
            run_start = last_kept
            while run_start > 0 and (
                table.is_byte(window[run_start - 1]) or not table.is_kept(window[run_start - 1])
            ):
                run_start -= 1
            text = self._decode(window[:run_start]) if run_start > 0 else ""
            stable = _without_incomplete_tail(text)
            # Text before the run is final once it ends on a complete character.
            boundary = run_start if stable == len(text) else 0
            self._run_open = True
        else:
            text = self._decode(window)
            stable = _without_incomplete_tail(text)
            boundary = len(window) if stable == len(text) else 0
            self._run_open = False

        delta = ""
        if stable > self._consumed:
            delta = text[self._consumed : stable]
            self._consumed = stable
            self._pieces.append(delta)

        if boundary:
            self._slide(boundary)
        elif not self._run_open and len(window) > _TRIM_WINDOW_AT and stable < len(text):
            self._trim_before_incomplete_tail(text, stable)
        return delta

    def _slide(self, boundary: int) -> None:
        """Restart the window at an anchor, given that text before ``boundary`` is final.

        The anchor is the last token before ``boundary`` that may start a window (visible
        text or a "▁" piece, not a byte-fallback token): its bytes end on a complete
        character, so its text is a prefix of every later window's text, and a
        SentencePiece decoder strips only the anchor's own leading space (already emitted).
        """
        window, table = self._window, self._table
        anchor = boundary - 1
        while anchor > 0 and not table.is_anchor(window[anchor]):
            anchor -= 1
        if anchor <= 0:
            return
        del window[:anchor]
        if boundary - anchor == 1:
            self._consumed = len(table.text(window[0]))
        else:
            self._consumed = len(self._decode(window[: boundary - anchor]))

    def _trim_before_incomplete_tail(self, text: str, stable: int) -> None:
        """Restart the window inside a stretch where every token splits a character.

        Byte-level BPE on CJK text can go many tokens without a token boundary on a
        character boundary; without this the window would grow over the whole stretch.
        Start at a later token ``j`` instead when the text of the ids before ``j`` does
        not reach the incomplete tail (so the tail's bytes all lie in ``window[j:]``).
        The window then starts with orphaned continuation bytes, which decode to U+FFFD
        each, whatever follows, and count as already consumed.
        """
        window, table = self._window, self._table
        held = text[stable:]
        lowest = max(1, len(window) - _TRIM_SEARCH)
        for j in range(len(window) - 1, lowest - 1, -1):
            if not table.is_anchor(window[j]):
                continue
            if len(self._decode(window[:j])) > stable:
                continue  # the ids before j carry bytes of the incomplete tail
            rest = self._decode(window[j:])
            consumed = len(rest) - len(held)
            if consumed >= 0 and rest[consumed:] == held:
                del window[:j]
                self._consumed = consumed
                return

    def finish(self) -> str:
        """End the sequence: return whatever text was still held back."""
        if self._finished:
            return ""
        self._finished = True
        text = self._decode(self._window)
        delta = text[self._consumed :]
        self._consumed = len(text)
        if delta:
            self._pieces.append(delta)
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self._tokenizer.decode(
            token_ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _prompt_anchor(self, prompt_token_ids: Sequence[int]) -> int | None:
        """The prompt token the output is decoded after, or None to decode standalone.

        It must have visible text (so that a SentencePiece decoder does not treat the
        first output token as the start of the text and strip its space), must not be a
        byte-fallback token (its run would merge with output bytes), and must end on a
        complete character (else output bytes could complete a prompt character).
        """
        n = len(prompt_token_ids)
        table = self._table
        for j in range(n - 1, max(n - _PROMPT_ANCHOR_SEARCH, 0) - 1, -1):
            token_id = prompt_token_ids[j]
            if not table.text(token_id) or table.is_byte(token_id):
                continue
            lead = max(j - _MAX_CONTINUATION_BYTES, 0)
            tail = self._decode(list(prompt_token_ids[lead : j + 1]))
            if not tail.endswith(_REPLACEMENT_CHAR):
                return token_id
        return None
