"""Prefix-grouped ordering of an offline batch (after BatchLLM's global prefix sharing).

Submitted in arrival order, requests that share a prefix may be far apart: by the time the
second one runs, the first one's KV may have been evicted, and the prefix is computed
again. Sorting the prompts makes every shared prefix a run of neighbours (a depth-first
walk of the prompts' prefix tree); runs that share at least ``min_shared_tokens`` become a
group that is submitted together, so its prefix is computed once and lives only while the
group runs. Requests with a larger share of decode work go first, groups and requests
alike, so their long decodes overlap with the prefill chunks of the requests after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from livelm.core.token_ids import common_prefix_len


@dataclass(frozen=True)
class PrefixGroup:
    """Requests (indices into the batch) that share their first ``shared_tokens`` tokens."""

    members: list[int]
    shared_tokens: int


def find_prefix_groups(prompts: Sequence[Sequence[int]], min_shared_tokens: int) -> list[PrefixGroup]:
    """Group the prompts by shared prefixes of at least ``min_shared_tokens`` tokens.

    In sorted order, the common prefix of a run is the smallest common prefix of adjacent
    pairs, so one pass over neighbours finds every group. Prompts sharing nothing form
    groups of one.
    """
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    groups: list[PrefixGroup] = []
    members: list[int] = []
    shared = 0
    for i in order:
        if members:
            lcp = common_prefix_len(prompts[members[-1]], prompts[i])
            if lcp >= min_shared_tokens:
                members.append(i)
                shared = min(shared, lcp) if len(members) > 2 else lcp
                continue
            groups.append(PrefixGroup(members, shared))
        members, shared = [i], 0
    if members:
        groups.append(PrefixGroup(members, shared))
    return groups


def prefix_grouped_order(
    prompts: Sequence[Sequence[int]], decode_lens: Sequence[int], min_shared_tokens: int
) -> list[int]:
    """The order in which to submit a batch: prefix groups together, decode-heavy first.

    ``decode_lens`` are the tokens each request may generate. A request's decode share is
    ``decode / (decode + prompt tokens not shared with its group)``; a group's is the mean
    of its members'. Ties keep the sorted (prefix-tree) order, which keeps deeper shared
    prefixes adjacent too.
    """
    groups = find_prefix_groups(prompts, min_shared_tokens)

    def share(i: int, shared: int) -> float:
        decode = max(decode_lens[i], 1)
        return decode / (decode + max(len(prompts[i]) - shared, 1))

    ranked = []
    for pos, g in enumerate(groups):
        shares = {i: share(i, g.shared_tokens) for i in g.members}
        members = sorted(g.members, key=lambda i: -shares[i])  # stable: keeps tree order on ties
        ranked.append((-sum(shares.values()) / len(members), pos, members))
    ranked.sort()
    return [i for _, _, members in ranked for i in members]
