"""Replicas as Ray actors (``data_parallel_backend="ray"``), for replicas on many machines.

Each replica is an actor placed in one bundle of a placement group (one bundle per
replica, ``{"CPU": threads}`` and ``{"GPU": 1}`` on CUDA), which runs the same
:func:`~livelm.serving.replica_process.replica_main` as a local replica process. The
actor connects back to the server over TCP with ``multiprocessing.connection``
(authenticated by a random key made for that replica), so the server talks to it exactly
as to a local process over a pipe: the same messages, the same client, the same
supervisor. The server listens on the address Ray knows this node by (127.0.0.1 on a
cluster it started itself). A replica that dies closes its socket: its requests fail
clearly and the supervisor starts a new actor in the same bundle.

Ray is optional (``pip install 'livelm[ray]'``); nothing here imports it until a Ray
backend is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Listener
from typing import Any

from livelm.serving import messages as m
from livelm.serving.replica_client import ReplicaClient
from livelm.serving.replica_process import replica_main
from livelm.serving.supervisor import ReplicaSpec, ReplicaStartError, await_ready

logger = logging.getLogger("livelm.serving")

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_PLACEMENT_TIMEOUT_S = 120.0


def import_ray() -> Any:
    """The ``ray`` module, or a ValueError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ValueError("data_parallel_backend='ray' needs Ray: pip install 'livelm[ray]' "
                         "(or use the default local backend)") from exc
    return ray


@functools.cache
def _replica_actor_class() -> Any:
    """The actor class, made once per process (Ray exports a class on its first use)."""
    ray = import_ray()

    @ray.remote(max_restarts=0, max_task_retries=0)
    class ReplicaActor:
        """One replica: connects to the server and serves until told to stop."""

        def serve(self, address: tuple[str, int], authkey: bytes, index: int, model: str | None,
                  engine_kwargs: dict, log_level: str) -> int:
            from multiprocessing.connection import Client

            conn = Client(address, authkey=authkey)
            replica_main(conn, index, model, engine_kwargs, None, log_level)
            return 0

    return ReplicaActor


