"""``serve`` mode: replay a workload against one OpenAI-compatible server.

Sessions start at their arrival times; a conversation's next turn is sent a think time
after the previous reply arrived. At most ``max_concurrency`` requests are in flight (a
request waits for a slot; as in vLLM, its latencies are timed from when it is sent).
Setting ``stop`` ends the run early: nothing new is sent, requests in flight are
cancelled (closing their connections aborts them server-side), and the metrics cover
the requests that finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from livelm.bench.arrivals import ArrivalProcess
from livelm.bench.client import OpenAIStreamClient
from livelm.bench.metrics import RequestRecord, compute_metrics
from livelm.bench.workload import Session, Turn, Workload, render_plain_chat


@dataclass(frozen=True)
class ServeConfig:
    """How to replay a workload.

    ``endpoint``: ``auto`` (chat for conversations, completions otherwise), ``chat`` or
    ``completions`` (conversations rendered as plain text). ``prompt_format="ids"`` sends
    completion prompts as token ids (exact lengths; livelm, vLLM and SGLang accept them).
    """

    arrivals: ArrivalProcess = field(default_factory=ArrivalProcess)
    max_concurrency: int | None = None
    slos: dict[str, float] = field(default_factory=dict)
    endpoint: str = "auto"
    prompt_format: str = "text"
    warmup_requests: int = 1
    seed: int = 0
    progress: bool = True
    progress_desc: str = "requests"

    def __post_init__(self) -> None:
        if self.endpoint not in ("auto", "chat", "completions"):
            raise ValueError(f"endpoint must be auto, chat or completions, got {self.endpoint!r}")
        if self.prompt_format not in ("text", "ids"):
            raise ValueError(f"prompt format must be text or ids, got {self.prompt_format!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be >= 1, got {self.max_concurrency}")


@dataclass
class ServeResult:
    """What one run measured; ``interrupted`` when it was stopped early."""

    records: list[RequestRecord]
    duration_s: float
    interrupted: bool
    cancelled: int
    not_sent: int
    metrics: dict


def request_body(session: Session, k: int, turn: Turn, replies: list[str], cfg: ServeConfig
                 ) -> tuple[str | list[int] | None, list[dict] | None]:
    """(prompt, messages) of turn ``k`` for the configured endpoint."""
    if session.chat:
        messages = session.messages(k, replies)
        if cfg.endpoint == "completions":
            return render_plain_chat(messages), None
        return None, messages
    if cfg.endpoint == "chat":
        return None, [{"role": "user", "content": turn.text}]
    return (turn.ids if cfg.prompt_format == "ids" else turn.text), None


async def run_workload(client: OpenAIStreamClient, workload: Workload, cfg: ServeConfig,
                       stop: asyncio.Event | None = None,
                       count_prompt: Callable[[str | list[int] | None, list[dict] | None], int] | None = None,
                       ) -> ServeResult:
    """Replay ``workload`` against ``client``'s server and measure it.

    ``count_prompt`` counts prompt tokens client-side for servers that send no usage.
    """
    stop = stop or asyncio.Event()
    await client.resolve_model()
    await _warm_up(client, workload, cfg)
    starts = cfg.arrivals.start_times(workload, cfg.seed)
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    records: list[RequestRecord] = []
    in_flight: set[int] = set()
    sent = 0
    bar = tqdm(total=workload.num_requests, desc=cfg.progress_desc, unit="req",
               disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()

    async def one_session(i: int, session: Session) -> None:
        nonlocal sent
        await _sleep_until(t0 + starts[i], stop)
        replies: list[str] = []
        for k, turn in enumerate(session.turns):
            if k and turn.think_time_s > 0:
                await _sleep_until(time.perf_counter() + turn.think_time_s, stop)
            if stop.is_set():
                return
            prompt, messages = request_body(session, k, turn, replies, cfg)
            rec = RequestRecord(start_s=0.0, session=i, turn=k, scheduled_s=time.perf_counter() - t0)
            async with slots or contextlib.nullcontext():
                if stop.is_set():
                    return
                sent += 1
                in_flight.add(id(rec))
                await client.send(rec, prompt, messages, turn.output_len, clock_origin=t0)
                in_flight.discard(id(rec))
            if not rec.prompt_tokens:
                rec.prompt_tokens = (count_prompt(prompt, messages) if count_prompt
                                     else len(turn.ids) if not session.chat else 0)
            records.append(rec)
            bar.update(1)
            if not rec.success:
                return  # a conversation cannot go on without its reply
            replies.append(rec.text)

    tasks = [asyncio.create_task(one_session(i, s)) for i, s in enumerate(workload.sessions)]
    everything = asyncio.gather(*tasks)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([everything, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Stopped before everything was sent and answered (even if the stop came so early
        # that every session returned at once).
        interrupted = stop.is_set() and (not everything.done() or sent < workload.num_requests)
        duration = time.perf_counter() - t0
        cancelled = len(in_flight)
        stopper.cancel()
        everything.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await everything
        bar.close()
    if not interrupted:
        everything.result()  # re-raise a bug in the session code rather than hide it
    return ServeResult(
        records=sorted(records, key=lambda r: r.start_s),
        duration_s=duration,
        interrupted=interrupted,
        cancelled=cancelled,
        not_sent=workload.num_requests - sent,
        metrics=compute_metrics(records, duration, cfg.slos),
    )


async def _warm_up(client: OpenAIStreamClient, workload: Workload, cfg: ServeConfig) -> None:
    """Untimed requests first: the server's first requests pay one-time costs. Each is a
    workload prompt reversed (as long, but not one of the measured prompts: sent as it is,
    its measured twin would be a prefix-cache hit and report a TTFT the workload never has)."""
    for n in range(min(cfg.warmup_requests, len(workload.sessions))):
        session = workload.sessions[n]
        prompt, messages = request_body(session, 0, session.turns[0], [], cfg)
        prompt = prompt[::-1] if prompt is not None else None
        if messages:
            messages = [*messages[:-1], {**messages[-1], "content": str(messages[-1]["content"])[::-1]}]
        rec = await client.send(RequestRecord(0.0), prompt, messages, min(session.turns[0].output_len, 4))
        if not rec.success:
            raise RuntimeError(f"the warm-up request to {client.target.base_url} failed: {rec.error}")


async def _sleep_until(deadline: float, stop: asyncio.Event) -> None:
    """Sleep until ``deadline`` (a perf_counter value), waking early when ``stop`` is set."""
    delay = deadline - time.perf_counter()
    if delay > 0 and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


def stop_on_sigint(stop: asyncio.Event) -> Callable[[], None]:
    """Make the first Ctrl-C set ``stop`` (results are still written); a second one
    interrupts at once. Returns a function that restores the default handling."""
    loop = asyncio.get_running_loop()

    def first() -> None:
        print("\ninterrupted: stopping, writing what was measured (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    try:
        loop.add_signal_handler(signal.SIGINT, first)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        return lambda: None

    def restore() -> None:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)

    return restore
