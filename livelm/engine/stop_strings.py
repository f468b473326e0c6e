"""Stop strings on a text stream: end the output where a stop string appears.

Text arrives as deltas (from ``IncrementalDetokenizer``). A stop string may straddle
deltas, so text that could still be the beginning of a stop string is held back until the
next deltas settle it. Typical use, once per output sequence::

    matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
    emit, matched = matcher.feed(detokenizer.add_tokens(new_ids))
    if matched is not None: ...  # finish_reason "stop", stop_reason matched
    # when the sequence ends for another reason (eos, length, abort):
    emit, matched = matcher.feed(detokenizer.finish())
    if matched is None:
        emit += matcher.flush()
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Cuts a stream of text deltas at the first stop string.

    The output stops as soon as the text generated so far contains a stop string. It ends
    right before that occurrence (right after it with ``include_stop_str_in_output``), and
    everything after it is dropped. When several occurrences are present at that moment
    (one delta may complete more than one), the one that starts earliest wins; among those
    starting at the same place the longest wins, so ``include_stop_str_in_output`` never
    cuts a stop string short (``stop=["ab", "abc"]`` on ``"abcd"`` matches ``"abc"``). We
    do not wait for an earlier-starting, longer stop string that might still complete:
    generation stops at the first completed match, as in vLLM and OpenAI.

    Invariant: the concatenation of everything returned by ``feed`` and ``flush`` equals
    the text fed so far, truncated as above at the first delta that completes a match.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(stop))
        if any(not isinstance(s, str) or not s for s in self._stops):
            raise ValueError("stop strings must be non-empty strings")
        self._include = include_stop_str_in_output
        # Every proper prefix of every stop string: a suffix of the text that is one of
        # these may still grow into a match, so it is held back.
        self._prefixes = frozenset(s[:k] for s in self._stops for k in range(1, len(s)))
        self._max_held = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self._matched: str | None = None
        self._done = False

    @property
    def matched(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._matched

    @property
    def held(self) -> str:
        """Text received but not emitted yet, because it could begin a stop string."""
        return self._held

    @property
    def done(self) -> bool:
        """True after a match or ``flush()``: further input is ignored."""
        return self._done

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Take the next delta; return (text safe to emit now, stop string matched or None).

        The stop string is returned once, by the call that completes it; after that (or
        after ``flush()``) every call returns ``("", None)``.
        """
        if self._done:
            return "", None
        if not self._stops:
            return delta, None
        # Any occurrence that is not complete yet must start inside the held text (it
        # is the longest suffix that begins a stop string), so held + delta is enough.
        text = self._held + delta
        best_pos, best_stop = -1, ""
        for stop in self._stops:
            pos = text.find(stop)
            if pos != -1 and (
                best_pos == -1 or pos < best_pos or (pos == best_pos and len(stop) > len(best_stop))
            ):
                best_pos, best_stop = pos, stop
        if best_pos != -1:
            self._held = ""
            self._done = True
            self._matched = best_stop
            end = best_pos + len(best_stop) if self._include else best_pos
            return text[:end], best_stop
        keep = self._held_length(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """End the stream without a match: return the held text and stop."""
        if self._done:
            return ""
        self._done = True
        held, self._held = self._held, ""
        return held

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop."""
        for k in range(min(len(text), self._max_held), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0
