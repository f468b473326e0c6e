"""The torch-free half of speculative decoding: n-gram and suffix-tree drafters, the
adaptive draft length, the engine's and requests' speculative options."""

from __future__ import annotations

import math
import random

import pytest

from livelm.config import EngineConfig
from livelm.core.request import Request
from livelm.core.request_options import RequestOptions
from livelm.core.speculative.config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from livelm.core.speculative.ngram import NgramDrafter
from livelm.core.speculative.speculator import Speculator
from livelm.core.speculative.suffix import GlobalSuffixTree, SuffixDrafter
from livelm.core.speculative.suffix_tree import SuffixTree
from livelm.sampling_params import SamplingParams

# ------------------------------------------------------------------- n-gram


def test_ngram_drafts_what_followed_the_latest_occurrence():
    d = NgramDrafter(1, 3)
    assert d.propose([1, 2, 3, 4, 5, 1, 2], 3) == [3, 4, 5]
    # The longest n-gram wins over a more recent shorter one.
    assert d.propose([7, 8, 9, 1, 5, 8, 9, 2, 7, 8, 9], 2) == [1, 5]
    # "8 9" (followed by 1 5) beats the more recent "9" (followed by 2 8).
    assert NgramDrafter(1, 3).propose([7, 8, 9, 1, 5, 9, 2, 8, 9], 2) == [1, 5]
    assert NgramDrafter(2, 2).propose([1, 2, 3, 9, 2, 3], 4) == [9, 2, 3]


def test_ngram_prefers_the_latest_occurrence_and_grows_incrementally():
    d = NgramDrafter(1, 2)
    tokens = [5, 6, 1, 5, 6, 2, 5, 6]
    assert d.propose(tokens, 1) == [2]  # the latest "5 6" was followed by 2
    tokens += [2, 9]
    assert d.propose(tokens, 3) == []  # 9 never occurred, nor "2 9"
    tokens += [5, 6]
    assert d.propose(tokens, 2) == [2, 9]


def test_ngram_matches_a_brute_force_search():
    rng = random.Random(0)
    for _ in range(200):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        n_min, n_max = 1, rng.randrange(1, 4)
        k = rng.randrange(1, 5)
        want: list[int] = []
        for n in range(n_max, n_min - 1, -1):
            if len(tokens) <= n:
                continue
            key = tokens[-n:]
            hits = [e for e in range(n, len(tokens)) if tokens[e - n : e] == key]
            if hits:
                want = tokens[hits[-1] : hits[-1] + k]
                break
        assert NgramDrafter(n_min, n_max).propose(tokens, k) == want, tokens


def test_ngram_without_a_match_drafts_nothing():
    assert NgramDrafter(1, 4).propose([1, 2, 3, 4], 5) == []
    assert NgramDrafter(1, 4).propose([1], 5) == []


# -------------------------------------------------------------- suffix tree


