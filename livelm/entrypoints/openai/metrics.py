"""Prometheus metrics of one server, in a registry of its own (tests build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _LiveGauges(Collector):
    """Gauges read at scrape time from the engine and the admission counter, so they are
    never stale and cost nothing between scrapes."""

    def __init__(self, engine_stats: Callable[[], Any] | None, admission: Any) -> None:
        self._engine_stats = engine_stats
        self._admission = admission

    def collect(self) -> Iterator[Any]:
        if self._admission is not None:
            yield GaugeMetricFamily(
                "livelm_server_sequences_in_flight",
                "Sequences admitted by the server and not finished.",
                value=self._admission.in_flight,
            )
            yield GaugeMetricFamily(
                "livelm_server_sequences_waiting",
                "Admitted sequences beyond what the engine runs at once (bounded by --max-waiting).",
                value=self._admission.waiting,
            )
        stats = self._engine_stats() if self._engine_stats is not None else None
        if stats is None:
            return
        gauges = (
            ("livelm_num_requests_running", "Requests the engine is running (input streams "
             "waiting for input are not).", stats.num_running),
            ("livelm_num_requests_waiting", "Requests waiting in the engine's queue.", stats.num_waiting),
            ("livelm_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1).", stats.kv_usage),
            ("livelm_kv_cache_free_blocks", "Free KV cache blocks.", stats.num_free_blocks),
            ("livelm_kv_cache_total_blocks", "KV cache blocks in the pool.", stats.num_total_blocks),
            ("livelm_kv_cache_touched_blocks", "KV cache blocks ever written (on CPU, the cache "
             "memory committed so far: it is reserved lazily).", stats.num_touched_blocks),
            ("livelm_kv_cache_block_bytes", "Bytes one KV cache block takes across all layers.",
             stats.kv_block_bytes),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "livelm_num_preemptions", "Requests preempted by the scheduler.", value=stats.num_preemptions
        )
        yield from _stream_metrics(stats)
        yield from _cache_metrics(stats)
        yield from _speculative_metrics(stats)
        yield from _liveness_metrics(stats)
        yield from _slo_metrics(stats)


def _slo_metrics(stats: Any) -> Iterator[Any]:
    """Latency targets (docs/scheduling.md; absent from stats of engines that have none)."""
    if not hasattr(stats, "num_tpot_slo_misses"):
        return
    counters = (
        ("livelm_tpot_slo_misses", "Decode steps that took longer than their TPOT target.",
         stats.num_tpot_slo_misses),
        ("livelm_ttft_slo_misses", "Requests whose first token came after their TTFT target.",
         stats.num_ttft_slo_misses),
        ("livelm_slo_capped_steps", "Steps whose prefill the TPOT budget cut short.", stats.num_slo_capped_steps),
        ("livelm_slo_floor_steps", "Steps that ran only the minimum prefill although the decodes "
         "alone filled the TPOT target.", stats.num_slo_floor_steps),
    )
    for name, doc, value in counters:
        yield CounterMetricFamily(name, doc, value=value)
    yield GaugeMetricFamily("livelm_step_predicted_seconds", "The step cost model's prediction "
                            "for the last step sized to a TPOT target (0 for other steps).", value=stats.predicted_step_seconds)
    yield GaugeMetricFamily("livelm_step_measured_seconds", "The last step's measured time.",
                            value=stats.measured_step_seconds)


def _liveness_metrics(stats: Any) -> Iterator[Any]:
    """The engine loop's watchdog (absent from stats of engines that have none): a step
    timestamp that stops moving while requests run means a stuck loop."""
    if hasattr(stats, "last_step_time"):
        yield GaugeMetricFamily("livelm_last_step_timestamp_seconds", "Unix time the engine "
                                "last completed a step (0 before the first).",
                                value=stats.last_step_time)
    if hasattr(stats, "engine_alive"):
        yield GaugeMetricFamily("livelm_engine_alive", "1 while the engine's step loop runs, "
                                "0 once it stopped.", value=float(stats.engine_alive))


def _stream_metrics(stats: Any) -> Iterator[Any]:
    """Streaming input and computed tokens (absent from stats of engines that have none)."""
    if hasattr(stats, "num_input_streams"):
        yield GaugeMetricFamily("livelm_input_streams", "Input streams (streaming-input "
                                "sessions) open in the engine.", value=stats.num_input_streams)
    if hasattr(stats, "num_evicted_tokens"):
        yield CounterMetricFamily("livelm_kv_evicted_tokens", "Tokens whose KV blocks rolled out of "
                                  "a window: kv_policy 'sinks' requests', and those of a model whose every layer "
                                  "slides (Mistral ...).", value=stats.num_evicted_tokens)
        yield GaugeMetricFamily("livelm_kv_window_occupancy_ratio", "Tokens kept by running kv_policy "
                                "'sinks' requests over what their sinks + windows hold (0..1).",
                                value=stats.kv_window_occupancy)
    if hasattr(stats, "num_computed_tokens"):
        yield CounterMetricFamily("livelm_computed_tokens", "Tokens whose KV the model computed "
                                  "(prompts, streamed input, generated tokens).",
                                  value=stats.num_computed_tokens)


def _speculative_metrics(stats: Any) -> Iterator[Any]:
    """Speculative decoding (absent from stats of engines without it)."""
    if not hasattr(stats, "spec_num_drafts"):
        return
    yield CounterMetricFamily("livelm_spec_decode_drafts", "Verification steps that checked drafted tokens.",
                              value=stats.spec_num_drafts)
    yield CounterMetricFamily("livelm_spec_decode_draft_tokens", "Tokens drafted for speculative decoding.",
                              value=stats.spec_num_draft_tokens)
    yield CounterMetricFamily("livelm_spec_decode_accepted_tokens", "Drafted tokens the model accepted.",
                              value=stats.spec_num_accepted_tokens)
    yield CounterMetricFamily("livelm_spec_decode_draft_model_seconds", "Seconds the draft model's forward "
                              "passes took (speculative method draft).",
                              value=getattr(stats, "spec_draft_model_seconds", 0.0))
    yield GaugeMetricFamily("livelm_spec_decode_acceptance_rate", "Drafted tokens accepted / drafted, "
                            "over the engine's life.", value=stats.spec_acceptance_rate)
    yield GaugeMetricFamily("livelm_spec_decode_mean_accepted_length", "Tokens a verification step "
                            "yields on average (1 + accepted per draft), over the engine's life.",
                            value=stats.spec_mean_accepted_length)


def _cache_metrics(stats: Any) -> Iterator[Any]:
    """Prefix cache and session metrics (absent from stats of engines that have none)."""
    if not hasattr(stats, "prefix_cache_queried_tokens"):
        return
    counters = (
        ("livelm_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache "
         "and session pins at admission.", stats.prefix_cache_queried_tokens),
        ("livelm_prefix_cache_hit_tokens", "Tokens whose KV was reused instead of computed.",
         stats.prefix_cache_hit_tokens),
        ("livelm_prefix_cache_evictions", "Cached free KV blocks reused for new data.",
         stats.num_cache_evictions),
    )
    for name, doc, value in counters:
        yield CounterMetricFamily(name, doc, value=value)
    gauges = (
        ("livelm_prefix_cache_blocks", "KV blocks registered in the prefix cache.", stats.num_cached_blocks),
        ("livelm_sessions", "Sessions whose KV is pinned.", stats.num_sessions),
        ("livelm_session_pinned_blocks", "KV blocks held by session pins.", stats.num_pinned_blocks),
    )
    for name, doc, value in gauges:
        yield GaugeMetricFamily(name, doc, value=value)
    ended = CounterMetricFamily(
        "livelm_session_pins_released", "Session pins released, by reason: TTL over, dropped "
        "under memory pressure, or closed by the user.", labels=["reason"],
    )
    ended.add_metric(["expired"], stats.num_session_pins_expired)
    ended.add_metric(["pressure"], stats.num_session_pins_dropped)
    ended.add_metric(["closed"], stats.num_session_pins_closed)
    yield ended


class ServerMetrics:
    """Counters and histograms of requests served, plus live engine gauges."""

    def __init__(self, engine_stats: Callable[[], Any] | None = None, admission: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "livelm_requests", "Finished requests by finish reason.", ["finish_reason"], registry=r
        )
        self.rejected = Counter(
            "livelm_requests_rejected", "Requests refused before reaching the engine.", ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("livelm_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter(
            "livelm_generation_tokens", "Tokens generated.", registry=r
        )
        self.websockets = Gauge(
            "livelm_server_websockets", "Open /v1/stream WebSocket connections.", registry=r
        )
        self.ttft = Histogram(
            "livelm_time_to_first_token_seconds", "Time from arrival to the first generated token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "livelm_inter_token_latency_seconds", "Time between consecutive generated tokens.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "livelm_e2e_request_latency_seconds", "Time from arrival to the last token.",
            buckets=_E2E_BUCKETS, registry=r,
        )
        r.register(_LiveGauges(engine_stats, admission))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
