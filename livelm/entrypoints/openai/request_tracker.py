"""Per-request timing: feeds the latency histograms and writes one JSON log line."""

from __future__ import annotations

import json
import logging
import time

from livelm.entrypoints.openai.metrics import ServerMetrics

request_logger = logging.getLogger("livelm.server.requests")


class RequestTracker:
    """Follows one HTTP request from arrival to its last token.

    Call :meth:`on_tokens` whenever new tokens arrive and :meth:`finish` exactly once;
    later calls to :meth:`finish` are ignored, so error paths may call it freely.
    """

    def __init__(self, metrics: ServerMetrics, request_id: str, route: str, model: str,
                 stream: bool, n: int) -> None:
        self.metrics = metrics
        self.request_id = request_id
        self.route = route
        self.model = model
        self.stream = stream
        self.n = n
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._done = False

    def on_tokens(self, num_tokens: int) -> None:
        """Record that ``num_tokens`` new tokens (over all choices) just arrived."""
        if num_tokens <= 0:
            return
        now = time.monotonic()
        self.completion_tokens += num_tokens
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.ttft.observe(now - self.arrival)
        elif self.last_token_at is not None:
            # Tokens that arrive together (n > 1, or a step delivering several) share the gap.
            gap = (now - self.last_token_at) / num_tokens
            for _ in range(num_tokens):
                self.metrics.itl.observe(gap)
        self.last_token_at = now

    def finish(self, finish_reason: str, status: int = 200, error: str | None = None) -> None:
        """Count the request, observe its end-to-end latency, log one line."""
        if self._done:
            return
        self._done = True
        now = time.monotonic()
        self.metrics.requests.labels(finish_reason).inc()
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.generation_tokens.inc(self.completion_tokens)
        if finish_reason in ("stop", "length"):
            self.metrics.e2e.observe(now - self.arrival)
        record = {
            "ts": round(time.time(), 3),
            "event": "request",
            "request_id": self.request_id,
            "route": self.route,
            "model": self.model,
            "stream": self.stream,
            "n": self.n,
            "status": status,
            "finish_reason": finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": None if self.first_token_at is None else round(self.first_token_at - self.arrival, 6),
            "e2e_s": round(now - self.arrival, 6),
        }
        if error:
            record["error"] = error
        request_logger.info(json.dumps(record))
