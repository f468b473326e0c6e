"""Results out: one JSON line per run (appended), and markdown tables."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

from livelm.bench.machine import git_commit, machine_info

LATENCY_METRICS = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2el_ms"))


def base_record(mode: str, threads: int | None = None) -> dict:
    """Date, commit and machine facts (with the load average right now)."""
    return {"mode": mode, "date": datetime.now(UTC).replace(microsecond=0).isoformat(),
            "git_commit": git_commit(), "machine": machine_info(threads)}


def _clean(value):  # NaN is not JSON; null says "no value" to every reader
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def append_jsonl(path: str | Path, records: list[dict]) -> None:
    """Append records as JSON lines (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(_clean(rec), sort_keys=True) + "\n")


def write_json(path: str | Path, obj: dict) -> None:
    """Write one JSON document (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def _f(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def serve_tables(records: list[dict]) -> str:
    """A throughput/goodput table and a latency table (mean, p50, p90, p99 in ms)."""
    tput_rows, lat_rows = [], []
    for rec in records:
        m = rec["metrics"]
        tag = [rec["target"]["name"], rec["arrivals"]["describe"]]
        good = "-"
        if "goodput" in m:
            good = f"{_f(m['goodput'], 2)} ({_f(100 * (m['good_fraction'] or 0), 0)}%)"
        note = " (interrupted)" if rec.get("interrupted") else ""
        tput_rows.append(tag + [f"{m['completed']}{note}", str(m["failed"]), _f(m["duration_s"]),
                                _f(m["request_throughput"], 2), _f(m["output_throughput"]),
                                _f(m["total_token_throughput"]), good])
        for label, key in LATENCY_METRICS:
            s = m[key]
            lat_rows.append(tag + [label, _f(s["mean"]), _f(s["p50"]), _f(s["p90"]), _f(s["p99"])])
    slos = next((r["metrics"].get("slos_ms") for r in records if r["metrics"].get("slos_ms")), None)
    good_h = "goodput req/s (good %)" + (" " + ", ".join(f"{k}<={v:g}ms" for k, v in slos.items()) if slos else "")
    t1 = _table(["target", "rate req/s", "completed", "failed", "duration s", "req/s", "out tok/s",
                 "total tok/s", good_h], tput_rows)
    t2 = _table(["target", "rate req/s", "metric", "mean ms", "p50 ms", "p90 ms", "p99 ms"], lat_rows)
    return f"{t1}\n\n{t2}"


def throughput_table(records: list[dict]) -> str:
    """One row per engine: requests/s, output tok/s, total tok/s, and the ratio to livelm."""
    base = next((r for r in records if r["engine"] == "livelm"), None)
    rows = []
    for rec in records:
        m = rec["metrics"]
        ratio = "-"
        if base is not None and m["output_throughput"] and base["metrics"]["output_throughput"]:
            ratio = f"{base['metrics']['output_throughput'] / m['output_throughput']:.2f}x"
        note = " (interrupted)" if rec.get("interrupted") else ""
        rows.append([rec["engine"] + note, rec["workload"]["describe"], str(m["completed"]),
                     _f(m["seconds"], 2), _f(m["request_throughput"], 2), _f(m["output_throughput"]),
                     _f(m["total_token_throughput"]), ratio])
    return _table(["engine", "workload", "requests", "seconds", "req/s", "out tok/s",
                   "total tok/s", "livelm speed-up"], rows)
