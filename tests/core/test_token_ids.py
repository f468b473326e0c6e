"""core/token_ids.py and core/request_options.py: the shared token-id helpers and the
typed session options (pure Python)."""

from __future__ import annotations

import random

import pytest

from livelm.core.request_options import NO_OPTIONS, RequestOptions
from livelm.core.token_ids import check_vocab_range, common_prefix_len


def _reference(a, b, limit=None) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n if limit is None else min(n, max(limit, 0))


def test_common_prefix_len_examples():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2, 3], [1, 2, 3, 4]) == 3  # one extends the other
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([5], [6]) == 0
    assert common_prefix_len([1, 2, 3], [1, 2, 3], limit=2) == 2
    assert common_prefix_len([1, 2, 3], [1, 9, 3], limit=2) == 1
    assert common_prefix_len([1, 2, 3], [1, 2, 3], limit=10) == 3
    assert common_prefix_len([1, 2], [1, 2], limit=0) == 0
    assert common_prefix_len([1, 2], [1, 2], limit=-1) == 0


def test_common_prefix_len_mixes_lists_and_tuples():
    # A list slice never equals a tuple slice: the slow path must still stop in bounds.
    assert common_prefix_len([1, 2, 3], (1, 2, 3)) == 3
    assert common_prefix_len((1, 2), [1, 2, 3], limit=5) == 2
    assert common_prefix_len([1, 2, 3], (1, 7, 3)) == 1


def test_common_prefix_len_matches_a_reference_on_random_input():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(8))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(8))]
        limit = rng.choice([None, rng.randrange(-1, 10)])
        assert common_prefix_len(a, b, limit) == _reference(a, b, limit), (a, b, limit)


def test_check_vocab_range_names_the_first_bad_id():
    check_vocab_range([0, 5, 9], 10, "prompt")
    check_vocab_range([], 10, "prompt")
    with pytest.raises(ValueError, match=r"prompt token id 10 is outside the vocabulary \[0, 10\)"):
        check_vocab_range([1, 10, -1], 10, "prompt")
    with pytest.raises(ValueError, match=r"input token id -1 is outside"):
        check_vocab_range([1, -1, 10], 10, "input")


def test_request_options_from_extra_and_overrides():
    assert RequestOptions.from_extra(None) == NO_OPTIONS
    assert RequestOptions.from_extra({"user": "x"}) == NO_OPTIONS
    opts = RequestOptions.from_extra({"session_id": "s", "session_ttl": 5, "cache_salt": "t"})
    assert opts == RequestOptions("s", 5.0, "t")
    assert isinstance(opts.session_ttl, float)
    # The API keywords win over the extra entries of the same name; the salt stays.
    opts = RequestOptions.from_extra({"session_id": "s", "session_ttl": 5, "cache_salt": "t"}, "k", 0)
    assert opts == RequestOptions("k", 0.0, "t")
    assert RequestOptions.from_extra({"cache_salt": ""}).cache_salt is None  # empty: no salt


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"session_id": ""}, "session_id must be a non-empty string"),
        ({"session_id": 3}, "session_id must be a non-empty string"),
        ({"session_ttl": -1}, "session_ttl must be a number of seconds >= 0"),
        ({"session_ttl": True}, "session_ttl must be a number"),
        ({"session_ttl": "10"}, "session_ttl must be a number"),
        ({"cache_salt": 7}, "cache_salt must be a string"),
    ],
)
def test_request_options_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RequestOptions(**kwargs)
    with pytest.raises(ValueError, match=message):
        RequestOptions.from_extra(kwargs)


def test_request_options_are_frozen():
    with pytest.raises(AttributeError):
        NO_OPTIONS.session_id = "x"  # type: ignore[misc]


def test_the_helpers_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; import livelm.core.token_ids, livelm.core.request_options; "
        "assert 'torch' not in sys.modules, 'imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
