"""N engine replicas behind one AsyncEngine-shaped object (docs/distributed.md).

:class:`DataParallelEngine` is what ``livelm serve --data-parallel-size N`` serves: the
OpenAI app talks to it exactly as to an :class:`~livelm.engine.async_engine.AsyncEngine`.
It tokenizes in the server process, asks the :class:`~livelm.serving.router.Router`
for a replica, and relays the request to that replica's process
(:class:`~livelm.serving.replica_client.ReplicaClient`). Input streams live on the
replica they were opened on, and so do their replies. A replica that dies leaves the
rotation at once, its requests end with :class:`ReplicaFailedError` (HTTP 503
``replica_failed``), its sessions are reported lost on their next use
(:class:`SessionLostError`), and the :class:`~livelm.serving.supervisor.Supervisor`
starts it again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from livelm.core.kv_policy import FULL, KVPolicy
from livelm.core.request_options import RequestOptions
from livelm.engine.engine import EngineStats, make_engine_config
from livelm.engine.errors import EngineDeadError, ReplicaFailedError, SessionLostError
from livelm.engine.input_stream import InputStream
from livelm.engine.tokenizer import chat_prompt_ids, encode_prompt, load_tokenizer
from livelm.outputs import RequestOutput
from livelm.sampling_params import SamplingParams
from livelm.serving import messages as m
from livelm.serving.ray_replicas import RayReplicas
from livelm.serving.replica_client import ReplicaClient
from livelm.serving.router import Route, Router, RouterConfig, RouteRequest
from livelm.serving.supervisor import ReplicaSpec, Supervisor, start_replica
from livelm.structured_output import StructuredOutput

logger = logging.getLogger("livelm.serving")

_START_TIMEOUT_S = 600.0
DATA_PARALLEL_BACKENDS = ("local", "ray")
_STOP_GRACE_S = 30.0  # after the drain, how long a replica may take to exit before a kill
# EngineStats fields that are not summed over replicas.
_MEAN_FIELDS = frozenset({"kv_usage", "kv_window_occupancy"})
_MAX_FIELDS = frozenset({"last_step_time", "predicted_step_seconds", "measured_step_seconds"})


def split_threads(num_threads: int | None, num_replicas: int) -> int:
    """Threads per replica: ``num_threads`` (default: the CPU count) shared out, >= 1."""
    total = num_threads or os.cpu_count() or 1
    return max(1, total // num_replicas)


def merge_stats(stats: list[EngineStats]) -> EngineStats:
    """One EngineStats for all replicas: counts summed, fractions averaged, times maxed."""
    if not stats:
        return EngineStats(0, 0, 0, 0, 0.0, 0, engine_alive=False)
    merged: dict[str, Any] = {}
    for f in dataclasses.fields(EngineStats):
        values = [getattr(s, f.name) for s in stats]
        if f.name in _MEAN_FIELDS:
            merged[f.name] = sum(values) / len(values)
        elif f.name in _MAX_FIELDS:
            merged[f.name] = max(values)
        elif isinstance(values[0], bool):
            merged[f.name] = any(values)
        else:
            merged[f.name] = sum(values)
    return EngineStats(**merged)


class DataParallelEngine:
    """``data_parallel_size`` replicas of one engine, each in its own process, served as
    one AsyncEngine (the same calls; the RL weight-update API is not offered).

    Keyword arguments are :class:`livelm.config.EngineConfig` fields, for every replica;
    ``num_threads`` is split between them. ``router`` is ``cache_aware`` (session, then
    prefix affinity within a load cap, then least load) or ``round_robin``. ``backend`` is
    ``local`` (child processes of this one) or ``ray`` (Ray actors in a placement group, on
    the cluster at ``ray_address``, or RAY_ADDRESS, or a local one started here; each
    replica's bundle has its share of ``num_threads`` as CPUs, and a GPU with
    ``device="cuda"``; docs/distributed.md).
    """

    def __init__(self, model: str | None = None, served_model_name: str | None = None, *,
                 router: str = "cache_aware", router_config: RouterConfig | None = None,
                 restart_backoff_s: float = 0.5, log_level: str = "WARNING", backend: str = "local",
                 ray_address: str | None = None, ray_placement_strategy: str = "PACK", **kwargs: Any) -> None:
        if backend not in DATA_PARALLEL_BACKENDS:
            raise ValueError(f"unknown data-parallel backend {backend!r}; use one of {', '.join(DATA_PARALLEL_BACKENDS)}")
        if ray_address is not None and backend != "ray":
            raise ValueError("ray_address needs backend='ray'")
        config = make_engine_config(model, kwargs)  # validates every option once, here
        self.num_replicas = config.data_parallel_size
        threads = split_threads(config.num_threads, self.num_replicas)
        replica_kwargs = dict(kwargs, data_parallel_size=1, num_threads=threads)
        self.backend = backend
        self._ray: RayReplicas | None = None
        if backend == "ray":
            self._ray = RayReplicas(self.num_replicas, threads, 1 if config.device == "cuda" else 0,
                                    ray_address, ray_placement_strategy)
        if served_model_name is not None:
            replica_kwargs["served_model_name"] = served_model_name
        self._served_name = served_model_name
        self._specs = [ReplicaSpec(i, model, replica_kwargs, log_level) for i in range(self.num_replicas)]
        self._router = Router(self.num_replicas, router_config or RouterConfig(router, config.block_size))
        self._router_lock = threading.Lock()  # the router is used by the loop and reader threads
        self._route_seconds = 0.0  # time spent routing, over the engine's life
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self._ids = itertools.count()
        self._where: dict[str, int] = {}  # request id -> replica, while in flight
        self._stopping = False
        self._stopped = False
        self._policy_checks: dict[KVPolicy, str | None] = {}
        self._supervisor = Supervisor(self._start, self._rejoin, restart_backoff_s)
        self._replicas: list[ReplicaClient | None] = [None] * self.num_replicas
        with concurrent.futures.ThreadPoolExecutor(self.num_replicas) as pool:
            futures = [pool.submit(self._start, i) for i in range(self.num_replicas)]
            errors = []
            for i, future in enumerate(futures):
                try:
                    self._replicas[i] = future.result()
                except Exception as exc:  # noqa: BLE001 - all are stopped, then it is raised
                    errors.append(exc)
        if errors:
            for client in self._replicas:
                if client is not None:
                    client.stop()
                    client.join(_STOP_GRACE_S)
            if self._ray is not None:
                self._ray.close()
            raise errors[0]
        first = self._replicas[0].info
        self.tokenizer = self._tokenizer
        self.model_name = first.model_name
        self.max_model_len = first.max_model_len
        self.vocab_size = first.vocab_size
        self.config = dataclasses.replace(first.config, data_parallel_size=self.num_replicas,
                                          max_input_streams=first.config.max_input_streams * self.num_replicas)
        self.max_num_seqs = first.config.max_num_seqs * self.num_replicas
        self._supervisor.watch(self.num_replicas)

    # -------------------------------------------------------------- replicas

    def _start(self, index: int) -> ReplicaClient:
        start = start_replica if self._ray is None else self._ray.start
        return start(self._specs[index], self._tokenizer_for, self.new_request_id, self._on_death, _START_TIMEOUT_S)

    def _tokenizer_for(self, info: m.ReplicaInfo) -> Any:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(info.model_dir)
            return self._tokenizer

    def _on_death(self, client: ReplicaClient) -> None:
        if self._replicas[client.index] is not client:
            return  # a client that never joined (stopped while starting)
        with self._router_lock:
            self._router.remove(client.index)
        if not self._stopping:
            logger.error("replica %d (pid %d) died: %s; restarting it", client.index, client.pid,
                         client.dead_reason)
            self._supervisor.replica_died(client.index)

    def _rejoin(self, client: ReplicaClient) -> None:
        old = self._replicas[client.index]
        self._replicas[client.index] = client
        with self._router_lock:
            self._router.add(client.index)
        if old is not None:
            old.join(1.0)

    def _live(self) -> list[ReplicaClient]:
        return [c for c in self._replicas if c is not None and c.alive]

    def replica(self, index: int) -> ReplicaClient | None:
        """The client of replica ``index`` now (None before it started)."""
        return self._replicas[index]

    @property
    def router_stats(self) -> Any:
        """The router's counters (RouterStats)."""
        return self._router.stats

    @property
    def route_seconds(self) -> float:
        """Seconds spent routing requests, over the engine's life."""
        return self._route_seconds

    @property
    def restarts(self) -> list[int]:
        """Restarts of each replica so far."""
        return list(self._supervisor.restarts)

    def replica_health(self) -> list[dict]:
        """One entry per replica, for ``/health``."""
        out = []
        for i, client in enumerate(self._replicas):
            alive = client is not None and client.alive and self._router.in_rotation(i)
            entry: dict[str, Any] = {"replica": i, "status": "ok" if alive else "restarting",
                                     "restarts": self._supervisor.restarts[i] if self._supervisor.restarts else 0}
            if client is not None:
                entry.update(pid=client.pid, requests_in_flight=client.num_in_flight,
                             load_tokens=client.load_tokens())
                if not client.alive:
                    entry["error"] = client.dead_reason
            out.append(entry)
        return out

    # ------------------------------------------------------------- prompts

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Prompt token ids of a conversation, through the model's chat template."""
        return chat_prompt_ids(self.tokenizer, messages)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt."""
        return encode_prompt(self.tokenizer, prompt)

    def new_request_id(self) -> str:
        """A request id unique within this server (thread-safe)."""
        return f"dp-{next(self._ids)}"

    # ------------------------------------------------------------ requests

    def _route(self, request: RouteRequest) -> tuple[ReplicaClient, Route]:
        started = time.perf_counter()
        if request.session_id is not None:
            with self._router_lock:
                lost = self._router.take_lost(request.session_id)
            if lost:
                raise SessionLostError(
                    f"session {request.session_id!r} was lost: the replica holding its KV failed "
                    "since its last turn; send the request again to start the session afresh")
        while True:
            loads = [c.load_tokens() if c is not None and c.alive else 1 << 62 for c in self._replicas]
            with self._router_lock:
                try:
                    route = self._router.route(request, loads)
                except ValueError:
                    raise ReplicaFailedError(
                        f"no replica is serving now ({self.num_replicas} restarting): retry shortly") from None
                client = self._replicas[route.replica]
                if client is not None and client.alive:
                    self._router.record(route.replica, request)
                    break
                self._router.remove(route.replica)  # died meanwhile: route again
        client.unreported_tokens += max(0, len(request.token_ids) - route.cached_blocks * self._router.config.block_size)
        self._route_seconds += time.perf_counter() - started
        return client, route

    async def generate(
        self,
        prompt: str | list[int] | AsyncIterable[str | bytes | list[int]],
        params: SamplingParams,
        request_id: str | None = None,
        session_id: str | None = None,
        session_ttl: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """:meth:`AsyncEngine.generate <livelm.engine.async_engine.AsyncEngine.generate>`,
        on the replica the router picks (ReplicaFailedError if it fails meanwhile)."""
        options = RequestOptions.from_extra(params.extra, session_id, session_ttl)
        if isinstance(prompt, AsyncIterable):
            async with self.open_stream(cache_salt=options.cache_salt, kv_policy=options.kv_policy) as stream:
                async for chunk in prompt:
                    stream.append(chunk)
                stream.close_input()
                async for out in stream.generate(params, request_id=request_id, options=options):
                    yield out
            return
        self._check_open()
        ids = self.encode(prompt)
        rid = request_id or self.new_request_id()
        salt = options.kv_policy.salt(options.cache_salt)
        request = RouteRequest(ids, salt, options.session_id)
        client, _ = self._route(request)
        self._where[rid] = client.index
        completions: dict[int, list[int]] = {}
        try:
            async for out in client.generate_ids(ids, params, rid, prompt_text=prompt if isinstance(prompt, str) else None,
                                                 options=options):
                for c in out.outputs:
                    completions.setdefault(c.index, []).extend(c.token_ids)
                if out.finished and client.alive:
                    with self._router_lock:  # the completion's KV is cached there too
                        for tokens in completions.values():
                            self._router.record(client.index, request, ids + tokens[:-1])
                yield out
        finally:
            self._where.pop(rid, None)

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe, idempotent); one not routed here (a stream's
        reply) is cancelled on every replica."""
        index = self._where.get(request_id)
        targets = [self._replicas[index]] if index is not None else self._live()
        for client in targets:
            if client is not None:
                client.abort(request_id)

    async def close_session(self, session_id: str) -> bool:
        """Release a session's pinned KV now; False when no replica knows it."""
        with self._router_lock:
            index = self._router.session_replica(session_id)
            self._router.forget_session(session_id)
        targets = [self._replicas[index]] if index is not None else self._live()
        found = False
        for client in targets:
            if client is not None and client.alive:
                with contextlib.suppress(ReplicaFailedError):
                    found = await asyncio.wrap_future(client.call("close_session", session_id)) or found
        return found

    # --------------------------------------------------------- input streams

    def open_stream(self, stream_id: str | None = None, cache_salt: str | None = None,
                    kv_policy: KVPolicy = FULL) -> InputStream:
        """Open a streamed prompt on the least loaded replica; it and its replies stay
        there (see AsyncEngine.open_stream)."""
        self._check_open()
        limit = self.config.max_input_streams
        if self.num_input_streams >= limit:
            raise ValueError(f"too many open input streams ({limit}, the max_input_streams limit): close one first")
        sid = stream_id or f"stream-{next(self._ids)}"
        if self.get_stream(sid) is not None:
            raise ValueError(f"input stream id {sid!r} is already in use")
        self.check_kv_policy(kv_policy)
        client, _ = self._route(RouteRequest([], kv_policy.salt(cache_salt)))
        return client.open_stream(sid, cache_salt, kv_policy)

    def get_stream(self, stream_id: str) -> InputStream | None:
        """The open input stream with that id, on whichever replica."""
        for client in self._live():
            stream = client.get_stream(stream_id)
            if stream is not None:
                return stream
        return None

    @property
    def num_input_streams(self) -> int:
        """Input streams open now, over all replicas."""
        return sum(c.num_input_streams for c in self._live())

    # --------------------------------------------------------------- checks

    def check_structured(self, structured: StructuredOutput | None) -> None:
        """ValueError unless the constraint compiles (asked of a replica: call it off the
        event loop, as the server does)."""
        if structured is None:
            return
        self._any_replica().call_sync("check_structured", structured)

    def check_kv_policy(self, policy: KVPolicy) -> None:
        """ValueError unless the replicas can serve ``policy`` (asked once per policy)."""
        if not policy.is_sinks:
            return
        if policy not in self._policy_checks:
            try:
                self._any_replica().call_sync("check_kv_policy", policy, timeout=10.0)
                self._policy_checks[policy] = None
            except ValueError as exc:
                self._policy_checks[policy] = str(exc)
        error = self._policy_checks[policy]
        if error is not None:
            raise ValueError(error)

    def _any_replica(self) -> ReplicaClient:
        live = self._live()
        if not live:
            raise ReplicaFailedError("no replica is serving now: retry shortly")
        return live[0]

    # ------------------------------------------------------------ liveness

    def stats(self) -> EngineStats:
        """The replicas' last reported stats, merged."""
        return merge_stats([c.stats for c in self._live() if c.stats is not None])

    @property
    def is_alive(self) -> bool:
        """True until shut down (replicas restarting keep it alive)."""
        return not self._stopped

    @property
    def dead_reason(self) -> str | None:
        """Why it stopped; None while it serves."""
        return "the engine shut down" if self._stopped else None

    @property
    def stopping(self) -> bool:
        """True once :meth:`shutdown` began."""
        return self._stopping

    @property
    def weight_version(self) -> int:
        """Always 0: data-parallel replicas take no weight updates."""
        return 0

    def _check_open(self) -> None:
        if self._stopped:
            raise EngineDeadError("the engine stopped: the engine shut down")
        if self._stopping:
            raise RuntimeError("the engine is shutting down")

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop restarting, let each replica drain for ``drain_timeout_s``, then stop every
        process (killed if it does not exit): no replica outlives this call."""
        if self._stopped:
            return
        self._stopping = True
        await asyncio.to_thread(self._supervisor.stop)
        clients = [c for c in self._replicas if c is not None]
        for client in clients:
            client.stop(drain_timeout_s)
        await asyncio.gather(*(asyncio.to_thread(c.join, drain_timeout_s + _STOP_GRACE_S) for c in clients))
        if self._ray is not None:
            await asyncio.to_thread(self._ray.close)
        self._stopped = True
