"""``livelm bench throughput | serve | sweep``: flags, and dispatch to :mod:`livelm.bench.modes`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from livelm.bench.workload_args import add_workload_args
from livelm.config import KV_CACHE_DTYPE_CHOICES


def _add_model_args(p: argparse.ArgumentParser, threads: bool) -> None:
    g = p.add_argument_group("model and engine (for throughput, and the livelm server bench starts)")
    g.add_argument("--model", default=None,
                   help="HF directory, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--random-weights", action="store_true",
                   help="a random-weight Llama of the default model's shape instead (built once, cached)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer directory for making prompts (default: the model's)")
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--kv-cache-gib", type=float, default=None)
    g.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPE_CHOICES)
    if threads:
        g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def _add_output_args(p: argparse.ArgumentParser, mode: str) -> None:
    g = p.add_argument_group("results")
    g.add_argument("--result-dir", type=Path, default=Path("bench-results"),
                   help="where results go (default ./bench-results)")
    g.add_argument("--name", default=mode,
                   help=f"file stem: NAME.jsonl (appended), NAME.md (this run's tables)"
                        f"{', NAME.json and NAME.png' if mode == 'sweep' else ''} (default {mode})")
    g.add_argument("--no-save", action="store_true", help="print the tables only")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_serve_args(p: argparse.ArgumentParser, sweep: bool) -> None:
    g = p.add_argument_group("targets")
    g.add_argument("--target", action="append", default=[], metavar="[NAME=]URL",
                   help="an OpenAI-compatible server (repeatable: peers side by side), e.g. "
                        "vllm=http://127.0.0.1:8001; without any, bench starts livelm serve itself")
    g.add_argument("--launch", action="store_true",
                   help="also start a livelm server (with --model and the engine flags) next to --target")
    g.add_argument("--served-model", default=None, help="model name to send (default: the server's first)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer key for --target servers (default $OPENAI_API_KEY)")
    g = p.add_argument_group("load")
    if sweep:
        g.add_argument("--rates", required=True, help="request rates to sweep, e.g. 0.5,1,2,inf")
    else:
        g.add_argument("--request-rate", type=float, default=None,
                       help="sessions per second (default: all at once, or a trace's own timestamps)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 Poisson, <1 burstier (default 1)")
    g.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    g.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply a trace's timestamps (0.5 replays it twice as fast)")
    g.add_argument("--slo", action="append", default=[], metavar="METRIC=MS",
                   help="goodput SLO in ms (repeatable): ttft, tpot, e2el, itl; e.g. --slo ttft=1000")
    g.add_argument("--endpoint", choices=["auto", "completions", "chat"], default="auto",
                   help="auto: chat for conversations, completions otherwise")
    g.add_argument("--prompt-format", choices=["text", "ids"], default="text",
                   help="completion prompts as text (any server) or token ids (exact lengths)")
    g.add_argument("--no-ignore-eos", action="store_true",
                   help="let outputs stop at EOS (default: exactly --output-len tokens)")
    g.add_argument("--warmup", type=int, default=1, help="untimed requests first (default 1)")
    g.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")


def _mode(name: str) -> Callable[[argparse.Namespace], int]:
    """The entry point ``livelm.bench.modes.<name>``, imported when the mode runs so that
    ``livelm --help`` works without the benchmark's extras."""

    def run(args: argparse.Namespace) -> int:
        try:
            from livelm.bench import modes
        except ImportError as e:
            raise RuntimeError(f"livelm bench needs its extras ({e}): pip install 'livelm[bench]'") from e
        return getattr(modes, name)(args)

    return run


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """Add ``livelm bench``'s modes and their flags to ``parser``."""
    sub = parser.add_subparsers(dest="bench_mode", required=True)
    tp = sub.add_parser("throughput", help="offline: livelm vs transformers' batched generate",
                        description="Offline throughput: every request queued at once.")
    add_workload_args(tp)
    _add_model_args(tp, threads=True)
    tp.add_argument("--peers", default="transformers",
                    help="in-process peers: transformers or none (default transformers)")
    tp.add_argument("--hf-batch-size", type=int, default=16, help="transformers' batch size (default 16)")
    tp.add_argument("--repeat", type=int, default=1,
                    help="timed runs per engine, taking turns; the fastest counts (default 1)")
    _add_output_args(tp, "throughput")
    tp.set_defaults(func=_mode("throughput_main"))

    sv = sub.add_parser("serve", help="latency and goodput of OpenAI-compatible servers under load",
                        description="Replay a workload against OpenAI-compatible servers.")
    add_workload_args(sv)
    _add_serve_args(sv, sweep=False)
    _add_model_args(sv, threads=False)
    _add_output_args(sv, "serve")
    sv.set_defaults(func=_mode("serve_main"))

    sw = sub.add_parser("sweep", help="serve at several request rates; JSON and a PNG plot",
                        description="serve over a list of request rates, then plot.")
    add_workload_args(sw)
    _add_serve_args(sw, sweep=True)
    _add_model_args(sw, threads=False)
    _add_output_args(sw, "sweep")
    sw.set_defaults(func=_mode("sweep_main"))


def main(argv: list[str] | None = None) -> int:
    """``python -m livelm.entrypoints.bench_cli``: the same as ``livelm bench``."""
    parser = argparse.ArgumentParser(prog="livelm bench", description=__doc__)
    add_bench_args(parser)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
