"""Synthetic workloads: random lengths, shared prefixes, multi-turn chat."""

from __future__ import annotations

import random

from livelm.bench.lengths import LengthDist
from livelm.bench.prompts import PromptMaker
from livelm.bench.workload import Session, Turn, Workload


def random_workload(
    maker: PromptMaker, num_requests: int, input_len: LengthDist, output_len: LengthDist,
    seed: int = 0,
) -> Workload:
    """``num_requests`` independent requests, prompt and output lengths drawn per request."""
    rng = random.Random(seed)
    sessions = []
    for _ in range(num_requests):
        text, ids = maker.text(input_len.sample_int(rng))
        sessions.append(Session([Turn(text, ids, output_len.sample_int(rng))]))
    return Workload("random", sessions, {"input_len": str(input_len), "output_len": str(output_len)})


def shared_prefix_workload(
    maker: PromptMaker, num_requests: int, num_groups: int, prefix_len: int,
    input_len: LengthDist, output_len: LengthDist, seed: int = 0,
) -> Workload:
    """Requests in ``num_groups`` groups; a group shares a ``prefix_len``-token prefix (a long
    system prompt) and each request adds its own ``input_len`` tokens. Requests of all
    groups are interleaved at random, as different users' would be."""
    if num_groups < 1:
        raise ValueError(f"--num-prefix-groups must be >= 1, got {num_groups}")
    rng = random.Random(seed)
    prefixes = [maker.text(prefix_len) for _ in range(num_groups)]
    groups = [i % num_groups for i in range(num_requests)]
    rng.shuffle(groups)
    sessions = []
    for g in groups:
        p_text, p_ids = prefixes[g]
        s_text, s_ids = maker.text(input_len.sample_int(rng))
        sessions.append(Session([Turn(f"{p_text} {s_text}", p_ids + s_ids, output_len.sample_int(rng))]))
    params = {"groups": num_groups, "prefix_len": prefix_len, "input_len": str(input_len),
              "output_len": str(output_len)}
    return Workload("shared-prefix", sessions, params)


def multi_turn_workload(
    maker: PromptMaker, num_conversations: int, num_turns: LengthDist, input_len: LengthDist,
    output_len: LengthDist, think_time_s: LengthDist, system_len: int = 0, seed: int = 0,
) -> Workload:
    """Conversations: each turn sends the whole history (system prompt, earlier user turns
    and the model's actual replies) plus a new user message, after a think time."""
    rng = random.Random(seed)
    sessions = []
    for _ in range(num_conversations):
        prefix = []
        if system_len > 0:
            prefix = [{"role": "system", "content": maker.text(system_len)[0]}]
        turns = []
        for k in range(num_turns.sample_int(rng)):
            text, ids = maker.text(input_len.sample_int(rng))
            think = think_time_s.sample(rng) if k > 0 else 0.0
            turns.append(Turn(text, ids, output_len.sample_int(rng), think))
        sessions.append(Session(turns, chat=True, prefix_messages=prefix))
    params = {"conversations": num_conversations, "turns": str(num_turns),
              "input_len": str(input_len), "output_len": str(output_len),
              "think_time_s": str(think_time_s), "system_len": system_len}
    return Workload("multi-turn", sessions, params)
