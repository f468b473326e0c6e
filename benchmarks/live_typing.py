"""Live prefill while typing: time from Enter to the first token, vs plain chat.

What the chat page at ``/`` does, without a browser: a scripted typist types a ~300-token
message at 8 characters per second; the draft goes into a ``/v1/stream`` session as the
page sends it (the chat template's text up to the draft, at most one update per 120 ms,
``append`` when it only grew). At Enter the user turn is closed in the session and the
reply asked for there. The plain arm sends the same message as a streamed
``/v1/chat/completions`` request at Enter. Both arms run against one ``livelm serve``
(a subprocess, the default model unless ``--model``), each rep under its own cache salt so
no arm reuses another's KV, and both are greedy: the replies must be equal.

Usage::

    python benchmarks/live_typing.py                 # the embedded default model
    python benchmarks/live_typing.py --reps 2 --cps 8

Results: stdout and one JSON line in ``benchmarks/results/live_typing.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, append_jsonl, utc_now  # noqa: E402

from livelm.bench.machine import git_commit, machine_info  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "live_typing.jsonl"
SENTINEL = "\u2063livelm-draft-7f3a\u2063"  # as the page's app.js
SYNC_INTERVAL_S = 0.12  # the page's DEBOUNCE_MS
_WORDS = ("please summarise the plan for the new office: the team moves in March, the budget "
          "covers desks and screens, the kitchen opens later, two meeting rooms face the "
          "river, parking is limited, bikes are welcome and the lease runs for five years "
          "with an option to extend").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def live_arm(url: str, message: str, cps: float, salt: str, max_tokens: int) -> dict:
    """Type ``message`` into a session at ``cps``; return Enter -> first token and the reply."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        rendered = (await http.post("/v1/chat/template", json={
            "messages": [{"role": "user", "content": SENTINEL}]})).json()["prompt"]
    prefix, suffix = rendered.split(SENTINEL)
    ws_url = url.replace("http", "ws", 1) + "/v1/stream"
    async with websockets.connect(ws_url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "open", "cache_salt": salt}))
        states: list[dict] = []

        async def read_until(kind: str) -> dict:
            while True:
                ev = json.loads(await ws.recv())
                if ev["type"] == "state":
                    states.append(ev)
                if ev["type"] == kind:
                    return ev
                if ev["type"] == "error":
                    raise RuntimeError(ev)

        await read_until("session")
        reader = asyncio.create_task(read_until("never"))  # keeps states up to date
        sent = ""
        last_sync = 0.0
        start = time.perf_counter()
        for i in range(1, len(message) + 1):
            # The typist's i-th character lands at i / cps seconds.
            await asyncio.sleep(max(0.0, start + i / cps - time.perf_counter()))
            now = time.perf_counter()
            if now - last_sync >= SYNC_INTERVAL_S or i == 1:
                draft = prefix + message[:i].strip()
                if draft.startswith(sent) and sent:
                    await ws.send(json.dumps({"type": "append", "text": draft[len(sent):]}))
                else:
                    await ws.send(json.dumps({"type": "replace", "text": draft}))
                sent, last_sync = draft, now
        await asyncio.sleep(max(0.0, start + (len(message) + 1) / cps - time.perf_counter()))
        computed_at_enter = states[-1]["num_computed_tokens"] if states else 0
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        # Enter: the rest of the draft and the assistant header, then the reply.
        t0 = time.perf_counter()
        final = prefix + message.strip() + suffix
        await ws.send(json.dumps({"type": "append", "text": final[len(sent):]}))
        await ws.send(json.dumps({"type": "generate", "id": "r", "temperature": 0,
                                  "max_tokens": max_tokens}))
        ttft = None
        text = ""
        while True:
            ev = json.loads(await ws.recv())
            if ev["type"] == "delta":
                if ttft is None and (ev["text"] or ev["token_ids"]):
                    ttft = time.perf_counter() - t0
                text += ev["text"]
            elif ev["type"] == "done":
                usage = ev["usage"]
                break
            elif ev["type"] == "error":
                raise RuntimeError(ev)
        await ws.send(json.dumps({"type": "close"}))
    return {"ttft_s": ttft, "text": text, "prompt_tokens": usage["prompt_tokens"],
            "prefilled_before_enter": computed_at_enter,
            "typing_s": len(message) / cps}


