"""Attention sinks + a rolling KV window (``kv_policy="sinks"``, docs/attention_sinks.md)
on the default model (SmolLM2-135M-Instruct, its Q4_1 weights).

Quality: the perplexity of a long natural-language text available offline, the license
texts Debian ships in ``/usr/share/common-licenses`` (GPL-3, GPL-2, LGPL-2.1, GFDL-1.3,
Apache-2.0, MPL-2.0, Artistic; about 30k tokens; ``--text`` takes another file), under

- (a) dense attention with sliding-window recompute, the quality reference: every token
  is scored by a fresh full-attention request over at most the ``sinks + window`` tokens
  before it (windows of that size, stride ``--stride``: each token scored sees between
  ``size - stride`` and ``size`` tokens, positions 0..);
- (b) a plain rolling window, no sinks (``num_sink_tokens=0``, the same cache size);
- (c) ``num_sink_tokens`` sinks + the window.

(b) and (c) are one request each over the whole text through the engine with
``prompt_logprobs``: each query attends to exactly what the policy keeps at its own
position (the engine's prefill of a sinks request is chunked to at most a window and
masks per query), which is what feeding the text token by token would give (the tests
check prompt logprobs against a token-by-token reference). Perplexities are over the
tokens past the first ``sinks + window`` (where the policies differ) and over all.

Streaming: an input stream with the policy, fed the text (repeated) to 1k, 10k and 100k
tokens; at each point a greedy reply of ``--reply`` tokens forked from it: its decode
latency per token (median step), and the KV the stream and reply hold (blocks x bytes).
A ``full`` request's decode latency at 1k and at the window's size is printed for scale.

Figures are taken on a shared, loaded machine: the load average is printed and recorded.
One JSON line goes to ``benchmarks/results/attention_sinks.jsonl``.

Usage::

    python benchmarks/attention_sinks.py            # 30k-token text, 1k/10k/100k stream
    python benchmarks/attention_sinks.py --quick    # 20k tokens of text, 1k/10k/20k stream
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, utc_now  # noqa: E402

from livelm import LLM, SamplingParams  # noqa: E402
from livelm.bench.machine import git_commit, machine_info  # noqa: E402
from livelm.core.kv_policy import KVPolicy  # noqa: E402
from livelm.core.request_options import RequestOptions  # noqa: E402

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "attention_sinks.jsonl"
LICENSES = ("GPL-3", "GPL-2", "LGPL-2.1", "GFDL-1.3", "Apache-2.0", "MPL-2.0", "Artistic")


def license_text() -> str:
    """The license texts of /usr/share/common-licenses, concatenated."""
    root = Path("/usr/share/common-licenses")
    return "\n\n".join((root / name).read_text() for name in LICENSES)


def _nll(out, ids: list[int], first: int) -> list[float]:
    """Negative log-likelihoods of ids[first:] from a request's prompt logprobs."""
    return [-out.prompt_logprobs[i][ids[i]].logprob for i in range(first, len(ids))]


def recompute_nll(llm: LLM, ids: list[int], size: int, stride: int) -> list[float]:
    """(a): each token's NLL from a fresh full request over the <= ``size`` tokens before it."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    prompts, scored = [ids[:size]], [(1, size)]
    start = stride
    while start + size - stride < len(ids):
        end = min(start + size, len(ids))
        prompts.append(ids[start:end])
        scored.append((size - stride, end - start))
        start += stride
    outs = llm.generate(prompts, params, use_tqdm=False)
    nll: list[float] = []
    for p, out, (lo, hi) in zip(prompts, outs, scored, strict=True):
        nll += [-out.prompt_logprobs[i][p[i]].logprob for i in range(lo, hi)]
    assert len(nll) == len(ids) - 1, (len(nll), len(ids))
    return nll


def rolling_nll(llm: LLM, ids: list[int], sinks: int, window: int) -> list[float]:
    """(b)/(c): one sinks request over the whole text."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0,
                            extra={"kv_policy": "sinks", "num_sink_tokens": sinks, "kv_window": window})
    out = llm.generate([ids], params, use_tqdm=False)[0]
    return _nll(out, ids, 1)