def _brute_counts(seqs: list[list[int]], depth: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for s in seqs:
        for i in range(len(s)):
            for j in range(i + 1, min(len(s), i + depth) + 1):
                counts[tuple(s[i:j])] = counts.get(tuple(s[i:j]), 0) + 1
    return counts


def _tree_counts(tree: SuffixTree) -> dict[tuple[int, ...], int]:
    out: dict[tuple[int, ...], int] = {}
    stack = [((), tree.root)]
    while stack:
        path, node = stack.pop()
        for t, child in node.children.items():
            out[(*path, t)] = child.count
            stack.append(((*path, t), child))
    return out


def test_suffix_tree_counts_every_substring_and_forgets_removed_sequences():
    rng = random.Random(1)
    seqs = [[rng.randrange(5) for _ in range(rng.randrange(1, 30))] for _ in range(6)]
    tree = SuffixTree(6)
    for s in seqs:
        cur = tree.cursor()
        cut = len(s) // 2
        tree.extend(cur, s[:cut])  # fed in two pieces, as a request grows
        tree.extend(cur, s[cut:])
    assert _tree_counts(tree) == _brute_counts(seqs, 6)
    for s in seqs[:3]:
        tree.remove(s)
    assert _tree_counts(tree) == _brute_counts(seqs[3:], 6)
    assert tree.num_nodes == len(_tree_counts(tree)) + 1


def test_suffix_tree_match_is_the_longest_suffix_with_a_continuation():
    tree = SuffixTree(8)
    tree.extend(tree.cursor(), [1, 2, 3, 4, 9, 2, 3, 4, 5])
    node, n = tree.match([7, 2, 3, 4])
    assert n == 3  # "2 3 4" occurred followed by 9 and 5; "7 2 3 4" never did
    draft, score = SuffixTree.continuation(node, 4, 0.0)
    assert draft[0] in (9, 5) and score > 0
    assert tree.match([42]) == (None, 0)


def test_suffix_tree_continuation_follows_the_most_frequent_path_and_stops_at_min_prob():
    tree = SuffixTree(8)
    for s in ([1, 2, 3], [1, 2, 3], [1, 2, 4], [1, 5]):
        tree.extend(tree.cursor(), s)
    node, n = tree.match([1])
    assert n == 1
    draft, score = SuffixTree.continuation(node, 5, 0.0)
    assert draft == [2, 3]
    assert math.isclose(score, 0.75 + 0.75 * 2 / 3)
    assert SuffixTree.continuation(node, 5, 0.6)[0] == [2]  # 0.75 * 2/3 = 0.5 < 0.6


def test_suffix_drafter_uses_the_request_and_other_requests_outputs():
    shared = GlobalSuffixTree(16, max_requests=2)
    d = SuffixDrafter(shared, 16, alpha=2.0, min_prob=0.1)
    assert d.propose([1, 2, 3, 4, 1, 2], 2) == [3, 4]  # its own context
    assert d.propose([1, 2, 3, 4, 1, 2, 50, 51], 3) == []
    shared.add([50, 51, 52, 53, 54])  # another request's output
    assert d.propose([1, 2, 3, 4, 1, 2, 50, 51], 3) == [52, 53, 54]
    # Drafts are at most alpha tokens per matched token.
    assert SuffixDrafter(shared, 16, alpha=1.0, min_prob=0.1).propose([9, 53], 5) == [54]
    shared.add([60, 61])
    shared.add([70, 71])  # the window holds 2 requests: the first output is forgotten
    assert d.propose([1, 2, 3, 4, 1, 2, 50, 51, 7, 52], 3) == []


# --------------------------------------------------------------- speculator


_IDS = iter(range(10**6))


def _request(tokens: list[int], **kw) -> Request:
    return Request(f"r{next(_IDS)}", list(tokens), SamplingParams(max_tokens=100), **kw)


def test_speculator_uses_the_engine_method_unless_the_request_overrides():
    spec = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=3))
    assert spec.propose(_request([1, 2, 3, 4, 5, 1, 2]), 10) == [3, 4, 5]
    assert spec.propose(_request([1, 2, 3, 4, 5, 1, 2], speculative_method="off"), 10) == []
    assert Speculator(SpeculativeConfig()).propose(_request([1, 2, 3, 1, 2]), 10) == []
    req = _request([1, 2, 3, 4, 5, 1, 2], num_speculative_tokens=1)
    assert Speculator(SpeculativeConfig(method="ngram")).propose(req, 10) == [3]
    assert spec.propose(_request([1, 2, 3, 4, 5, 1, 2]), 2) == [3, 4]  # the caller's limit


def test_adaptive_length_shrinks_on_rejections_grows_on_acceptance_and_pauses():
    spec = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=6))
    req = _request(list(range(10)) * 3)
    assert len(spec.propose(req, 100)) == 6
    spec.record(req, 6, 1)
    k = len(spec.propose(req, 100))
    assert 1 <= k < 6
    spec.record(req, k, k)
    assert len(spec.propose(req, 100)) == k + 1
    for _ in range(3):  # three misses in a row: no drafts for a while
        spec.record(req, 1, 0)
    assert spec.propose(req, 100) == []
    assert spec.stats().num_drafts == 5
    off = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=6, adaptive=False))
    off.record(req, 6, 0)
    assert len(off.propose(req, 100)) == 6