async def plain_arm(url: str, message: str, salt: str, max_tokens: int) -> dict:
    """The same message as a streamed chat request sent at Enter."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        t0 = time.perf_counter()
        ttft = None
        text = ""
        async with http.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": message.strip()}], "stream": True,
                "temperature": 0, "max_tokens": max_tokens, "cache_salt": salt}) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece and ttft is None:
                        ttft = time.perf_counter() - t0
                    text += piece
    return {"ttft_s": ttft, "text": text}


def start_server(model: str | None, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "livelm.entrypoints.serve_cli", "--port", str(port),
           "--log-level", "warning", "--no-web-ui"]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, env={**os.environ, "LIVELM_API_KEY": ""})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("livelm serve exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("livelm serve did not start")


async def run(args: argparse.Namespace, url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]

        async def count(text: str) -> int:
            return (await http.post("/tokenize", json={"prompt": text})).json()["count"]

        # Seeded English-like words up to about args.tokens tokens.
        words: list[str] = []
        rng = random.Random(args.seed)
        while True:
            words.extend(rng.choice(_WORDS) for _ in range(20))
            if await count(" ".join(words).capitalize() + ".") >= args.tokens:
                break
        while len(words) > 1 and await count(" ".join(words[:-1]).capitalize() + ".") >= args.tokens:
            words.pop()
        message = " ".join(words).capitalize() + "."
        message_tokens = await count(message)
        # Warm-up (kernels, allocator): one short request.
        await plain_arm(url, "Hello!", "warmup", 4)
    reps = []
    for rep in range(args.reps):
        live = await live_arm(url, message, args.cps, f"live-{rep}-{time.time()}", args.max_tokens)
        plain = await plain_arm(url, message, f"plain-{rep}-{time.time()}", args.max_tokens)
        reps.append({"live": live, "plain": plain, "same_reply": live["text"] == plain["text"]})
        print(f"rep {rep}: Enter -> first token: live prefill {live['ttft_s'] * 1000:.1f} ms, "
              f"plain chat {plain['ttft_s'] * 1000:.1f} ms; prompt {live['prompt_tokens']} tokens, "
              f"{live['prefilled_before_enter']} prefilled before Enter; same reply: "
              f"{reps[-1]['same_reply']}", flush=True)
    return {"model": model, "message_chars": len(message), "message_tokens": message_tokens,
            "reps": reps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model for livelm serve (default: embedded)")
    parser.add_argument("--tokens", type=int, default=300, help="message length in tokens")
    parser.add_argument("--cps", type=float, default=8.0, help="typing speed, characters/second")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch  # the server is a new process with torch's default thread count, as here

    info = machine_info(torch.get_num_threads())
    print(f"machine: {info}")
    print(f"load average before: {os.getloadavg()}")
    port = free_port()
    proc = start_server(args.model, port)
    try:
        result = asyncio.run(run(args, f"http://127.0.0.1:{port}"))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    load_after = os.getloadavg()
    live = [r["live"]["ttft_s"] for r in result["reps"]]
    plain = [r["plain"]["ttft_s"] for r in result["reps"]]
    summary = {"live_ttft_ms_median": 1000 * statistics.median(live),
               "plain_ttft_ms_median": 1000 * statistics.median(plain)}
    print(f"{result['model']}: {result['message_tokens']}-token message typed at {args.cps} "
          f"chars/s ({result['message_chars']} chars); Enter -> first token: live prefill "
          f"{summary['live_ttft_ms_median']:.1f} ms, plain chat {summary['plain_ttft_ms_median']:.1f} ms "
          f"(median of {args.reps}); load average after: {load_after}")
    for r in result["reps"]:
        for arm in ("live", "plain"):
            r[arm].pop("text", None)
    append_jsonl(RESULTS, {"benchmark": "live_typing", "time": utc_now(), "commit": git_commit(),
                           "machine": info, "load_avg_after": load_after, "cps": args.cps,
                           **result, **summary})
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