def ppl(nll: list[float]) -> float:
    """exp(mean NLL)."""
    return math.exp(sum(nll) / len(nll))


def stream_points(llm: LLM, text_ids: list[int], policy: KVPolicy, points: list[int], reply: int) -> list[dict]:
    """Feed an input stream with ``policy`` up to each point; a reply's decode latency and the KV held there."""
    engine = llm.engine
    sid = "bench-stream"
    engine.open_input_stream(sid, None, policy)
    fed, results = 0, []
    try:
        for point in points:
            t0 = time.perf_counter()
            while fed < point:
                piece = [text_ids[(fed + i) % len(text_ids)] for i in range(min(4096, point - fed))]
                engine.update_input_stream(sid, fed, piece)
                fed += len(piece)
                while engine.scheduler.requests[sid].num_computed_tokens < fed:
                    engine.step()
            feed_s = time.perf_counter() - t0
            stats = engine.stats()
            stream_blocks = stats.num_total_blocks - stats.num_free_blocks
            ids = [text_ids[i % len(text_ids)] for i in range(fed)]
            params = SamplingParams(temperature=0.0, max_tokens=reply, ignore_eos=True)
            engine.add(f"reply-{point}", ids, params, prompt_token_ids=ids, fork_from=sid,
                       options=RequestOptions(kv_policy=policy))
            steps, peak = [], stream_blocks
            while engine.scheduler.has_pending_work():
                t = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - t)
                s = engine.stats()
                peak = max(peak, s.num_total_blocks - s.num_free_blocks)
            decode = statistics.median(steps[2:]) if len(steps) > 4 else statistics.median(steps)
            results.append({"tokens": point, "decode_ms": 1000 * decode, "stream_blocks": stream_blocks,
                            "peak_blocks": peak, "kv_bytes": stream_blocks * stats.kv_block_bytes,
                            "peak_kv_bytes": peak * stats.kv_block_bytes, "feed_s": feed_s,
                            "evicted_tokens": stats.num_evicted_tokens})
            print(f"  {point:>7} tokens: decode {1000 * decode:6.1f} ms/token, stream KV {stream_blocks} blocks "
                  f"({stream_blocks * stats.kv_block_bytes / 2**20:.1f} MiB), peak with reply {peak} blocks; "
                  f"fed in {feed_s:.0f} s", flush=True)
    finally:
        engine.scheduler.finish_request(sid)
    return results


