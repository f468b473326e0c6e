"""Workloads read from files: BurstGPT CSV traces and livelm's own JSONL format.

BurstGPT (https://github.com/HPMLL/BurstGPT) logs one request per row with the columns
``Timestamp`` (seconds from the trace's start), ``Model``, ``Request tokens``,
``Response tokens``, ``Total tokens`` and ``Log Type``. Only lengths are logged, so the
prompts are random text of the logged length; rows with 0 response tokens are failed
requests and are skipped.

The JSONL format, one request (or conversation turn) per line::

    {"prompt": "Tell me a story.", "output_tokens": 64, "arrival_s": 0.0}
    {"messages": [{"role": "user", "content": "Hi!"}], "output_tokens": 32, "arrival_s": 0.7}
    {"input_tokens": 512, "output_tokens": 128, "arrival_s": 1.5}
    {"conversation": "c1", "prompt": "And then?", "output_tokens": 32, "think_time_s": 2}

Exactly one of ``prompt``, ``messages`` or ``input_tokens`` (random text of that many
tokens). ``output_tokens`` defaults to ``--output-len``. ``arrival_s`` (seconds from the
start) is optional; when every request (or conversation) has one the file is replayed
with its own timestamps. Lines sharing a ``conversation`` id are the turns of one chat,
in file order; its arrival is its first turn's, and ``think_time_s`` is the pause before
a later turn.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from livelm.bench.lengths import LengthDist
from livelm.bench.prompts import PromptMaker
from livelm.bench.workload import Session, Turn, Workload

BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


def read_burstgpt_rows(path: str | Path) -> list[dict]:
    """The trace's rows as dicts with float ``timestamp`` and int ``input``/``output`` tokens
    (sorted by time), plus ``model`` and ``log_type`` when the file has them."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        missing = {"Timestamp", "Request tokens", "Response tokens"} - set(fields)
        if missing:
            raise ValueError(f"{path} is not a BurstGPT-format CSV: missing column(s) {sorted(missing)}")
        for lineno, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            try:
                rows.append({
                    "timestamp": float(row["Timestamp"]),
                    "input": int(float(row["Request tokens"])),
                    "output": int(float(row["Response tokens"])),
                    "model": row.get("Model", ""),
                    "log_type": row.get("Log Type", ""),
                })
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: bad number in {raw}") from e
    rows.sort(key=lambda r: r["timestamp"])
    return rows


def burstgpt_workload(
    path: str | Path, maker: PromptMaker, num_requests: int | None = None,
    start_s: float = 0.0, model: str | None = None, max_input_len: int | None = None,
    max_output_len: int | None = None,
) -> Workload:
    """The first ``num_requests`` successful requests at or after ``start_s`` seconds into
    the trace (optionally only those of ``model``, e.g. ``ChatGPT``), with lengths
    clipped to ``max_input_len``/``max_output_len``. Arrivals are relative to the first
    request kept; scaling them is the arrival process's job (``--time-scale``)."""
    rows = [r for r in read_burstgpt_rows(path)
            if r["output"] > 0 and r["input"] > 0 and r["timestamp"] >= start_s
            and (model is None or r["model"] == model)]
    if num_requests is not None:
        rows = rows[:num_requests]
    if not rows:
        raise ValueError(f"no requests left in {path} after filtering")
    t0 = rows[0]["timestamp"]
    sessions = []
    for r in rows:
        n_in = min(r["input"], max_input_len) if max_input_len else r["input"]
        n_out = min(r["output"], max_output_len) if max_output_len else r["output"]
        text, ids = maker.text(n_in)
        sessions.append(Session([Turn(text, ids, n_out)], arrival_s=r["timestamp"] - t0))
    params = {"trace": Path(path).name, "start_s": start_s, "model": model,
              "max_input_len": max_input_len, "max_output_len": max_output_len,
              "span_s": rows[-1]["timestamp"] - t0}
    return Workload("burstgpt", sessions, params)