class RayActorProcess:
    """A Ray replica actor seen as a process (what ReplicaClient and the supervisor call):
    alive while its ``serve`` call runs, joined by waiting for that call, killed by Ray."""

    def __init__(self, ray: Any, actor: Any, done: Any) -> None:
        self._ray = ray
        self._actor = actor
        self._done = done  # the ObjectRef of serve(): ready once the replica has stopped

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for the replica to stop."""
        if self._ray.is_initialized():
            with contextlib.suppress(Exception):  # Ray shutting down under us: nothing to wait for
                self._ray.wait([self._done], timeout=timeout)

    def is_alive(self) -> bool:
        """True while the replica's serve call has not returned (or failed); False once
        Ray itself is down (its actors went with it)."""
        if not self._ray.is_initialized():
            return False
        try:
            ready, _ = self._ray.wait([self._done], timeout=0)
        except Exception:  # noqa: BLE001 - Ray shutting down: the actor is gone with it
            return False
        return not ready

    def kill(self) -> None:
        """End the actor now (its worker process is killed by Ray)."""
        if self._ray.is_initialized():
            with contextlib.suppress(Exception):  # already dead, or Ray already down
                self._ray.kill(self._actor, no_restart=True)

    @property
    def exitcode(self) -> int | None:
        """None while alive; 0 after a clean stop, 1 after a failure or a kill."""
        if self.is_alive():
            return None
        if not self._ray.is_initialized():
            return 1
        try:
            return self._ray.get(self._done, timeout=0)
        except Exception:  # noqa: BLE001 - the actor died: RayActorError and kin
            return 1

    def failure(self) -> str | None:
        """Why the actor ended, if it ended with an error (its traceback's last line)."""
        if self.is_alive() or not self._ray.is_initialized():
            return None
        try:
            self._ray.get(self._done, timeout=0)
        except Exception as exc:  # noqa: BLE001 - reported to the caller as text
            return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return None


class RayReplicas:
    """The Ray side of a data-parallel engine: Ray itself (connected to ``address``, or a
    local cluster started here when there is none) and one placement group with a bundle
    per replica."""

    def __init__(self, num_replicas: int, cpus_per_replica: int, gpus_per_replica: int = 0,
                 address: str | None = None, strategy: str = "PACK") -> None:
        if strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"unknown Ray placement strategy {strategy!r}; use one of {', '.join(PLACEMENT_STRATEGIES)}")
        ray = import_ray()
        from ray.util.placement_group import placement_group

        self._ray = ray
        self.started_ray = not ray.is_initialized()
        # address None: RAY_ADDRESS if set, else a new local cluster owned by this process
        # ("local": never attach to some other cluster left running on this machine).
        target = address or os.environ.get("RAY_ADDRESS") or "local"
        if self.started_ray:
            ray.init(address=target, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, configure_logging=False)
        # Replicas connect back to this address: loopback when the cluster is this machine.
        self.local_cluster = self.started_ray and target == "local"
        self.server_host = "127.0.0.1" if self.local_cluster else ray.util.get_node_ip_address()
        bundle: dict[str, float] = {"CPU": float(cpus_per_replica)}
        if gpus_per_replica:
            bundle["GPU"] = float(gpus_per_replica)
        self.bundle = bundle
        self.group = placement_group([dict(bundle) for _ in range(num_replicas)], strategy=strategy)
        ready, _ = ray.wait([self.group.ready()], timeout=_PLACEMENT_TIMEOUT_S)
        if not ready:
            available = ray.available_resources()
            self.close()
            raise ValueError(f"Ray could not place {num_replicas} replicas of {bundle} each "
                             f"({strategy}) in {_PLACEMENT_TIMEOUT_S:.0f}s; the cluster has {available} free")

    def start(self, spec: ReplicaSpec, tokenizer_for: Callable[[m.ReplicaInfo], Any],
              new_request_id: Callable[[], str], on_death: Callable[[ReplicaClient], None],
              timeout_s: float) -> ReplicaClient:
        """Start replica ``spec.index`` as an actor in its bundle and wait until it is
        Ready (ReplicaStartError if it fails, dies or takes longer than ``timeout_s``)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = self._ray
        authkey = secrets.token_bytes(32)
        listener = Listener((self.server_host, 0), authkey=authkey)
        try:
            strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=spec.index)
            actor = _replica_actor_class().options(
                num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0), scheduling_strategy=strategy,
            ).remote()
            done = actor.serve.remote(listener.address, authkey, spec.index, spec.model, spec.engine_kwargs,
                                      spec.log_level)
            process = RayActorProcess(ray, actor, done)
            conn = _accept(listener, process, timeout_s, spec.index)
        finally:
            listener.close()
        return await_ready(spec, process, conn, tokenizer_for, new_request_id, on_death, timeout_s)

    def close(self) -> None:
        """Remove the placement group, and shut Ray down if it was started here."""
        from ray.util.placement_group import remove_placement_group

        ray = self._ray
        if not ray.is_initialized():
            return
        try:
            remove_placement_group(self.group)
        except Exception:  # noqa: BLE001 - a cluster that went away already removed it
            logger.warning("could not remove the replicas' placement group", exc_info=True)
        if self.started_ray:
            ray.shutdown()


def _accept(listener: Listener, process: RayActorProcess, timeout_s: float, index: int) -> Any:
    """The replica's connection, once its actor dialled in; ReplicaStartError if the actor
    failed first (its error is the reason) or nothing came within ``timeout_s``."""
    box: dict[str, Any] = {}

    def accept() -> None:
        try:
            box["conn"] = listener.accept()
        except Exception as exc:  # noqa: BLE001 - closed listener or a bad key: reported below
            box["error"] = exc

    thread = threading.Thread(target=accept, name=f"livelm-ray-accept-{index}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive():
        thread.join(0.2)
        if not thread.is_alive():
            break
        if not process.is_alive():
            raise ReplicaStartError(f"replica {index} (a Ray actor) failed before connecting: {process.failure()}")
        if time.monotonic() > deadline:
            process.kill()
            raise ReplicaStartError(f"replica {index} (a Ray actor) did not connect in {timeout_s:.0f}s")
    if "conn" not in box:
        process.kill()
        raise ReplicaStartError(f"replica {index} (a Ray actor) could not connect: {box.get('error')}")
    return box["conn"]