def full_decode_ms(llm: LLM, text_ids: list[int], n: int, reply: int) -> float:
    """A full-attention request's median decode step after an ``n``-token prompt."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=reply, ignore_eos=True)
    ids = text_ids[:n]
    engine.add(f"full-{n}", ids, params, prompt_token_ids=ids)
    steps = []
    while engine.scheduler.has_pending_work():
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    return 1000 * statistics.median(steps[-(reply - 3):])


def perplexities(llm: LLM, text_ids: list[int], sinks: int, window: int, stride: int) -> dict:
    """(a), (b) and (c) over the text; prints them, returns the record's part."""
    size = sinks + window
    t0 = time.perf_counter()
    nll_a = recompute_nll(llm, text_ids, size, stride)
    t_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    nll_b = rolling_nll(llm, text_ids, 0, size)
    t_b = time.perf_counter() - t0
    t0 = time.perf_counter()
    nll_c = rolling_nll(llm, text_ids, sinks, window)
    t_c = time.perf_counter() - t0
    past = size - 1  # NLL index i scores token i + 1: from here on the window has rolled
    arms = {"a_dense_recompute": (nll_a, t_a), "b_window_no_sinks": (nll_b, t_b), "c_sinks_window": (nll_c, t_c)}
    ref = ppl(nll_a[past:])
    print(f"\nperplexity (past the first {size} tokens / all), ratio to (a):")
    record: dict = {}
    for name, (nll, secs) in arms.items():
        p_past, p_all = ppl(nll[past:]), ppl(nll)
        print(f"  {name:18s} {p_past:8.3f} / {p_all:8.3f}   {p_past / ref:5.3f}x   ({secs:.0f} s)")
        record[name] = {"ppl_past_window": p_past, "ppl_all": p_all, "ratio": p_past / ref, "seconds": secs}

    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="20k tokens of text, a 1k/10k/20k stream")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020, help="recent tokens kept (sinks + window = cache size)")
    ap.add_argument("--stride", type=int, default=None, help="(a)'s stride (default: half the cache)")
    ap.add_argument("--text", type=Path, default=None, help="another text file for the perplexity")
    ap.add_argument("--reply", type=int, default=32, help="tokens of each reply (decode latency)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="use the text's first N tokens (a smoke run; the figures need >= 20k)")
    ap.add_argument("--skip-perplexity", action="store_true", help="the streaming part only")
    ap.add_argument("--skip-stream", action="store_true", help="the perplexity part only")
    ap.add_argument("--points", default=None, help="comma-separated stream lengths (default 1000,10000,100000)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = args.sinks + args.window
    stride = args.stride or size // 2
    points = [int(p) for p in (args.points or ("1000,10000,20000" if args.quick else "1000,10000,100000")).split(",")]

    info = machine_info(args.threads)
    load_start = os.getloadavg()
    print(f"attention sinks benchmark, {utc_now()}, commit {(git_commit() or '?')[:7]}, {args.threads} threads, "
          f"load {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} (a shared, loaded machine)")
    llm = LLM(None, num_threads=args.threads, max_model_len=8192, max_num_seqs=32, kv_cache_gib=2.0,
              max_num_batched_tokens=2048)
    text = args.text.read_text() if args.text else license_text()
    text_name = str(args.text) if args.text else "/usr/share/common-licenses: " + ", ".join(LICENSES)
    text_ids = llm.engine.prompt_ids(text)
    if args.quick or args.tokens:
        text_ids = text_ids[: args.tokens or 20000]
    print(f"text: {text_name}, {len(text_ids)} tokens; cache {size} tokens ({args.sinks} sinks + {args.window})")
    if args.tokens is None:
        assert len(text_ids) >= 20000, "the perplexity text must have at least 20k tokens"

    record_ppl = perplexities(llm, text_ids, args.sinks, args.window, stride) if not args.skip_perplexity else {}
    stream, full_1k, full_w = [], None, None
    if not args.skip_stream:
        print(f"\nstream with {args.sinks} sinks + {args.window} window, a {args.reply}-token reply at each point:")
        policy = KVPolicy("sinks", args.sinks, args.window)
        stream = stream_points(llm, text_ids, policy, points, args.reply)
        full_1k = full_decode_ms(llm, text_ids, 1000, args.reply)
        full_w = full_decode_ms(llm, text_ids, min(size, len(text_ids)), args.reply)
        print(f"  for scale, kv_policy full: decode {full_1k:.1f} ms/token at 1000 tokens, {full_w:.1f} at {size}")
        if len(stream) >= 3:
            print(f"  decode at {stream[-1]['tokens']} / at {stream[1]['tokens']}: "
                  f"{stream[-1]['decode_ms'] / stream[1]['decode_ms']:.3f}x; "
                  f"KV {stream[-1]['kv_bytes'] / stream[1]['kv_bytes']:.3f}x")
    load_end = os.getloadavg()
    print(f"\nload average: {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    append_jsonl(RESULTS_FILE, {"date": utc_now(), "commit": git_commit(), "machine": info, "quick": args.quick,
                                "text": text_name, "text_tokens": len(text_ids), "sinks": args.sinks,
                                "window": args.window, "stride": stride, "perplexity": record_ppl,
                                "stream": stream, "full_decode_ms": {"1000": full_1k, str(size): full_w},
                                "load_start": list(load_start), "load_end": list(load_end), "time": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
