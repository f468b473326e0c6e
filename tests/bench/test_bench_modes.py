"""Each ``livelm bench`` mode, briefly, against the tiny model: serve and sweep against a
real server on a loopback port, throughput against transformers in-process, and Ctrl-C
on a running benchmark (a subprocess that started its own server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from server_utils import serve, start_engine, stop_engine

from livelm.bench.client import Target
from livelm.entrypoints.cli import main as livelm_main


@pytest.fixture(scope="module")
def server(llama_dir):
    engine = start_engine(llama_dir, max_model_len=256, max_num_seqs=16)
    with serve(engine) as srv:
        yield srv
    stop_engine(engine)


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_target_parsing():
    t = Target.parse("vllm=http://127.0.0.1:8001/v1/")
    assert (t.name, t.base_url) == ("vllm", "http://127.0.0.1:8001")
    assert Target.parse("http://127.0.0.1:9/").name == "127.0.0.1:9"
    with pytest.raises(ValueError):
        Target.parse("127.0.0.1:9")


def test_serve_at_a_rate_with_concurrency_cap_and_slos(server, llama_dir, tmp_path):
    rc = livelm_main([
        "bench", "serve", "--target", f"peer={server.url}", "--tokenizer", str(llama_dir),
        "--num-requests", "6", "--input-len", "uniform:8:16", "--output-len", "5",
        "--request-rate", "40", "--burstiness", "0.5", "--max-concurrency", "2",
        "--slo", "ttft=60000", "--slo", "tpot=60000", "--result-dir", str(tmp_path), "--no-progress",
    ])
    assert rc == 0
    [rec] = records(tmp_path / "serve.jsonl")
    m = rec["metrics"]
    assert m["completed"] == 6 and m["failed"] == 0 and not rec["interrupted"]
    assert m["total_output_tokens"] == 30  # ignore_eos: exactly --output-len each
    assert 6 * 8 <= m["total_input_tokens"] <= 6 * 18
    assert m["max_concurrency_seen"] <= 2
    assert m["good_requests"] == 6 and m["goodput"] == pytest.approx(m["request_throughput"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(m[key]) >= {"mean", "p50", "p90", "p99"}
    assert m["ttft_ms"]["p50"] <= m["e2el_ms"]["p50"]
    assert rec["target"]["name"] == "peer" and rec["arrivals"]["burstiness"] == 0.5
    assert rec["git_commit"] is None or len(rec["git_commit"]) == 40
    table = (tmp_path / "serve.md").read_text()
    assert "| peer | 40 (gamma 0.5) | 6 |" in table and "| TPOT |" in table


def test_serve_peers_side_by_side_with_conversations_and_a_trace(server, llama_dir, tmp_path):
    common = ["--tokenizer", str(llama_dir), "--result-dir", str(tmp_path), "--no-progress",
              "--target", f"a={server.url}", "--target", f"b={server.url}/v1"]
    assert livelm_main(["bench", "serve", "--workload", "multi-turn", "--num-requests", "2",
                        "--num-turns", "2", "--think-time", "0.05", "--input-len", "6",
                        "--output-len", "3", *common]) == 0
    recs = records(tmp_path / "serve.jsonl")
    assert [r["target"]["name"] for r in recs] == ["a", "b"]
    assert all(r["metrics"]["completed"] == 4 and r["endpoint"] == "auto" for r in recs)
    trace = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "traces", "burstgpt_synthetic.csv")
    assert livelm_main(["bench", "serve", "--trace", trace, "--num-requests", "5", "--time-scale", "0.01",
                        "--max-input-len", "64", "--max-output-len", "4", "--name", "trace", *common[:-4],
                        "--target", server.url]) == 0
    [rec] = records(tmp_path / "trace.jsonl")
    assert rec["arrivals"]["use_timestamps"] and rec["metrics"]["completed"] == 5


def test_serve_records_failed_requests(server, llama_dir, tmp_path):
    # Prompts longer than the server's context: every request is refused with 400.
    assert livelm_main(["bench", "serve", "--target", server.url, "--tokenizer", str(llama_dir),
                        "--num-requests", "2", "--input-len", "300", "--output-len", "4",
                        "--warmup", "0", "--result-dir", str(tmp_path), "--no-progress"]) == 0
    [rec] = records(tmp_path / "serve.jsonl")
    assert rec["metrics"]["completed"] == 0 and rec["metrics"]["failed"] == 2
    assert "HTTP 400" in rec["metrics"]["first_errors"][0]


def test_sweep_writes_json_and_png(server, llama_dir, tmp_path):
    assert livelm_main(["bench", "sweep", "--target", server.url, "--tokenizer", str(llama_dir),
                        "--rates", "30,inf", "--num-requests", "4", "--input-len", "8",
                        "--output-len", "4", "--slo", "ttft=60000", "--result-dir", str(tmp_path),
                        "--no-progress"]) == 0
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert doc["rates"] == [30, None]  # inf is not JSON: null
    assert [r["metrics"]["completed"] for r in doc["runs"]] == [4, 4]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(records(tmp_path / "sweep.jsonl")) == 2


def test_throughput_livelm_and_transformers(llama_dir, tmp_path):
    assert livelm_main(["bench", "throughput", "--model", str(llama_dir), "--num-requests", "4",
                        "--input-len", "uniform:6:12", "--output-len", "4", "--max-model-len", "128",
                        "--kv-cache-gib", "0.05", "--threads", "2", "--result-dir", str(tmp_path),
                        "--repeat", "2", "--no-progress"]) == 0
    recs = records(tmp_path / "throughput.jsonl")
    assert [r["engine"] for r in recs] == ["livelm", "transformers"]
    for r in recs:
        m = r["metrics"]
        assert len(r["runs_seconds"]) == 2 and m["seconds"] == min(r["runs_seconds"])
        assert m["completed"] == 4 and m["total_output_tokens"] == 16
        assert m["output_throughput"] == pytest.approx(16 / m["seconds"])
    assert "livelm speed-up" in (tmp_path / "throughput.md").read_text()
    # A conversation runs round by round; no peer.
    assert livelm_main(["bench", "throughput", "--model", str(llama_dir), "--workload", "multi-turn",
                        "--num-requests", "2", "--num-turns", "2", "--input-len", "5", "--output-len", "3",
                        "--max-model-len", "128", "--kv-cache-gib", "0.05", "--peers", "none",
                        "--name", "chat", "--result-dir", str(tmp_path), "--no-progress"]) == 0
    [rec] = records(tmp_path / "chat.jsonl")
    assert rec["metrics"]["completed"] == 4 and rec["metrics"]["rounds"] == 2


def test_ctrl_c_stops_cleanly_writes_results_and_stops_its_server(llama_dir, tmp_path):
    err = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "livelm.entrypoints.cli", "bench", "serve", "--model", str(llama_dir),
           "--max-model-len", "256", "--kv-cache-gib", "0.05", "--num-requests", "400",
           "--request-rate", "8", "--input-len", "8", "--output-len", "4", "--result-dir", str(tmp_path)]
    with err.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
    try:
        # Generous: a loaded CI machine may compile the kernels inside this window.
        deadline = time.monotonic() + 300
        while "livelm @ 8:" not in err.read_text() or " 3/400 " not in err.read_text():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = err.read_text()
    assert proc.returncode == 130, log
    assert "interrupted" in log and "| livelm | 8 |" in out
    [rec] = records(tmp_path / "serve.jsonl")
    assert rec["interrupted"] and rec["metrics"]["completed"] >= 3 and rec["not_sent"] > 0
    assert rec["metrics"]["duration_s"] < 40
    url = log.split("livelm serve is up at ")[1].split()[0]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
