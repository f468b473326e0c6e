"""Soak: mixed traffic with client aborts for a fixed time, then leaks, errors, RSS, latency.

Starts ``livelm serve`` on a free port of 127.0.0.1 (the embedded default model unless
``--model``), then ``--concurrency`` client tasks draw jobs from a seeded mix for
``--minutes``:

- chat and completions, streamed or not, prompts log-uniform in 10..1,500 tokens (a third
  behind a shared system prefix), 8..64 output tokens, some ``n=2``, some logprobs;
- multi-turn ``session_id`` conversations (a second turn extends the first with its reply;
  half release the pin with ``DELETE``, half leave it to the TTL);
- REST ``/v1/sessions`` input streams (open, append pieces as text or base64 bytes, maybe
  an early reply, close the input, a streamed reply, ``DELETE``);
- WebSocket ``/v1/stream`` sessions (pieces as text or binary, maybe an early reply,
  ``close_input``, the final reply, ``close``);
- a few invalid requests, each of which must get a 4xx.

A fifth of the clients (``--abort-fraction``) abort what they send: a stream is dropped
after 0..4 text chunks, a plain request is cancelled after 0.05..2 s (if its reply has not
come yet), a REST session's reply is dropped and the session then deleted or abandoned (to
the server's ``--stream-idle-timeout``), a WebSocket is closed mid-reply. The job list is
the same for every run with the same ``--seed``; which client gets which job varies.

Two untimed warm-up requests go first (the first step loads, or builds, the C++ kernels).
The server's RSS (``/proc/PID/status`` VmRSS) is sampled every ``--rss-every-s`` seconds,
less the KV cache memory committed so far (``/metrics``: blocks ever written x bytes per
block; the cache is reserved lazily, so it grows as traffic first reaches new blocks and
the prefix cache fills, which is not a leak).
The first ``--warmup-s`` of traffic are left out of the baseline; the stated baseline is
the 5-minute mark, and growth is from there to the end of the traffic. After the traffic,
an idle pause, then ``/metrics`` is polled until the session pins (``--session-ttl-s``)
and abandoned input sessions (``--stream-idle-timeout-s``) have expired:

    leaked KV blocks = total - free - blocks pinned by sessions   (must be 0)

Finally the server gets SIGTERM and must exit with status 0. A request's outcome is
``ok``, ``aborted`` (by the client: no error), ``expected_4xx`` (the invalid mix),
``unexpected_4xx``, ``5xx``, ``stream_error`` (an error event after a 200),
``transport_error`` (no HTTP status: connection failures, timeouts) or
``unexpected_2xx`` (an invalid request that was served). Latency percentiles count ``ok``
requests only: end to end from the first byte sent (a REST or WebSocket session: from
opening it) and, for streams, TTFT (to the first text chunk of the final reply).

Usage::

    python benchmarks/soak.py                       # 30 minutes, 8 clients
    python benchmarks/soak.py --minutes 0.5 --out /tmp/soak-smoke.json   # smoke run

Results: a summary on stdout, the JSON in ``benchmarks/results/soak-<date>.json`` (or
``--out``) and the RSS series as CSV beside it (same name, ``.csv``). The exit status is 1
when a check fails (any 5xx, unexpected 4xx or 2xx, stream or transport error, a leaked
block, RSS growth of 5% or more after the 5-minute mark, a server exit status other than 0).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT  # noqa: E402

from livelm.bench.client import StreamError, chunk_text, sse_events  # noqa: E402
from livelm.bench.local_server import LocalServer  # noqa: E402
from livelm.bench.metrics import percentile  # noqa: E402
from livelm.bench.prompts import PromptMaker  # noqa: E402
from livelm.bench.report import base_record, write_json  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Job kinds and their weights in the mix.
KINDS: dict[str, int] = {
    "chat": 16, "chat_stream": 18, "completion": 12, "completion_stream": 14,
    "session": 12, "input_session": 10, "ws_session": 8, "invalid": 6,
}
STREAM_KINDS = ("chat_stream", "completion_stream", "input_session", "ws_session")
INVALID_VARIANTS = 13
SHARED_PREFIX = ("You are a careful assistant. Answer briefly, plainly and only from the notes "
                 "given; say so when the notes do not tell. ") * 6
# An outcome that counts as an error (every one of them fails the run).
ERROR_OUTCOMES = ("5xx", "unexpected_4xx", "unexpected_2xx", "stream_error", "transport_error")
RSS_GROWTH_LIMIT_PCT = 5.0


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """One unit of client work, drawn from the seeded mix."""

    index: int
    kind: str
    prompt_tokens: int
    max_tokens: int
    temperature: float
    seed: int
    n: int
    logprobs: bool
    stream: bool  # session turns: whether they stream
    shared_prefix: bool
    pieces: int  # input sessions: how many pieces the prompt arrives in
    bytes_pieces: bool  # input sessions: pieces as base64 bytes / binary messages
    early_reply: bool  # input sessions: a reply before the input is closed
    release: bool  # sessions: DELETE at the end (else left to the TTL / idle timeout)
    invalid: int  # which invalid request
    abort_chunks: int  # aborting clients: drop a stream after this many text chunks
    abort_delay_s: float  # aborting clients: cancel a plain request after this long
    text_seed: int


def draw_job(seed: int, index: int) -> Job:
    """Job ``index`` of the mix for ``seed`` (independent of every other job)."""
    rng = random.Random(f"soak-{seed}-{index}")
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    plain = kind in ("chat", "chat_stream", "completion", "completion_stream")
    return Job(
        index=index, kind=kind,
        prompt_tokens=int(math.exp(rng.uniform(math.log(10), math.log(1500)))),
        max_tokens=rng.randint(8, 64), temperature=rng.choice([0.0, 0.7, 1.0]),
        seed=rng.randrange(1 << 30), n=2 if plain and rng.random() < 0.1 else 1,
        logprobs=plain and rng.random() < 0.1, stream=rng.random() < 0.5,
        shared_prefix=rng.random() < 1 / 3, pieces=rng.randint(2, 6),
        bytes_pieces=rng.random() < 0.3, early_reply=rng.random() < 0.25,
        release=rng.random() < 0.5, invalid=rng.randrange(INVALID_VARIANTS),
        abort_chunks=rng.randint(0, 4), abort_delay_s=rng.uniform(0.05, 2.0),
        text_seed=rng.randrange(1 << 30),
    )


def split_pieces(text: str, count: int) -> list[str]:
    """``count`` consecutive pieces of about equal length (cut anywhere, even mid-word)."""
    step = len(text) / count
    cuts = [round(i * step) for i in range(count + 1)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


@dataclass
class Record:
    """What one job (a request, a session's turn, a whole input session) came to."""

    kind: str
    client: int
    job: int
    start_s: float  # since the traffic started
    latency_s: float = 0.0
    ttft_s: float | None = None
    status: int = 0  # HTTP status (WebSocket: 200, or the status of its error event); 0: none
    aborted: bool = False
    error: str | None = None
    detail: dict = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        """ok, aborted, expected_4xx, unexpected_4xx, unexpected_2xx, 5xx, stream_error
        or transport_error."""
        if self.status >= 500:
            return "5xx"
        if self.aborted:
            return "aborted"
        if self.status == 0:
            return "transport_error"
        if self.kind == "invalid":
            return "expected_4xx" if 400 <= self.status < 500 else "unexpected_2xx"
        if 400 <= self.status < 500:
            return "unexpected_4xx"
        return "stream_error" if self.error else "ok"


# ----------------------------------------------------------------------------- the client


class Aborted(Exception):
    """The client gave up on its request on purpose."""


class SoakClient:
    """Runs jobs against the server; aborting clients abort each of theirs."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, model: str, maker: PromptMaker,
                 t0: float) -> None:
        self.http = http
        self.base = base_url
        self.ws_base = base_url.replace("http://", "ws://", 1)
        self.model = model
        self.maker = maker
        self.t0 = t0

    # -- helpers

    def prompt(self, job: Job, tokens: int | None = None) -> str:
        """Seeded text of about ``job.prompt_tokens`` tokens (the shared prefix on top)."""
        self.maker.rng = random.Random(job.text_seed)  # each job's text is its own
        text, _ = self.maker.text(tokens or job.prompt_tokens)
        return SHARED_PREFIX + text if job.shared_prefix else text

    def sampling(self, job: Job) -> dict:
        return {"model": self.model, "max_tokens": job.max_tokens,
                "temperature": job.temperature, "seed": job.seed}

    async def post(self, rec: Record, path: str, body: dict, abort: bool, job: Job) -> dict:
        """A plain POST; an aborting client cancels it after ``abort_delay_s``."""
        req = self.http.post(self.base + path, json=body)
        if abort:
            try:
                resp = await asyncio.wait_for(req, job.abort_delay_s)
            except TimeoutError:
                raise Aborted from None
        else:
            resp = await req
        rec.status = resp.status_code
        if resp.status_code != 200:
            rec.error = resp.text[:300]
            return {}
        return resp.json()

    async def stream(self, rec: Record, path: str, body: dict, abort: bool, job: Job,
                     sent: float) -> str:
        """An SSE POST; TTFT from ``sent``; an aborting client drops it after
        ``abort_chunks`` text chunks. Returns choice 0's text."""
        text: list[str] = []
        async with self.http.stream("POST", self.base + path, json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.error = (await resp.aread()).decode(errors="replace")[:300]
                return ""
            if abort and job.abort_chunks == 0:
                raise Aborted  # leaving the block closes the connection
            chunks = 0
            try:
                async for event in sse_events(resp):
                    piece = chunk_text(event, index=0)
                    if piece:
                        if rec.ttft_s is None:
                            rec.ttft_s = time.perf_counter() - sent
                        text.append(piece)
                        chunks += 1
                        if abort and chunks >= job.abort_chunks:
                            raise Aborted
            except StreamError as e:
                rec.error = str(e)
                return ""
        return "".join(text)

    # -- the job kinds

    async def run(self, job: Job, client: int, abort: bool) -> list[Record]:
        """Run one job; a session's turns give one record each."""
        start = time.perf_counter()
        rec = Record(job.kind, client, job.index, start - self.t0)
        records = [rec]
        try:
            if job.kind in ("chat", "chat_stream", "completion", "completion_stream"):
                await self.plain(rec, job, abort, start)
            elif job.kind == "session":
                await self.session(records, job, abort)
            elif job.kind == "input_session":
                await self.input_session(rec, job, abort)
            elif job.kind == "ws_session":
                await self.ws_session(rec, job, abort)
            else:
                await self.invalid(rec, job)
        except Aborted:
            records[-1].aborted = True
        except Exception as e:  # noqa: BLE001 (httpx's, websockets', anything unforeseen)
            rec = records[-1]
            rec.status = 0 if rec.status in (0, 200) else rec.status  # a failure after a 200
            rec.error = f"{type(e).__name__}: {e}"[:300]
        rec = records[-1]
        if rec.latency_s == 0.0:
            rec.latency_s = time.perf_counter() - (self.t0 + rec.start_s)
        return records

    async def plain(self, rec: Record, job: Job, abort: bool, start: float) -> None:
        body = self.sampling(job)
        chat = job.kind.startswith("chat")
        prompt = self.prompt(job)
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if job.n > 1:
            body["n"] = job.n
        if job.logprobs:
            body.update({"logprobs": True, "top_logprobs": 3} if chat else {"logprobs": 3})
        rec.detail = {"n": job.n, "logprobs": job.logprobs, "prompt_tokens": job.prompt_tokens}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if job.kind.endswith("_stream"):
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            await self.stream(rec, path, body, abort, job, start)
        else:
            await self.post(rec, path, body, abort, job)

    async def session(self, records: list[Record], job: Job, abort: bool) -> None:
        """Two turns of one ``session_id`` conversation; the second extends the first and
        gets a record of its own, appended to ``records``."""
        session_id = f"soak-{job.index}-{job.text_seed}"
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": self.prompt(job)}]
        for turn in (1, 2):
            start = time.perf_counter()
            if turn == 1:
                rec = records[0]
            else:
                rec = Record("session", records[0].client, job.index, start - self.t0)
                records.append(rec)
            rec.detail = {"turn": turn, "stream": job.stream, "prompt_tokens": job.prompt_tokens}
            body = {**self.sampling(job), "messages": messages, "session_id": session_id}
            turn_abort = abort and turn == 2  # an aborting client drops the second turn
            try:
                if job.stream:
                    body["stream"] = True
                    reply = await self.stream(rec, "/v1/chat/completions", body, turn_abort, job, start)
                else:
                    out = await self.post(rec, "/v1/chat/completions", body, turn_abort, job)
                    reply = out["choices"][0]["message"]["content"] if out else ""
            finally:
                rec.latency_s = time.perf_counter() - start
            if rec.status != 200 or rec.error:
                break
            messages = messages + [{"role": "assistant", "content": reply},
                                   {"role": "user", "content": "And then? In one line."}]
        if job.release:
            resp = await self.http.delete(f"{self.base}/v1/sessions/{session_id}")
            if resp.status_code >= 500:
                records[-1].status, records[-1].error = resp.status_code, f"DELETE: {resp.text[:200]}"

    async def input_session(self, rec: Record, job: Job, abort: bool) -> None:
        """A REST streaming-input session; the record's status is the first failure's."""
        base = f"{self.base}/v1/sessions"
        resp = await self.http.post(base, json={})
        rec.status = resp.status_code
        if resp.status_code != 200:
            rec.error = f"open: {resp.text[:200]}"
            return
        sid = resp.json()["session_id"]
        released = False
        try:
            pieces = split_pieces(self.prompt(job), job.pieces)
            for k, piece in enumerate(pieces):
                body = ({"bytes": base64.b64encode(piece.encode()).decode()} if job.bytes_pieces
                        else {"text": piece})
                resp = await self.http.post(f"{base}/{sid}/input", json=body)
                if resp.status_code != 200:
                    rec.status, rec.error = resp.status_code, f"input: {resp.text[:200]}"
                    return
                if job.early_reply and k == len(pieces) // 2:
                    early = {"max_tokens": 4, "temperature": 0.0, "suffix": "\nSo far:"}
                    resp = await self.http.post(f"{base}/{sid}/generate", json=early)
                    if resp.status_code != 200:
                        rec.status, rec.error = resp.status_code, f"early reply: {resp.text[:200]}"
                        return
            resp = await self.http.post(f"{base}/{sid}/input", json={"close": True})
            if resp.status_code != 200:
                rec.status, rec.error = resp.status_code, f"close input: {resp.text[:200]}"
                return
            body = {"max_tokens": job.max_tokens, "temperature": job.temperature,
                    "seed": job.seed, "stream": True, "suffix": "\nIn short:"}
            await self.stream(rec, f"/v1/sessions/{sid}/generate", body, abort, job,
                              time.perf_counter())
        finally:
            rec.latency_s = time.perf_counter() - (self.t0 + rec.start_s)
            if job.release or not abort:  # an aborting client may just vanish
                resp = await self.http.delete(f"{base}/{sid}")
                released = True
                if resp.status_code >= 500:
                    rec.status, rec.error = resp.status_code, f"DELETE: {resp.text[:200]}"
            rec.detail = {"pieces": job.pieces, "bytes": job.bytes_pieces,
                          "early_reply": job.early_reply, "deleted": released}

    async def ws_session(self, rec: Record, job: Job, abort: bool) -> None:
        """A ``/v1/stream`` session; the record's status is 200 or its error event's."""
        from websockets.asyncio.client import connect

        rec.detail = {"pieces": job.pieces, "binary": job.bytes_pieces, "early_reply": job.early_reply}
        async with connect(self.ws_base + "/v1/stream", max_size=1 << 24, open_timeout=60) as ws:
            rec.status = 200
            for k, piece in enumerate(split_pieces(self.prompt(job), job.pieces)):
                if job.bytes_pieces:
                    await ws.send(piece.encode())
                else:
                    await ws.send(json.dumps({"type": "append", "text": piece}))
                if job.early_reply and k == job.pieces // 2:
                    await ws.send(json.dumps({"type": "generate", "id": "early", "max_tokens": 4,
                                              "temperature": 0.0}))
            await ws.send(json.dumps({"type": "close_input"}))
            sent = time.perf_counter()
            await ws.send(json.dumps({"type": "generate", "id": "final", "max_tokens": job.max_tokens,
                                      "temperature": job.temperature, "seed": job.seed}))
            if abort and job.abort_chunks == 0:
                raise Aborted  # leaving the block closes the socket
            pending = {"final", "early"} if job.early_reply else {"final"}
            deltas = 0
            while pending:
                event = json.loads(await asyncio.wait_for(ws.recv(), 300))
                kind = event.get("type")
                if kind == "error":
                    rec.status = int(event.get("status") or 0)
                    rec.error = f"ws error event: {event.get('code')}: {event.get('message', '')[:200]}"
                    return
                if kind == "delta" and event.get("id") == "final" and event.get("text"):
                    if rec.ttft_s is None:
                        rec.ttft_s = time.perf_counter() - sent
                    deltas += 1
                    if abort and deltas >= job.abort_chunks:
                        raise Aborted
                elif kind == "done":
                    pending.discard(event.get("id"))
            rec.latency_s = time.perf_counter() - (self.t0 + rec.start_s)
            await ws.send(json.dumps({"type": "close"}))

    async def invalid(self, rec: Record, job: Job) -> None:
        """One of :data:`INVALID_VARIANTS` requests that must be refused with a 4xx."""
        v = job.invalid
        rec.detail = {"variant": v}
        chat, cmpl = self.base + "/v1/chat/completions", self.base + "/v1/completions"
        m = self.model
        if v == 0:
            resp = await self.http.post(cmpl, content=b'{"model": "x", "prompt": ',
                                        headers={"content-type": "application/json"})
        elif v == 1:
            resp = await self.http.post(chat, json={"model": m, "messages": []})
        elif v == 2:
            resp = await self.http.post(cmpl, json={"model": m, "prompt": "hi", "max_tokens": -3})
        elif v == 3:
            resp = await self.http.post(chat, json={"model": m, "temperature": "hot",
                                                    "messages": [{"role": "user", "content": "hi"}]})
        elif v == 4:  # longer than the context
            resp = await self.http.post(cmpl, json={"model": m, "max_tokens": 4,
                                                    "prompt": self.prompt(job, tokens=10_000)})
        elif v == 5:
            resp = await self.http.post(chat, json={"model": m, "n": 0,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        elif v == 6:
            resp = await self.http.post(cmpl, json={"model": m, "prompt": [999_999_999, 3, 4]})
        elif v == 7:
            resp = await self.http.post(chat, json={"model": m, "messages": [{"role": "wizard", "content": "x"}]})
        elif v == 8:
            resp = await self.http.post(cmpl, json={"model": "no-such-model", "prompt": "hi"})
        elif v == 9:  # over --max-body-bytes (8 MiB)
            resp = await self.http.post(cmpl, content=b'{"prompt": "' + b"a" * (9 << 20) + b'"}',
                                        headers={"content-type": "application/json"})
        elif v == 10:
            resp = await self.http.post(self.base + "/v1/sessions/no-such-session/input",
                                        json={"text": "hi"})
        elif v == 11:  # text and tokens in one piece
            opened = await self.http.post(self.base + "/v1/sessions", json={})
            if opened.status_code != 200:
                rec.status, rec.error = opened.status_code, f"open: {opened.text[:200]}"
                return
            sid = opened.json()["session_id"]
            resp = await self.http.post(f"{self.base}/v1/sessions/{sid}/input",
                                        json={"text": "x", "tokens": [1]})
            await self.http.delete(f"{self.base}/v1/sessions/{sid}")
        else:  # a WebSocket message that is no JSON: an error event, the socket stays open
            from websockets.asyncio.client import connect

            async with connect(self.ws_base + "/v1/stream", open_timeout=60) as ws:
                await ws.send("{not json")
                event = json.loads(await asyncio.wait_for(ws.recv(), 60))
                rec.status = int(event.get("status") or 0) if event.get("type") == "error" else 200
                rec.error = event.get("code")
                await ws.send(json.dumps({"type": "close"}))
            return
        rec.status = resp.status_code
        rec.error = resp.text[:200] if resp.status_code != 200 else None


# ----------------------------------------------------------------------------- RSS


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MiB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler(threading.Thread):
    """Samples a process's RSS less its committed KV cache every ``every_s`` seconds:
    (t_s, phase, rss_less_kv_mb, done, kv_mb).

    Phases: ``start`` (the server idle, then the warm-up requests), ``warmup`` (the first
    ``--warmup-s`` of traffic), ``traffic``, ``idle`` (after it)."""

    def __init__(self, pid: int, every_s: float, base_url: str) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid = pid
        self.base_url = base_url
        self.every_s = every_s
        self.t0 = time.monotonic()
        self.phase = "start"
        self.done = 0  # jobs finished so far (set by the traffic)
        self.samples: list[tuple[float, str, float, int, float]] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def restart_clock(self) -> None:
        """Time from now on (the start of the traffic); earlier samples get t < 0."""
        now = time.monotonic()
        with self._lock:
            shift = now - self.t0
            self.samples = [(round(t - shift, 1), p, r, d, k) for t, p, r, d, k in self.samples]
            self.t0 = now

    def kv_mb(self) -> float:
        """The KV cache memory the server has committed (blocks ever written), in MiB."""
        try:
            m = read_metrics(self.base_url)
        except (httpx.HTTPError, ValueError):
            return 0.0
        return m.get("livelm_kv_cache_touched_blocks", 0.0) * m.get("livelm_kv_cache_block_bytes", 0.0) / 2**20

    def sample(self) -> float | None:
        kv = self.kv_mb()
        value = rss_mb(self.pid)
        if value is not None:
            value -= kv
            with self._lock:
                self.samples.append((round(time.monotonic() - self.t0, 1), self.phase, value, self.done, kv))
        return value

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def write_csv(self, path: Path) -> None:
        with self._lock:
            rows = list(self.samples)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["t_s,phase,rss_less_kv_mb,jobs_done,kv_mb"] + [
            f"{t},{p},{r:.1f},{d},{k:.1f}" for t, p, r, d, k in rows]
        path.write_text("\n".join(lines) + "\n")


def rss_summary(samples: list[tuple[float, str, float, int, float]], warmup_s: float,
                traffic_s: float) -> dict:
    """Baselines and growth of the RSS series less committed KV (t measured from the start
    of traffic)."""
    traffic = [(t, r) for t, p, r, _, _ in samples if p in ("warmup", "traffic")]
    after = [(t, r) for t, p, r, _, _ in samples if p == "idle"]

    def at(mark_s: float) -> float | None:
        if not traffic or traffic_s < mark_s:
            return None
        return min(traffic, key=lambda tr: abs(tr[0] - mark_s))[1]

    start = next((r for t, r in traffic if t >= warmup_s), None)
    end = traffic[-1][1] if traffic else None
    at_5 = at(300.0)

    def growth(base: float | None) -> float | None:
        return None if base is None or end is None else 100.0 * (end - base) / base

    return {
        "warmup_s": warmup_s,
        "server_up_mb": next((r for _, p, r, _, _ in samples if p == "start"), None),
        "before_traffic_mb": next((r for _, p, r, _, _ in reversed(samples) if p == "start"), None),
        "start_mb": start, "at_5min_mb": at_5, "at_30min_mb": at(1800.0), "end_mb": end,
        "after_idle_mb": after[-1][1] if after else None,
        "max_mb": max((r for _, _, r, _, _ in samples), default=None),
        "kv_end_mb": samples[-1][4] if samples else None,
        "growth_5min_to_end_pct": growth(at_5) if traffic_s > 300.0 else None,
        "growth_start_to_end_pct": growth(start),
        "samples": len(samples),
    }


# ----------------------------------------------------------------------------- /metrics


def read_metrics(base_url: str) -> dict[str, float]:
    """``/metrics`` as {name or name{label=value}: value}."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                            if s.labels else "")
            out[key] = s.value
    return out


def kv_state(m: dict[str, float]) -> dict:
    """KV blocks and what holds them; leaked = in use and held by no session pin."""
    total = int(m.get("livelm_kv_cache_total_blocks", 0))
    free = int(m.get("livelm_kv_cache_free_blocks", 0))
    pinned = int(m.get("livelm_session_pinned_blocks", 0))
    return {
        "total_blocks": total, "free_blocks": free, "used_blocks": total - free,
        "pinned_blocks": pinned, "leaked_blocks": total - free - pinned,
        "sessions_pinned": int(m.get("livelm_sessions", 0)),
        "input_streams": int(m.get("livelm_input_streams", 0)),
        "websockets": int(m.get("livelm_server_websockets", 0)),
        "running": int(m.get("livelm_num_requests_running", 0)),
        "waiting": int(m.get("livelm_num_requests_waiting", 0)),
        "in_flight": int(m.get("livelm_server_sequences_in_flight", 0)),
        "engine_alive": m.get("livelm_engine_alive"),
    }


def settled(kv: dict) -> bool:
    """Nothing runs, waits, is pinned or is open any more."""
    return not any(kv[k] for k in ("pinned_blocks", "input_streams", "websockets", "running",
                                   "waiting", "in_flight"))


def wait_settled(base_url: str, timeout_s: float) -> tuple[dict, dict[str, float], float]:
    """Poll ``/metrics`` until :func:`settled` or ``timeout_s``: (kv, metrics, seconds)."""
    t0 = time.monotonic()
    while True:
        m = read_metrics(base_url)
        kv = kv_state(m)
        if settled(kv) or time.monotonic() - t0 > timeout_s:
            return kv, m, time.monotonic() - t0
        time.sleep(1.0)


def server_counters(m: dict[str, float]) -> dict:
    """The counters worth keeping: finish reasons, rejections, pins released, cache hits."""
    keep = ("livelm_requests_total", "livelm_requests_rejected_total", "livelm_num_preemptions_total",
            "livelm_session_pins_released_total", "livelm_prefix_cache_hit_tokens_total",
            "livelm_prefix_cache_queried_tokens_total", "livelm_prompt_tokens_total",
            "livelm_generation_tokens_total")
    return {k: v for k, v in m.items() if k.split("{")[0] in keep}


# ----------------------------------------------------------------------------- traffic


async def warm_up(http: httpx.AsyncClient, base_url: str, model: str, maker: PromptMaker) -> float:
    """Untimed requests before the traffic (the first step loads, or builds, the C++ kernels:
    tens of seconds when their build cache is stale); returns the seconds they took."""
    t0 = time.perf_counter()
    text, _ = maker.text(1500)
    for body in ({"prompt": text, "max_tokens": 8},
                 {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8, "stream": True}):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        resp = await http.post(base_url + path, json={"model": model, **body}, timeout=900.0)
        if resp.status_code != 200:
            raise RuntimeError(f"warm-up request got {resp.status_code}: {resp.text[:300]}")
    return time.perf_counter() - t0


async def traffic(args: argparse.Namespace, base_url: str, maker: PromptMaker,
                  sampler: RssSampler) -> tuple[list[Record], float, int, float]:
    """Clients draw jobs until the deadline: (records, traffic seconds, aborting clients,
    warm-up seconds)."""
    limits = httpx.Limits(max_connections=args.concurrency * 4, max_keepalive_connections=args.concurrency)
    aborting = min(args.concurrency, round(args.concurrency * args.abort_fraction))
    records: list[Record] = []
    jobs = itertools.count()
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout_s, connect=30.0),
                                 limits=limits) as http:
        model = (await http.get(base_url + "/v1/models")).json()["data"][0]["id"]
        warm_s = await warm_up(http, base_url, model, maker)
        print(f"[soak] warm-up requests took {warm_s:.1f} s; traffic starts", file=sys.stderr, flush=True)
        sampler.sample()  # the RSS before the traffic
        t0 = time.perf_counter()
        sampler.restart_clock()
        sampler.phase = "warmup"
        soak = SoakClient(http, base_url, model, maker, t0)
        deadline = t0 + args.minutes * 60.0

        async def client(c: int) -> None:
            # Aborting clients are spread over the indices (8 clients, 0.2: clients 3 and 7).
            abort = c * aborting // args.concurrency != (c + 1) * aborting // args.concurrency
            while time.perf_counter() < deadline:
                records.extend(await soak.run(draw_job(args.seed, next(jobs)), c, abort))
                sampler.done += 1
                if sampler.phase == "warmup" and time.perf_counter() - t0 >= warmup_s(args):
                    sampler.phase = "traffic"

        progress = asyncio.create_task(report_progress(records, t0, args.minutes * 60.0))
        try:
            await asyncio.gather(*(client(c) for c in range(args.concurrency)))
        finally:
            progress.cancel()
        return records, time.perf_counter() - t0, aborting, warm_s


async def report_progress(records: list[Record], t0: float, total_s: float) -> None:
    """A line on stderr every minute: jobs done, errors so far."""
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            await asyncio.sleep(60)
            errors = sum(r.outcome in ERROR_OUTCOMES for r in records)
            print(f"[soak] {time.perf_counter() - t0:6.0f}/{total_s:.0f} s: {len(records)} requests, "
                  f"{errors} errors", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- summary


def latency_stats(recs: list[Record]) -> dict:
    """p50/p99 of end-to-end latency and TTFT (ms) over ``ok`` records."""
    ok = [r for r in recs if r.outcome == "ok"]
    e2e = [r.latency_s * 1000 for r in ok]
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    out = {"ok": len(ok), "e2e_p50_ms": percentile(e2e, 50), "e2e_p99_ms": percentile(e2e, 99)}
    if ttft:
        out.update(ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99))
    return out


def request_summary(records: list[Record]) -> dict:
    """Counts by kind, status and outcome, latency, and the first errors."""
    def statuses(recs: list[Record]) -> dict[str, int]:
        return dict(sorted(Counter("aborted" if r.aborted and r.status < 500 else str(r.status)
                                   for r in recs).items()))

    kinds = sorted({r.kind for r in records})
    outcomes = Counter(r.outcome for r in records)
    by_kind = {}
    for kind in kinds:
        recs = [r for r in records if r.kind == kind]
        by_kind[kind] = {"requests": len(recs), "by_status": statuses(recs),
                         "outcomes": dict(Counter(r.outcome for r in recs)), **latency_stats(recs)}
    errors = [r for r in records if r.outcome in ERROR_OUTCOMES]
    return {
        "requests": len(records),
        "by_status": statuses(records),
        "outcomes": dict(outcomes),
        "errors_5xx": outcomes["5xx"],
        "unexpected_4xx": outcomes["unexpected_4xx"],
        "unexpected_2xx": outcomes["unexpected_2xx"],
        "stream_errors": outcomes["stream_error"],
        "transport_errors": outcomes["transport_error"],
        "expected_4xx": outcomes["expected_4xx"],
        "expected_4xx_by_status": dict(Counter(str(r.status) for r in records if r.outcome == "expected_4xx")),
        "aborted": outcomes["aborted"],
        "latency": latency_stats(records),
        "by_kind": by_kind,
        "first_errors": [{k: v for k, v in asdict(r).items() if k in ("kind", "status", "error", "detail")}
                         for r in errors[:20]],
    }


def checks(summary: dict) -> dict[str, bool | None]:
    """The soak's pass criteria (None: not measurable in a run this short)."""
    req, kv, rss = summary["requests"], summary["kv_final"], summary["rss"]
    growth = rss["growth_5min_to_end_pct"]
    return {
        "no_5xx": req["errors_5xx"] == 0,
        "no_unexpected_4xx": req["unexpected_4xx"] == 0,
        "invalid_all_refused": req["unexpected_2xx"] == 0,
        "no_stream_or_transport_errors": req["stream_errors"] + req["transport_errors"] == 0,
        "no_leaked_blocks": kv["leaked_blocks"] == 0,
        "all_released": settled(kv),
        "rss_growth_under_5pct": None if growth is None else growth < RSS_GROWTH_LIMIT_PCT,
        "server_exit_0": summary["server"]["exit_code"] == 0,
    }


def print_summary(s: dict) -> None:
    req, kv, rss = s["requests"], s["kv_final"], s["rss"]

    def f(x: float | None, unit: str = "") -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}{unit}"

    print(f"soak: {s['traffic_s']:.0f} s of traffic, {s['concurrency']} clients "
          f"({s['aborting_clients']} aborting), seed {s['seed']}, commit {str(s['git_commit'])[:10]}")
    print(f"requests: {req['requests']}  by status: {req['by_status']}")
    print(f"  5xx {req['errors_5xx']}, unexpected 4xx {req['unexpected_4xx']}, invalid served "
          f"{req['unexpected_2xx']}, stream errors {req['stream_errors']}, transport errors "
          f"{req['transport_errors']}; expected 4xx {req['expected_4xx']} "
          f"{req['expected_4xx_by_status']}; aborted by clients {req['aborted']}")
    print(f"{'kind':<18}{'reqs':>6}{'ok':>6}{'abort':>6}{'err':>5}{'e2e p50':>10}{'e2e p99':>10}"
          f"{'ttft p50':>10}{'ttft p99':>10}")
    rows = [*s["requests"]["by_kind"].items(), ("all", {**req["latency"], "requests": req["requests"],
                                                         "outcomes": req["outcomes"]})]
    for kind, k in rows:
        o = k["outcomes"]
        err = sum(o.get(e, 0) for e in ERROR_OUTCOMES)
        print(f"{kind:<18}{k['requests']:>6}{k['ok']:>6}{o.get('aborted', 0):>6}{err:>5}"
              f"{f(k['e2e_p50_ms']):>10}{f(k['e2e_p99_ms']):>10}{f(k.get('ttft_p50_ms')):>10}"
              f"{f(k.get('ttft_p99_ms')):>10}")
    print(f"KV blocks at the end: {kv['used_blocks']} in use of {kv['total_blocks']}, "
          f"{kv['pinned_blocks']} pinned, leaked {kv['leaked_blocks']} (after {s['settle_s']:.0f} s; "
          f"input streams {kv['input_streams']}, running {kv['running']}, waiting {kv['waiting']})")
    print(f"RSS less committed KV, MiB (KV at the end {f(rss['kv_end_mb'])}): server up {f(rss['server_up_mb'])}, before traffic {f(rss['before_traffic_mb'])}, after warm-up {f(rss['start_mb'])}, "
          f"5 min {f(rss['at_5min_mb'])}, 30 min {f(rss['at_30min_mb'])}, end {f(rss['end_mb'])}, "
          f"after idle {f(rss['after_idle_mb'])}, max {f(rss['max_mb'])}; growth 5 min -> end "
          f"{f(rss['growth_5min_to_end_pct'], '%')}, warm-up -> end {f(rss['growth_start_to_end_pct'], '%')}")
    print(f"server exit status {s['server']['exit_code']}; log errors: {len(s['server']['log_errors'])}")
    print("checks: " + ", ".join(f"{k} {'-' if v is None else 'ok' if v else 'FAIL'}"
                                 for k, v in s["checks"].items()))
    print(f"results: {s['out']} (RSS series: {s['rss_csv']})")


# ----------------------------------------------------------------------------- the server


def stop_server(server: LocalServer, timeout_s: float = 60.0) -> tuple[int | None, list[str]]:
    """SIGTERM (a clean drain), wait; (exit status, error lines of its log)."""
    proc = server.proc
    code = None
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None  # stop() kills it
    log = server.log_tail(1 << 30).splitlines()
    errors = [line for line in log if "Traceback" in line or "ERROR" in line or "CRITICAL" in line]
    server.stop()
    return code, errors[:50]


def warmup_s(args: argparse.Namespace) -> float:
    """Traffic left out of the RSS baseline: ``--warmup-s``, at most half the run."""
    return min(args.warmup_s, args.minutes * 30.0)


def serve_args(args: argparse.Namespace) -> list[str]:
    return ["--session-ttl", str(args.session_ttl_s), "--stream-idle-timeout",
            str(args.stream_idle_timeout_s), *args.serve_arg]


def run(args: argparse.Namespace) -> dict:
    """Start the server, run the traffic, settle, measure, stop: the summary."""
    from livelm.engine.tokenizer import load_tokenizer
    from livelm.models.resolve import resolve_model_path

    maker = PromptMaker(load_tokenizer(resolve_model_path(args.model)), seed=args.seed)
    record = base_record("soak")
    server = LocalServer(args.model, serve_args(args)).start()
    print(f"[soak] livelm serve up at {server.url} (pid {server.proc.pid}); "
          f"{args.minutes:g} min of traffic", file=sys.stderr, flush=True)
    pid = server.proc.pid
    sampler = RssSampler(pid, args.rss_every_s, server.url)
    code, log_errors = None, []
    try:
        sampler.sample()  # the server idle, as it came up
        sampler.start()
        records, traffic_s, aborting, warm_s = asyncio.run(traffic(args, server.url, maker, sampler))
        sampler.sample()
        kv_end = kv_state(read_metrics(server.url))
        sampler.phase = "idle"
        time.sleep(args.idle_s)
        settle_timeout = max(args.session_ttl_s, args.stream_idle_timeout_s) + 15.0
        kv_final, metrics, settle_s = wait_settled(server.url, settle_timeout)
        sampler.sample()
    finally:
        sampler.stop()
        code, log_errors = stop_server(server)
    summary = {
        **record, "model": args.model or "default", "minutes": args.minutes,
        "concurrency": args.concurrency, "aborting_clients": aborting, "seed": args.seed,
        "session_ttl_s": args.session_ttl_s, "stream_idle_timeout_s": args.stream_idle_timeout_s,
        "serve_args": serve_args(args), "warmup_requests_s": warm_s, "traffic_s": traffic_s, "idle_s": args.idle_s,
        "settle_s": args.idle_s + settle_s,
        "requests": request_summary(records), "kv_at_traffic_end": kv_end, "kv_final": kv_final,
        "leaked_blocks": kv_final["leaked_blocks"], "server_counters": server_counters(metrics),
        "rss": rss_summary(sampler.samples, warmup_s(args), traffic_s),
        "server": {"pid": pid, "exit_code": code,
                   "log_errors": log_errors},
    }
    summary["checks"] = checks(summary)
    summary["passed"] = all(v is not False for v in summary["checks"].values())
    out = Path(args.out) if args.out else RESULTS_DIR / f"soak-{datetime.now():%Y%m%d-%H%M%S}.json"
    csv = out.with_suffix(".csv")
    summary["out"], summary["rss_csv"] = str(out), str(csv)
    sampler.write_csv(csv)
    write_json(out, summary)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    assert __doc__
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory, GGUF file or hub id (default: embedded model)")
    p.add_argument("--minutes", type=float, default=30.0, help="traffic duration (default 30; 0.5 for a smoke run)")
    p.add_argument("--concurrency", type=int, default=8, help="client tasks (default 8)")
    p.add_argument("--abort-fraction", type=float, default=0.2, help="share of clients that abort (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-s", type=float, default=60.0, help="traffic left out of the RSS baseline")
    p.add_argument("--rss-every-s", type=float, default=5.0, help="RSS sampling period")
    p.add_argument("--idle-s", type=float, default=10.0, help="pause after the traffic before the final check")
    p.add_argument("--session-ttl-s", type=float, default=5.0, help="server --session-ttl (pins expire before the check)")
    p.add_argument("--stream-idle-timeout-s", type=float, default=20.0,
                   help="server --stream-idle-timeout (closes abandoned input sessions before the check)")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="an extra `livelm serve` argument (repeatable), e.g. --serve-arg=--max-num-seqs=16")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/soak-<date>.json); CSV beside it")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or not 0 <= args.abort_fraction <= 1:
        p.error("--minutes must be > 0, --concurrency >= 1, --abort-fraction in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    summary = run(parse_args(argv))
    print_summary(summary)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