def write_synthetic_burstgpt(path: str | Path, num_rows: int = 200, seed: int = 0) -> None:
    """A small trace in BurstGPT's format: bursty arrivals (gamma, shape 0.5, ~1 req/s),
    log-normal lengths short enough for a CPU, two models, a few failed rows (0 response
    tokens) as the real trace has. This made ``benchmarks/traces/burstgpt_synthetic.csv``."""
    rng = random.Random(seed)
    t = 0.0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(BURSTGPT_COLUMNS)
        for _ in range(num_rows):
            t += rng.gammavariate(0.5, 2.0)
            req = int(min(max(LengthDist("lognormal", (48, 0.6)).sample(rng), 4), 256))
            resp = int(min(max(LengthDist("lognormal", (24, 0.6)).sample(rng), 2), 128))
            if rng.random() < 0.03:
                resp = 0
            model = "ChatGPT" if rng.random() < 0.8 else "GPT-4"
            kind = "Conversation log" if rng.random() < 0.7 else "API log"
            w.writerow([int(t), model, req, resp, req + resp, kind])


def jsonl_workload(path: str | Path, maker: PromptMaker, default_output: LengthDist,
                   seed: int = 0) -> Workload:
    """Requests (and conversations) from a JSONL file in the format of this module's doc."""
    rng = random.Random(seed)
    sessions: list[Session] = []
    by_conv: dict[str, Session] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: each line must be a JSON object")
            turn, prefix = _jsonl_turn(obj, maker, default_output, rng, where)
            arrival = obj.get("arrival_s")
            conv = obj.get("conversation")
            if conv is not None and str(conv) in by_conv:
                if prefix:
                    raise ValueError(f"{where}: a later turn of a conversation takes a prompt, not messages")
                by_conv[str(conv)].turns.append(turn)
                continue
            session = Session([turn], arrival_s=None if arrival is None else float(arrival),
                              chat=prefix is not None or conv is not None,
                              prefix_messages=prefix or [])
            if conv is not None:
                by_conv[str(conv)] = session
            sessions.append(session)
    if not sessions:
        raise ValueError(f"{path} holds no requests")
    if any(s.arrival_s is not None for s in sessions) and not all(s.arrival_s is not None for s in sessions):
        raise ValueError(f"{path}: give arrival_s on every request (or conversation) or on none")
    if all(s.arrival_s is not None for s in sessions):
        t0 = min(s.arrival_s for s in sessions)
        for s in sessions:
            s.arrival_s -= t0
        sessions.sort(key=lambda s: s.arrival_s)
    return Workload("jsonl", sessions, {"file": Path(path).name})


def _jsonl_turn(obj: dict, maker: PromptMaker, default_output: LengthDist, rng: random.Random,
                where: str) -> tuple[Turn, list[dict] | None]:
    given = [k for k in ("prompt", "messages", "input_tokens") if k in obj]
    if len(given) != 1:
        raise ValueError(f"{where}: give exactly one of prompt, messages, input_tokens")
    out = obj.get("output_tokens")
    out = default_output.sample_int(rng) if out is None else int(out)
    if out < 1:
        raise ValueError(f"{where}: output_tokens must be >= 1")
    think = float(obj.get("think_time_s", 0.0))
    prefix = None
    if "prompt" in obj:
        text = str(obj["prompt"])
        ids = list(maker.tokenizer(text, add_special_tokens=False).input_ids)
    elif "input_tokens" in obj:
        text, ids = maker.text(int(obj["input_tokens"]))
    else:
        msgs = obj["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs)
                and msgs[-1].get("role") == "user"):
            raise ValueError(f"{where}: messages must be a list of objects ending with a user message")
        prefix = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
        text = str(msgs[-1]["content"])
        ids = list(maker.tokenizer(text, add_special_tokens=False).input_ids)
    return Turn(text, ids, out, think), prefix
