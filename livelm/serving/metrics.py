"""Prometheus metrics of the replicas and the router (read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class DataParallelCollector:
    """Per replica: up, restarts, load in tokens, requests in flight, running and waiting
    requests; for the router: requests by reason, affinity hits, reroutes, sessions
    reported lost, and the time spent routing."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Any]:
        """The metric families now."""
        engine = self._engine
        up = GaugeMetricFamily("livelm_replica_up", "1 while the replica serves, 0 while it restarts.",
                               labels=["replica"])
        restarts = CounterMetricFamily("livelm_replica_restarts", "Times the replica was restarted after "
                                       "it died.", labels=["replica"])
        load = GaugeMetricFamily("livelm_replica_load_tokens", "Waiting + running tokens of the replica "
                                 "(as it last reported, plus what was routed to it since).", labels=["replica"])
        in_flight = GaugeMetricFamily("livelm_replica_requests_in_flight", "Requests sent to the replica "
                                      "that have not ended.", labels=["replica"])
        running = GaugeMetricFamily("livelm_replica_num_requests_running", "Requests the replica runs.",
                                    labels=["replica"])
        waiting = GaugeMetricFamily("livelm_replica_num_requests_waiting", "Requests waiting in the "
                                    "replica's queue.", labels=["replica"])
        for entry in engine.replica_health():
            label = [str(entry["replica"])]
            up.add_metric(label, 1.0 if entry["status"] == "ok" else 0.0)
            restarts.add_metric(label, entry["restarts"])
            load.add_metric(label, entry.get("load_tokens", 0))
            in_flight.add_metric(label, entry.get("requests_in_flight", 0))
            client = engine.replica(entry["replica"])
            stats = client.stats if client is not None and client.alive else None
            running.add_metric(label, stats.num_running if stats is not None else 0)
            waiting.add_metric(label, stats.num_waiting if stats is not None else 0)
        yield from (up, restarts, load, in_flight, running, waiting)
        s = engine.router_stats
        yield CounterMetricFamily("livelm_router_requests", "Requests and input streams routed.", value=s.routed)
        hits = CounterMetricFamily("livelm_router_affinity_hits", "Requests sent to the replica of their "
                                   "session or of their cached prefix.", labels=["kind"])
        hits.add_metric(["session"], s.session_hits)
        hits.add_metric(["prefix"], s.prefix_hits)
        yield hits
        yield CounterMetricFamily("livelm_router_reroutes", "Requests whose affinity target was passed "
                                  "over (over the load cap, or out of rotation).", value=s.reroutes)
        yield CounterMetricFamily("livelm_router_sessions_lost", "Sessions reported lost (their replica "
                                  "failed) on their next use.", value=s.sessions_lost)
        yield CounterMetricFamily("livelm_router_route_seconds", "Seconds spent routing requests.",
                                  value=engine.route_seconds)
