"""Starting replica processes, and starting them again when they die.

Each replica is a ``multiprocessing`` *spawn* child (a fresh interpreter: no forked torch
threads or locks) running :func:`~livelm.serving.replica_process.replica_main`, marked
daemon so that the interpreter's exit also ends it. The supervisor's one thread restarts a
dead replica after a back-off (doubling from ``restart_backoff_s`` up to 30 s while it
keeps dying quickly), then hands the new client to ``on_ready`` (the engine puts it back
into rotation).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from livelm.serving import messages as m
from livelm.serving.replica_client import ReplicaClient
from livelm.serving.replica_process import replica_main

logger = logging.getLogger("livelm.serving")

_MAX_BACKOFF_S = 30.0
_STABLE_S = 60.0  # a replica up this long resets the back-off


class ReplicaStartError(RuntimeError):
    """A replica process could not build its engine (the reason is its error)."""


@dataclass(frozen=True)
class ReplicaSpec:
    """How to start replica ``index``: the model and its engine options."""

    index: int
    model: str | None
    engine_kwargs: dict
    log_level: str = "WARNING"


def start_replica(spec: ReplicaSpec, tokenizer_for: Callable[[m.ReplicaInfo], Any],
                  new_request_id: Callable[[], str], on_death: Callable[[ReplicaClient], None],
                  timeout_s: float) -> ReplicaClient:
    """Spawn a replica and wait until its engine is loaded (ReplicaStartError if it
    fails, dies or takes longer than ``timeout_s``; the process is then gone)."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=True)
    process = ctx.Process(target=replica_main, name=f"livelm-replica-{spec.index}", daemon=True,
                          args=(theirs, spec.index, spec.model, spec.engine_kwargs, os.getpid(), spec.log_level))
    process.start()
    theirs.close()  # the child holds the only other end: its death is our EOF
    return await_ready(spec, process, ours, tokenizer_for, new_request_id, on_death, timeout_s)


def await_ready(spec: ReplicaSpec, process: Any, conn: Any, tokenizer_for: Callable[[m.ReplicaInfo], Any],
                new_request_id: Callable[[], str], on_death: Callable[[ReplicaClient], None],
                timeout_s: float) -> ReplicaClient:
    """The client of a started replica once it said Ready on ``conn`` (ReplicaStartError
    if it fails, dies or takes longer than ``timeout_s``; ``process`` is then gone).
    ``process`` is a ``multiprocessing.Process`` or anything with its join / is_alive /
    kill / exitcode (a Ray actor's handle, serving/ray_replicas.py)."""
    try:
        if not conn.poll(timeout_s):
            raise ReplicaStartError(f"replica {spec.index} did not load its engine in {timeout_s:.0f}s")
        first = conn.recv()[0]
    except (EOFError, OSError) as exc:
        process.join(5.0)
        _reap(process)
        raise ReplicaStartError(f"replica {spec.index} exited while starting (exit code {process.exitcode})") from exc
    except ReplicaStartError:
        _reap(process)
        raise
    if isinstance(first, m.StartFailed):
        _reap(process)
        raise ReplicaStartError(f"replica {spec.index} could not start: {first.reason}")
    assert isinstance(first, m.Ready), first
    return ReplicaClient(spec.index, process, conn, first.info, tokenizer_for(first.info), new_request_id, on_death)


def _reap(process: Any) -> None:
    process.join(5.0)
    if process.is_alive():
        process.kill()
        process.join(5.0)


class Supervisor:
    """Restarts replicas that die, one at a time, on its own thread."""

    def __init__(self, start: Callable[[int], ReplicaClient], on_ready: Callable[[ReplicaClient], None],
                 restart_backoff_s: float = 0.5) -> None:
        self._start = start
        self._on_ready = on_ready
        self._backoff_s = restart_backoff_s
        self._dead: queue.Queue[int | None] = queue.Queue()
        self._failures: dict[int, tuple[int, float]] = {}  # index -> (quick deaths, last start)
        self.restarts: list[int] = []  # per replica, sized by watch()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="livelm-supervisor", daemon=True)

    def watch(self, num_replicas: int) -> None:
        """Start restarting (call once every replica has started)."""
        self.restarts = [0] * num_replicas
        now = time.monotonic()
        self._failures = {i: (0, now) for i in range(num_replicas)}
        self._thread.start()

    def replica_died(self, index: int) -> None:
        """Schedule a restart of replica ``index`` (any thread)."""
        if not self._stopped.is_set():
            self._dead.put(index)

    def stop(self) -> None:
        """Restart nothing more; returns once a restart in progress has ended."""
        self._stopped.set()
        self._dead.put(None)
        if self._thread.is_alive():
            self._thread.join(60.0)

    def _run(self) -> None:
        while True:
            index = self._dead.get()
            if index is None or self._stopped.is_set():
                return
            quick, started = self._failures[index]
            quick = 0 if time.monotonic() - started > _STABLE_S else quick + 1
            delay = min(_MAX_BACKOFF_S, self._backoff_s * 2 ** max(0, quick - 1))
            if self._stopped.wait(delay):
                return
            self._failures[index] = (quick, time.monotonic())
            try:
                client = self._start(index)
            except Exception as exc:  # noqa: BLE001 - try again later
                logger.error("restarting replica %d failed: %s", index, exc)
                self._dead.put(index)
                continue
            if self._stopped.is_set():
                client.stop()
                client.join(30.0)
                return
            self.restarts[index] += 1
            logger.warning("replica %d restarted (pid %d)", index, client.pid)
            self._on_ready(client)
