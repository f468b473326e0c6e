"""Start-up and memory: how long a warm ``livelm generate`` of the README question takes,
how long until ``livelm serve`` answers ``/health``, and the peak resident memory of both.

Each command runs in a fresh process, as a user runs it, after one untimed warm-up run
(kernels compiled, the default model converted); ``--runs`` timed runs follow and the best
and median wall times count. Peak memory is ``os.wait4``'s ``ru_maxrss`` of that child
(on Linux at least the forking benchmark's own resident size, ~300 MiB here, which every
run below exceeds) and, for the server, ``VmHWM`` from ``/proc``.

Yardstick, where ``llama-cpp-python`` is installed: loading the same GGUF with
``llama_cpp.Llama`` and answering the same question (8 tokens, greedy) in a fresh process.

Printed too: the CPU model, the memory bandwidth and the load average at start and end
(timings on a busy machine are not comparable). One JSON line goes to
``benchmarks/results/startup.jsonl``.

Usage::

    python benchmarks/startup.py            # 3 timed runs of each
    python benchmarks/startup.py --runs 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, utc_now  # noqa: E402
from decode import measure_bandwidth  # noqa: E402

from livelm.bench.machine import git_commit, machine_info  # noqa: E402

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "startup.jsonl"
QUESTION = "What is the capital of France?"
LLAMA_CPP_SCRIPT = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=2, verbose=False)
out = llm.create_chat_completion(messages=[{"role": "user", "content": sys.argv[2]}],
                                 max_tokens=8, temperature=0)
print(out["choices"][0]["message"]["content"])
"""


def run_timed(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS bytes and stdout of one fresh process running ``cmd``."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return wall, usage.ru_maxrss * 1024, out.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def serve_once() -> dict:
    """Start ``livelm serve``; time until /health answers 200, then one chat answer; its
    resident and peak memory after that answer."""
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "livelm.entrypoints.cli", "serve", "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"livelm serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        health_s = time.perf_counter() - start
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
        body = json.dumps({"model": model, "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": QUESTION}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())["choices"][0]["message"]["content"]
        first_answer_s = time.perf_counter() - start
        rss, peak = proc_status(proc.pid, "VmRSS"), proc_status(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"health_s": health_s, "first_answer_s": first_answer_s, "rss_bytes": rss,
            "peak_rss_bytes": peak, "answer": answer}


def summarize(walls: list[float], peaks: list[int]) -> dict:
    return {"best_s": min(walls), "median_s": statistics.median(walls), "all_s": walls,
            "peak_rss_mib": max(peaks) / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    info = machine_info(None)
    print(f"start-up benchmark, {utc_now()}, commit {git_commit()[:7]}, load {info['loadavg'][0]:.2f}")
    print(f"CPU: {info['cpu']} ({info['cores']} cores)\n")

    generate = [sys.executable, "-m", "livelm.entrypoints.cli", "generate", QUESTION]
    run_timed(generate)  # warm-up: kernels built, default model converted, page cache warm
    walls, peaks = [], []
    for _ in range(args.runs):
        wall, peak, answer = run_timed(generate)
        walls.append(wall)
        peaks.append(peak)
    gen = summarize(walls, peaks) | {"answer": answer}
    print(f"livelm generate (warm): best {gen['best_s']:.2f} s, median {gen['median_s']:.2f} s "
          f"(target <= 2.0 s), peak RSS {gen['peak_rss_mib']:.0f} MiB; answer {answer!r}")

    serve_once()  # warm-up
    serves = [serve_once() for _ in range(args.runs)]
    srv = {"health_best_s": min(s["health_s"] for s in serves),
           "health_median_s": statistics.median(s["health_s"] for s in serves),
           "first_answer_median_s": statistics.median(s["first_answer_s"] for s in serves),
           "rss_mib": max(s["rss_bytes"] for s in serves) / 2**20,
           "peak_rss_mib": max(s["peak_rss_bytes"] for s in serves) / 2**20}
    print(f"livelm serve: /health after best {srv['health_best_s']:.2f} s, median "
          f"{srv['health_median_s']:.2f} s; first answer at {srv['first_answer_median_s']:.2f} s; "
          f"RSS after it {srv['rss_mib']:.0f} MiB (peak {srv['peak_rss_mib']:.0f} MiB)")

    record = {"date": utc_now(), "commit": git_commit(), "machine": info, "generate": gen, "serve": srv}
    if importlib.util.find_spec("llama_cpp") is not None:
        from livelm.models.default_model import default_gguf_path

        cmd = [sys.executable, "-c", LLAMA_CPP_SCRIPT, str(default_gguf_path()), QUESTION]
        run_timed(cmd)
        runs = [run_timed(cmd) for _ in range(args.runs)]
        lc = summarize([r[0] for r in runs], [r[1] for r in runs]) | {"answer": runs[-1][2]}
        record["llama_cpp"] = lc
        print(f"llama.cpp (llama-cpp-python, same GGUF): best {lc['best_s']:.2f} s, median "
              f"{lc['median_s']:.2f} s, peak RSS {lc['peak_rss_mib']:.0f} MiB; livelm/llama.cpp "
              f"median wall {gen['median_s'] / lc['median_s']:.2f}x")
    else:
        print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python), no yardstick")
    # Measured last: its buffers would raise this process's resident size, which the
    # children's ru_maxrss starts from.
    record["bandwidth"] = bw = measure_bandwidth()
    print(f"memory bandwidth: read {bw['read_gb_s']:.1f} GB/s, copy {bw['copy_gb_s']:.1f} GB/s")
    record["load_end"] = os.getloadavg()[0]
    print(f"\nload average: {info['loadavg'][0]:.2f} at start, {record['load_end']:.2f} at end")
    append_jsonl(RESULTS_FILE, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
