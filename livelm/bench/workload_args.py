"""The workload flags shared by every mode, and building the workload they describe."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from livelm.bench.lengths import LengthDist
from livelm.bench.prompts import PromptMaker
from livelm.bench.synthetic import multi_turn_workload, random_workload, shared_prefix_workload
from livelm.bench.traces import burstgpt_workload, jsonl_workload
from livelm.bench.workload import Workload

DEFAULT_NUM_REQUESTS = 32
WORKLOADS = ("random", "shared-prefix", "multi-turn", "burstgpt", "jsonl")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """``--workload`` and its parameters."""
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default=None,
                   help="random (default), shared-prefix, multi-turn, burstgpt (CSV trace), "
                        "jsonl (own format); --trace FILE alone picks burstgpt or jsonl by extension")
    g.add_argument("--num-requests", type=int, default=None,
                   help="requests, conversations for multi-turn (default 32); for traces a cap "
                        "(default: the whole file)")
    g.add_argument("--input-len", default="128",
                   help="prompt tokens: N, uniform:LO:HI, normal:MEAN:STD, lognormal:MEDIAN:SIGMA, "
                        "exponential:MEAN (default 128; per turn for multi-turn, suffix for shared-prefix)")
    g.add_argument("--output-len", default="64", help="output tokens, same forms (default 64)")
    g.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens of each shared prefix")
    g.add_argument("--num-prefix-groups", type=int, default=4, help="shared-prefix: distinct prefixes")
    g.add_argument("--num-turns", default="3", help="multi-turn: turns per conversation (a distribution)")
    g.add_argument("--think-time", default="1",
                   help="multi-turn: seconds between a reply and the next turn (a distribution)")
    g.add_argument("--system-len", type=int, default=0, help="multi-turn: system prompt tokens")
    g.add_argument("--trace", type=Path, default=None, help="burstgpt: a CSV trace; jsonl: a JSONL file")
    g.add_argument("--trace-start", type=float, default=0.0, help="burstgpt: skip to this second of the trace")
    g.add_argument("--trace-model", default=None, help="burstgpt: keep only this Model column (e.g. ChatGPT)")
    g.add_argument("--max-input-len", type=int, default=None, help="burstgpt: clip prompt lengths")
    g.add_argument("--max-output-len", type=int, default=None, help="burstgpt: clip output lengths")
    g.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts and arrivals")


def workload_kind(args: argparse.Namespace) -> str:
    """The workload asked for (inferring burstgpt/jsonl from --trace's extension)."""
    if args.workload:
        return args.workload
    if args.trace is not None:
        return "jsonl" if args.trace.suffix.lower() in (".jsonl", ".json") else "burstgpt"
    return "random"


def build_workload(args: argparse.Namespace, tokenizer: Any) -> Workload:
    """The workload of the parsed flags (ValueError on inconsistent ones)."""
    kind = workload_kind(args)
    n = args.num_requests
    if n is not None and n < 1:
        raise ValueError(f"--num-requests must be >= 1, got {n}")
    if n is None and kind not in ("burstgpt", "jsonl"):
        n = DEFAULT_NUM_REQUESTS
    maker = PromptMaker(tokenizer, seed=args.seed)
    inp, out = LengthDist.parse(args.input_len), LengthDist.parse(args.output_len)
    if kind in ("burstgpt", "jsonl") and args.trace is None:
        raise ValueError(f"--workload {kind} needs --trace FILE")
    if kind == "random":
        return random_workload(maker, n, inp, out, args.seed)
    if kind == "shared-prefix":
        return shared_prefix_workload(maker, n, args.num_prefix_groups,
                                      args.prefix_len, inp, out, args.seed)
    if kind == "multi-turn":
        return multi_turn_workload(maker, n, LengthDist.parse(args.num_turns), inp, out,
                                   LengthDist.parse(args.think_time, minimum=0), args.system_len, args.seed)
    if kind == "burstgpt":
        return burstgpt_workload(args.trace, maker, n, args.trace_start, args.trace_model,
                                 args.max_input_len, args.max_output_len)
    wl = jsonl_workload(args.trace, maker, out, args.seed)
    if n is not None:
        wl.sessions = wl.sessions[:n]
    return wl