def test_a_method_that_never_pays_starts_new_requests_paused():
    """Engine-wide memory: once a method's recent drafts are rarely accepted, a new
    request of it starts paused (k 1, 16 steps) instead of paying a run of failed drafts;
    one whose drafts hold is unaffected, and so is everything without ``adaptive``."""
    spec = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=4))
    assert spec.method_acceptance("ngram") == 1.0  # nothing known yet
    for _ in range(12):
        spec.record(_request([1]), 4, 0)  # 48 drafted, none accepted
    assert spec.method_acceptance("ngram") == 0.0
    late = _request(list(range(10)) * 3)
    assert [spec.propose(late, 100) for _ in range(16)] == [[]] * 16
    assert len(spec.propose(late, 100)) == 1  # then a probe of one token
    for _ in range(20):
        spec.record(_request([1]), 4, 4)  # the method pays again
    assert spec.method_acceptance("ngram") > 0.1
    assert len(spec.propose(_request(list(range(10)) * 3), 100)) == 4
    plain = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=False))
    for _ in range(12):
        plain.record(_request([1]), 4, 0)
    assert len(plain.propose(_request(list(range(10)) * 3), 100)) == 4


def test_finished_suffix_requests_feed_the_shared_tree():
    spec = Speculator(SpeculativeConfig(method="suffix"))
    req = _request([1, 2])
    req.output_token_ids = [40, 41, 42, 43]
    spec.propose(req, 3)
    spec.finish(req)
    assert spec.propose(_request([9, 40, 41]), 2) == [42, 43]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, field", [
    ({"speculative_method": "medusa"}, "speculative_method"),
    ({"speculative_method": 3}, "speculative_method"),
    ({"speculative_method": "off"}, "speculative_method"),  # per request only
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": -2}, "num_speculative_tokens"),
    ({"num_speculative_tokens": MAX_SPECULATIVE_TOKENS + 1}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 2.5}, "num_speculative_tokens"),
    ({"num_speculative_tokens": float("nan")}, "num_speculative_tokens"),
    ({"num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"num_speculative_tokens": "4"}, "num_speculative_tokens"),
    ({"speculative_adaptive": "yes"}, "speculative_adaptive"),
    ({"speculative_max_batch_decodes": 0}, "speculative_max_batch_decodes"),
    ({"speculative_max_batch_decodes": 1e9}, "speculative_max_batch_decodes"),
])
def test_engine_config_refuses_bad_speculative_options(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"speculative_method": "eagle"}, "speculative_method"),
    ({"speculative_method": ["ngram"]}, "speculative_method"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 10**12}, "num_speculative_tokens"),
    ({"num_speculative_tokens": float("inf")}, "num_speculative_tokens"),
    ({"num_speculative_tokens": False}, "num_speculative_tokens"),
])
def test_request_options_refuse_bad_speculative_overrides(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RequestOptions(**kwargs)
    with pytest.raises(ValueError, match=field):
        RequestOptions.from_extra(kwargs)


@pytest.mark.parametrize("kwargs", [
    {"ngram_min": 0}, {"ngram_max": 2, "ngram_min": 3}, {"suffix_max_depth": 1}, {"suffix_alpha": float("nan")},
    {"suffix_min_prob": 1.5}, {"suffix_max_requests": -1}, {"adaptive": 1},
])
def test_speculative_config_refuses_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SpeculativeConfig(**kwargs)


def test_good_speculative_options_pass():
    assert EngineConfig(speculative_method="suffix", num_speculative_tokens=8).speculative.method == "suffix"
    opts = RequestOptions.from_extra({"speculative_method": "off", "num_speculative_tokens": 3})
    assert (opts.speculative_method, opts.num_speculative_tokens) == ("off", 3)
