"""The three modes of ``livelm bench`` end to end: set up, run, write results."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from pathlib import Path
from typing import Any

from livelm.bench import report
from livelm.bench.arrivals import ArrivalProcess
from livelm.bench.client import Target
from livelm.bench.metrics import parse_slos
from livelm.bench.serve_runner import ServeConfig, stop_on_sigint
from livelm.bench.sweep import parse_rates, run_matrix
from livelm.bench.workload import Workload, chat_prompt_ids
from livelm.bench.workload_args import build_workload

_ENGINE_FLAGS = ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_gib",
                 "kv_cache_dtype")


def model_dir(args: argparse.Namespace) -> Path:
    """The model under test as an HF directory (the random-weight twin when asked)."""
    from livelm.bench.random_model import random_default_shape_model
    from livelm.models.resolve import resolve_model_path

    if args.random_weights:
        if args.model:
            raise ValueError("give --model or --random-weights, not both")
        return random_default_shape_model()
    return resolve_model_path(args.model)


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer directory (or model spec) -> its HF tokenizer."""
    from livelm.engine.tokenizer import load_tokenizer as load
    from livelm.models.resolve import resolve_model_path

    return load(resolve_model_path(str(path)))


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _save(args: argparse.Namespace, records: list[dict], tables: str) -> None:
    print("\n" + tables + "\n")
    if args.no_save or not records:
        return
    out = args.result_dir / f"{args.name}.jsonl"
    report.append_jsonl(out, records)
    (args.result_dir / f"{args.name}.md").write_text(tables + "\n")
    print(f"appended {len(records)} record(s) to {out}; tables in {args.result_dir / (args.name + '.md')}",
          file=sys.stderr)


# ----------------------------------------------------------------------------- throughput


def throughput_main(args: argparse.Namespace) -> int:
    """``livelm bench throughput``: livelm, then each peer, on the same workload."""
    import torch

    from livelm import LLM
    from livelm.bench.throughput_runner import (
        LivelmOffline,
        TransformersOffline,
        run_offline,
        warm_up,
    )

    peers = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none"]
    unknown = set(peers) - {"transformers"}
    if unknown:
        raise ValueError(f"unknown peer(s) {sorted(unknown)}: the in-process peer is transformers")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    if args.threads:
        torch.set_num_threads(args.threads)
    mdir = model_dir(args)
    tokenizer = load_tokenizer(args.tokenizer or mdir)
    workload = build_workload(args, tokenizer)
    kwargs = {k: getattr(args, k) for k in _ENGINE_FLAGS if getattr(args, k) is not None}
    base = report.base_record("throughput", args.threads or torch.get_num_threads())
    label = "random-smollm2-135m-shape" if args.random_weights else (args.model or "default (SmolLM2-135M-Instruct)")
    records: list[dict] = []
    warm_ids = list(tokenizer(" ".join(["hello world"] * 16), add_special_tokens=False).input_ids)
    try:
        engines: list[Any] = [LivelmOffline(LLM(str(mdir), num_threads=args.threads, **kwargs),
                                            progress=not args.no_progress)]
        for _ in peers:
            engines.append(TransformersOffline(str(mdir), args.hf_batch_size))
        for engine in engines:
            warm_up(engine, warm_ids)
        best: dict[str, Any] = {}
        times: dict[str, list[float]] = {e.name: [] for e in engines}
        # Engines take turns, so that a noisy neighbour slows each about as much; the
        # fastest complete run counts (other processes can only make a run slower).
        for rep in range(args.repeat):
            for engine in engines:
                res = run_offline(engine, workload, tokenizer)
                times[engine.name].append(res.seconds)
                print(f"{engine.name} run {rep + 1}/{args.repeat}: {res.output_tokens} output tokens in "
                      f"{res.seconds:.2f}s" + (" (interrupted)" if res.interrupted else ""), file=sys.stderr)
                old = best.get(engine.name)
                if old is None or (old.interrupted and not res.interrupted) or (
                        not res.interrupted and res.seconds < old.seconds):
                    best[engine.name] = res
                if res.interrupted:
                    break
            if any(r.interrupted for r in best.values()) or len(best) < len(engines):
                break
        for engine in engines:
            res = best.get(engine.name)
            if res is None:
                continue
            records.append({**base, "engine": engine.name, "model": label, "model_dir": str(mdir),
                            "workload": {"name": workload.name, "describe": workload.describe(),
                                         **workload.params},
                            "engine_config": kwargs, "interrupted": res.interrupted,
                            "loadavg_end": _loadavg(), "runs_seconds": times[engine.name],
                            "metrics": res.metrics()})
    except KeyboardInterrupt:  # while loading or warming up: nothing more to measure
        print("\ninterrupted", file=sys.stderr)
    _save(args, records, report.throughput_table(records))
    return 130 if any(r["interrupted"] for r in records) else 0


# ----------------------------------------------------------------------------- serve / sweep


