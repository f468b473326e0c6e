"""``throughput`` mode: offline, every request queued at once, livelm against
transformers' batched ``generate`` on the same model in the same process.

Requests are greedy with ``ignore_eos`` so both engines produce exactly the requested
tokens. A conversation workload runs round by round (turn k of every conversation
together, each prompt holding that engine's own earlier replies); think times and
trace timestamps do not apply offline. Ctrl-C stops the run: the figures then cover
the tokens generated until then.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from livelm.bench.workload import Workload, chat_prompt_ids


@dataclass
class ThroughputResult:
    """One engine's run: tokens, seconds and the derived rates."""

    engine: str
    seconds: float = 0.0
    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    interrupted: bool = False
    extra: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        """Requests/s, output tok/s and total tok/s (prompt + output) over the run."""
        s = self.seconds or float("nan")
        return {"seconds": self.seconds, "completed": self.requests,
                "total_input_tokens": self.prompt_tokens, "total_output_tokens": self.output_tokens,
                "request_throughput": self.requests / s, "output_throughput": self.output_tokens / s,
                "total_token_throughput": (self.prompt_tokens + self.output_tokens) / s, **self.extra}


class LivelmOffline:
    """livelm's engine driven request by request, so a progress bar and Ctrl-C can see
    each finished request (``LLM.generate`` would only return at the end)."""

    name = "livelm"

    def __init__(self, llm: Any, progress: bool = True) -> None:
        self.llm = llm
        self.progress = progress
        self.partial: tuple[int, int, int] = (0, 0, 0)  # requests, prompt, output tokens

    def generate(self, prompts: list[list[int]], output_lens: list[int]) -> tuple[list[list[int]], dict]:
        """Run one round; on KeyboardInterrupt, ``self.partial`` says what got done."""
        from livelm import SamplingParams

        fe = self.llm.engine
        rids = []
        generated: dict[str, list[int]] = {}
        done: set[str] = set()
        preempt0 = fe.stats().num_preemptions
        bar = tqdm(total=len(prompts), desc="livelm", unit="req", disable=not self.progress,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            for p, o in zip(prompts, output_lens, strict=True):
                rid = fe.new_request_id()
                fe.add(rid, p, SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True))
                rids.append(rid)
                generated[rid] = []
            while len(done) < len(rids):
                for state, out in fe.step():
                    generated[state.request_id].extend(out.outputs[0].token_ids)
                    if state.finished:
                        done.add(state.request_id)
                        bar.update(1)
        except KeyboardInterrupt:
            started = [i for i, r in enumerate(rids) if generated[r]]
            self.partial = (len(done), sum(len(prompts[i]) for i in started),
                            sum(len(g) for g in generated.values()))
            raise
        finally:
            bar.close()
            for rid in rids:
                if rid not in done:
                    fe.abort(rid)
        return [generated[r] for r in rids], {"preemptions": fe.stats().num_preemptions - preempt0}


class TransformersOffline:
    """transformers' batched ``generate`` (:func:`livelm.bench.hf_baseline.run_hf`):
    prompts sorted by length, left-padded batches, each run to its longest output."""

    name = "transformers"

    def __init__(self, model_dir: str, batch_size: int = 16) -> None:
        from livelm.bench import hf_baseline

        self._hf = hf_baseline
        self.model = hf_baseline.build_hf(model_dir)
        self.batch_size = batch_size
        self.partial: tuple[int, int, int] = (0, 0, 0)

    def generate(self, prompts: list[list[int]], output_lens: list[int]) -> tuple[list[list[int]], dict]:
        """Run one round (no partial progress inside: ``generate`` returns per batch)."""
        res = self._hf.run_hf(self.model, prompts, output_lens, min(self.batch_size, len(prompts)))
        return res.output_token_ids, {k: v for k, v in res.extra.items() if isinstance(v, int | float)}


def run_offline(engine: Any, workload: Workload, tokenizer: Any) -> ThroughputResult:
    """Time ``engine`` over the whole workload (all rounds), stopping cleanly on Ctrl-C."""
    result = ThroughputResult(engine.name)
    replies: list[list[str]] = [[] for _ in workload.sessions]
    rounds = max((len(s.turns) for s in workload.sessions), default=0)
    extra_sum: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        for k in range(rounds):
            active = [i for i, s in enumerate(workload.sessions) if len(s.turns) > k]
            prompts = [_prompt_ids(workload.sessions[i], k, replies[i], tokenizer) for i in active]
            lens = [workload.sessions[i].turns[k].output_len for i in active]
            outs, extra = engine.generate(prompts, lens)
            for key, v in extra.items():
                extra_sum[key] = extra_sum.get(key, 0) + v
            result.requests += len(active)
            result.prompt_tokens += sum(len(p) for p in prompts)
            result.output_tokens += sum(len(o) for o in outs)
            for i, o in zip(active, outs, strict=True):
                replies[i].append(tokenizer.decode(o, skip_special_tokens=True))
    except KeyboardInterrupt:
        result.interrupted = True
        reqs, p_tok, o_tok = engine.partial
        result.requests += reqs
        result.prompt_tokens += p_tok
        result.output_tokens += o_tok
    result.seconds = time.perf_counter() - t0
    result.extra = {**extra_sum, "rounds": rounds}
    return result


def _prompt_ids(session: Any, k: int, replies: list[str], tokenizer: Any) -> list[int]:
    if session.chat:
        return chat_prompt_ids(tokenizer, session.messages(k, replies))
    return list(session.turns[k].ids)


def warm_up(engine: Any, vocab_ids: list[int]) -> None:
    """A small untimed run (no progress bar): allocator, kernel choice and lazy tables are
    paid for here."""
    progress = getattr(engine, "progress", False)
    engine.progress = False
    try:
        engine.generate([vocab_ids[:16], vocab_ids[:24]], [4, 4])
    finally:
        engine.progress = progress
