"""StopStringMatcher: examples, then properties over random texts, splits and stop sets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livelm.engine.stop_strings import StopStringMatcher


def _run(
    stop: list[str], deltas: list[str], include: bool = False
) -> tuple[list[str], str | None, str]:
    """Feed deltas until a match; return (pieces emitted per feed, matched, flushed)."""
    matcher = StopStringMatcher(stop, include)
    pieces: list[str] = []
    for delta in deltas:
        emit, matched = matcher.feed(delta)
        pieces.append(emit)
        if matched is not None:
            return pieces, matched, matcher.flush()
    return pieces, None, matcher.flush()


def _reference(stop: list[str], deltas: list[str], include: bool) -> tuple[str, str | None]:
    """The output stops at the first delta after which the text contains a stop string,
    cut at the earliest occurrence then (the longest stop string on a tie)."""
    text = ""
    for delta in deltas:
        text += delta
        found = [(text.find(s), -len(s), s) for s in stop if s in text]
        if found:
            pos, _, s = min(found)
            return text[: pos + len(s) if include else pos], s
    return text, None


# --- examples ------------------------------------------------------------------------------


def test_stop_string_straddling_deltas() -> None:
    pieces, matched, rest = _run(["###"], ["ab#", "#", "#cd", "never fed"])
    assert pieces == ["ab", "", ""] and matched == "###" and rest == ""
    pieces, matched, _ = _run(["###"], ["ab#", "#", "#cd"], include=True)
    assert "".join(pieces) == "ab###" and matched == "###"


def test_held_text_is_released_when_it_cannot_match() -> None:
    matcher = StopStringMatcher(["world!"])
    assert matcher.feed("Hello wor") == ("Hello ", None)
    assert matcher.held == "wor"
    assert matcher.feed("ld") == ("", None)  # "world" may still become "world!"
    assert matcher.feed(".") == ("world.", None)
    assert matcher.held == ""
    assert matcher.feed(" wo") == (" ", None)
    assert matcher.flush() == "wo"  # the sequence ended for another reason (eos, length)
    assert matcher.done and matcher.matched is None
    assert matcher.feed("more") == ("", None) and matcher.flush() == ""


def test_earliest_occurrence_wins() -> None:
    # Both complete in the same delta: the one that starts first.
    assert _run(["cd", "bcde"], ["abcdef"]) == (["a"], "bcde", "")
    assert _run(["cd", "bcde"], ["abcdef"], include=True) == (["abcde"], "bcde", "")
    # "y" completes first; the output stops there without waiting for "xyz".
    assert _run(["xyz", "y"], ["xy", "z"]) == (["x"], "y", "")


def test_longest_wins_at_the_same_position() -> None:
    assert _run(["ab", "abc"], ["xabcd"], include=True) == (["xabc"], "abc", "")
    assert _run(["abc", "ab"], ["xabcd"]) == (["x"], "abc", "")
    # Arriving one character at a time, "ab" completes first and ends the output.
    assert _run(["ab", "abc"], list("xabcd"), include=True)[:2] == (["x", "", "ab"], "ab")


def test_match_at_the_very_start_and_empty_deltas() -> None:
    assert _run(["</s>"], ["", "</", "", "s>tail"]) == (["", "", "", ""], "</s>", "")
    assert _run(["a"], ["a"], include=True) == (["a"], "a", "")


def test_no_stop_strings_pass_everything_through() -> None:
    matcher = StopStringMatcher([], include_stop_str_in_output=False)
    assert matcher.feed("any text") == ("any text", None)
    assert matcher.held == "" and matcher.flush() == ""


def test_invalid_stop_strings() -> None:
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])
    assert StopStringMatcher("stop").feed("a stop") == ("a ", "stop")  # a lone str is one stop


# --- properties ---------------------------------------------------------------------------

_ALPHABET = "abc\n"  # few letters, so stop strings occur and overlap often
_stop_sets = st.lists(st.text(_ALPHABET, min_size=1, max_size=4), min_size=0, max_size=4)


@st.composite
def _split_text(draw: st.DrawFn) -> list[str]:
    """A random text cut into random deltas (empty deltas included)."""
    text = draw(st.text(_ALPHABET + "é🚀", max_size=40))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=400, deadline=None)
@given(stop=_stop_sets, deltas=_split_text(), include=st.booleans())
def test_emitted_text_equals_reference_truncation(
    stop: list[str], deltas: list[str], include: bool
) -> None:
    pieces, matched, rest = _run(stop, deltas, include)
    expected, expected_stop = _reference(stop, deltas, include)
    assert "".join(pieces) + rest == expected
    assert matched == expected_stop
    if matched is not None:
        assert rest == ""  # nothing is left to flush after a match


@settings(max_examples=300, deadline=None)
@given(stop=_stop_sets, deltas=_split_text(), include=st.booleans())
def test_held_back_text_is_exactly_a_possible_stop_start(
    stop: list[str], deltas: list[str], include: bool
) -> None:
    matcher = StopStringMatcher(stop, include)
    text = emitted = ""
    for delta in deltas:
        text += delta
        emit, matched = matcher.feed(delta)
        emitted += emit
        if matched is not None:
            break
        # Nothing that could begin a stop string is emitted, and nothing else is held:
        # the held text is the longest suffix that is a proper prefix of a stop string.
        assert emitted + matcher.held == text
        longest = max(
            (
                k
                for k in range(1, len(text) + 1)
                for s in stop
                if len(s) > k and s.startswith(text[-k:])
            ),
            default=0,
        )
        assert len(matcher.held) == longest
        assert not any(s in emitted for s in stop)