def serve_main(args: argparse.Namespace) -> int:
    """``livelm bench serve``: one arrival process, every target."""
    trace_mode = args.request_rate is None and _peek_timestamps(args)
    arrivals = ArrivalProcess(rate=math.inf if args.request_rate is None else args.request_rate,
                              burstiness=args.burstiness, use_timestamps=trace_mode,
                              time_scale=args.time_scale)
    records, interrupted = _run_serve(args, [arrivals])
    _save(args, records, report.serve_tables(records))
    return 130 if interrupted else 0


def sweep_main(args: argparse.Namespace) -> int:
    """``livelm bench sweep``: every rate, every target; JSON and a PNG as well."""
    from livelm.bench.plot import plot_sweep

    rates = parse_rates(args.rates)
    arrivals = [ArrivalProcess(rate=r, burstiness=args.burstiness) for r in rates]
    records, interrupted = _run_serve(args, arrivals)
    _save(args, records, report.serve_tables(records))
    if records and not args.no_save:
        doc = {"mode": "sweep", "rates": rates, "interrupted": interrupted, "runs": records}
        report.write_json(args.result_dir / f"{args.name}.json", doc)
        wl = records[0]["workload"]["describe"]
        png = plot_sweep(records, args.result_dir / f"{args.name}.png",
                         title=f"{wl}; {records[0]['date']} commit {str(records[0]['git_commit'])[:7]}")
        print(f"wrote {args.result_dir / (args.name + '.json')} and {png}", file=sys.stderr)
    return 130 if interrupted else 0


def _peek_timestamps(args: argparse.Namespace) -> bool:
    from livelm.bench.workload_args import workload_kind

    return workload_kind(args) in ("burstgpt", "jsonl")


def _serve_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for name in _ENGINE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def _run_serve(args: argparse.Namespace, arrivals: list[ArrivalProcess]) -> tuple[list[dict], bool]:
    """Start livelm if asked, replay the workload on every target, stop what was started."""
    from livelm.bench.local_server import LocalServer

    slos = parse_slos(args.slo)
    targets = [Target.parse(t, args.api_key) for t in args.target]
    if args.served_model:
        targets = [Target(t.name, t.base_url, args.served_model, t.api_key) for t in targets]
    launch = args.launch or not targets
    mdir = model_dir(args) if (launch or not args.tokenizer) else None
    tokenizer = load_tokenizer(args.tokenizer or mdir)
    workload = build_workload(args, tokenizer)
    if arrivals[0].use_timestamps and not workload.has_timestamps:
        arrivals = [ArrivalProcess(burstiness=args.burstiness)]
    cfg = ServeConfig(max_concurrency=args.max_concurrency, slos=slos, endpoint=args.endpoint,
                      prompt_format=args.prompt_format, warmup_requests=args.warmup, seed=args.seed,
                      progress=not args.no_progress)
    base = report.base_record("sweep" if len(arrivals) > 1 else "serve")
    records: list[dict] = []
    interrupted = False
    server = None
    try:
        if launch:
            print(f"starting livelm serve ({mdir}) on 127.0.0.1 ...", file=sys.stderr, flush=True)
            server = LocalServer(str(mdir), _serve_flags(args)).start()
            print(f"livelm serve is up at {server.url}", file=sys.stderr, flush=True)
            targets.insert(0, Target("livelm", server.url, args.served_model))
        interrupted = asyncio.run(_serve_async(targets, workload, cfg, arrivals, records, base, args,
                                               tokenizer))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    for rec in records:
        rec.setdefault("engine_config", {k: getattr(args, k) for k in _ENGINE_FLAGS})
    return records, interrupted or any(r["interrupted"] for r in records)


async def _serve_async(targets: list[Target], workload: Workload, cfg: ServeConfig,
                       arrivals: list[ArrivalProcess], records: list[dict], base: dict,
                       args: argparse.Namespace, tokenizer: Any) -> bool:
    stop = asyncio.Event()
    restore = stop_on_sigint(stop)

    def count_prompt(prompt: str | list[int] | None, messages: list[dict] | None) -> int:
        if messages is not None:
            return len(chat_prompt_ids(tokenizer, messages))
        if isinstance(prompt, list):
            return len(prompt)
        return len(tokenizer(prompt).input_ids)

    try:
        # Each rate of a sweep gets its own prompts (seed + index; the first run's are
        # the workload's): the same prompts again would be prefix-cache hits.
        def workload_for(index: int) -> Workload:
            return workload if index == 0 else build_workload(argparse.Namespace(**{**vars(args), "seed": args.seed + index}),
                                                              tokenizer)

        await run_matrix(targets, workload_for, cfg, arrivals, stop,
                         lambda rec: records.append({**base, **rec, "loadavg_end": _loadavg()}), count_prompt,
                         args.request_timeout, ignore_eos=not args.no_ignore_eos)
    finally:
        restore()
    return stop.is_set()
