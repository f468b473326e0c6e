"""Tensor-parallel worker processes (``tensor_parallel_size`` > 1, CPU, gloo).

The engine's process is rank 0: it runs the scheduler, samples and owns everything the
engine does. Ranks 1..N-1 are spawned child processes, each with its own share of the
model (models/tensor_parallel.py) and its own paged KV cache for its KV heads, in the
same block layout as rank 0's (the scheduler's block ids are valid on every rank). Before
each model forward rank 0 sends the forward's chunks (the step's plan) to every worker
over a pipe; all ranks then run the same forward, meeting in the two all-reduces per
layer of one gloo process group. KV block copies (a fork's copy-on-write) are sent the
same way. Only rank 0 computes logits.

A worker that dies (or fails to start) makes the next step raise
:class:`TensorParallelError` naming it: the engine cannot go on without its shard, and
every request in flight fails with that message. Workers are daemon processes that also
exit when their pipe closes, so none outlives the engine's process.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from livelm.core.scheduler_output import ScheduledChunk
from livelm.layers.tensor_parallel import TensorParallelGroup

logger = logging.getLogger("livelm")

# How long a collective waits for the other ranks before it fails (a dead rank).
_COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
_START_TIMEOUT_S = 600.0


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker died or failed: the engine cannot run without its shard."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its rank: the model as the engine loads it, the KV
    cache's shape, and its threads."""

    model_dir: str
    dtype: torch.dtype
    max_positions: int
    quantization: str
    num_blocks: int
    block_size: int
    attention_backend: str
    kv_dtype: torch.dtype
    num_threads: int
    log_level: int
    activation_quantization: str = "none"


def make_group(store_port: int, rank: int, world_size: int) -> TensorParallelGroup:
    """Join the gloo process group of the ranks (blocks until every rank has joined)."""
    store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=_START_TIMEOUT_S))
    pg = dist.ProcessGroupGloo(store, rank, world_size, _COLLECTIVE_TIMEOUT)
    return TensorParallelGroup(pg, rank, world_size)


class TensorParallelWorkers:
    """Rank 0's side: start the workers, send them each forward, stop them."""

    def __init__(self, world_size: int, spec: WorkerSpec) -> None:
        self.world_size = world_size
        # The store lives in rank 0's process; port 0: the OS picks a free one.
        self._store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True,
                                    timeout=datetime.timedelta(seconds=_START_TIMEOUT_S), wait_for_workers=False)
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Any] = []
        self._processes: list[Any] = []
        for rank in range(1, world_size):
            ours, theirs = ctx.Pipe(duplex=True)
            process = ctx.Process(target=worker_main, name=f"livelm-tp-{rank}", daemon=True,
                                  args=(theirs, rank, world_size, self._store.port, spec, os.getpid()))
            process.start()
            theirs.close()
            self._conns.append(ours)
            self._processes.append(process)
        self.dead: str | None = None
        self.group = self._join()

    def _join(self) -> TensorParallelGroup:
        """Rank 0's end of the process group, made while watching the workers: one that
        exits before joining (it cannot import, say) is reported at once, with its error."""
        box: dict[str, Any] = {}

        def join() -> None:
            try:
                box["pg"] = dist.ProcessGroupGloo(self._store, 0, self.world_size, _COLLECTIVE_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - raised below, on the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=join, name="livelm-tp-join", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
            for rank, (conn, process) in enumerate(zip(self._conns, self._processes, strict=True), start=1):
                if thread.is_alive() and not process.is_alive():
                    detail = conn.recv()[1] if conn.poll(0) else f"exit code {process.exitcode}"
                    self.close()
                    raise TensorParallelError(f"tensor-parallel worker {rank} exited before joining: {detail}")
        if "pg" not in box:
            self.close()
            raise TensorParallelError(f"the tensor-parallel workers did not join: {box.get('error')}")
        return TensorParallelGroup(box["pg"], 0, self.world_size)

    def wait_ready(self) -> None:
        """Wait until every worker has built its shard (TensorParallelError if one failed)."""
        for rank, conn in enumerate(self._conns, start=1):
            try:
                if not conn.poll(_START_TIMEOUT_S):
                    raise TensorParallelError(f"tensor-parallel worker {rank} did not load its shard in "
                                              f"{_START_TIMEOUT_S:.0f}s")
                status, detail = conn.recv()
            except (EOFError, OSError) as exc:
                self.close()
                raise TensorParallelError(f"tensor-parallel worker {rank} exited while loading its shard") from exc
            if status != "ready":
                self.close()
                raise TensorParallelError(f"tensor-parallel worker {rank} could not load its shard: {detail}")

    def forward(self, chunks: list[ScheduledChunk]) -> None:
        """Tell every worker to run the model over ``chunks`` (rank 0 runs it right after)."""
        self._send(("forward", chunks))

    def logits(self, rows: list[int]) -> None:
        """Tell every worker to compute its share of the logits of these rows of the last
        forward's hidden states (rank 0 computes its share right after)."""
        self._send(("logits", rows))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Tell every worker to copy these KV blocks (source, destination)."""
        self._send(("copy", copies))

    def _send(self, message: tuple) -> None:
        if self.dead is not None:
            raise TensorParallelError(self.dead)
        for rank, (conn, process) in enumerate(zip(self._conns, self._processes, strict=True), start=1):
            try:
                conn.send(message)
            except (OSError, EOFError, ValueError) as exc:
                code = process.exitcode if not process.is_alive() else None
                self.dead = (f"tensor-parallel worker {rank} (pid {process.pid}) is gone"
                             + (f" (exit code {code})" if code is not None else "")
                             + ": the engine cannot run without its shard; restart the engine")
                raise TensorParallelError(self.dead) from exc

    def check_alive(self, grace_s: float = 0.0) -> None:
        """TensorParallelError if a worker process has exited, or exits within ``grace_s``
        (a collective fails as soon as a killed peer's sockets close, a moment before the
        process can be reaped)."""
        deadline = time.monotonic() + grace_s
        for rank, process in enumerate(self._processes, start=1):
            process.join(max(0.0, deadline - time.monotonic()))
            if not process.is_alive() and self.dead is None:
                self.dead = (f"tensor-parallel worker {rank} (pid {process.pid}) exited (exit code "
                             f"{process.exitcode}): the engine cannot run without its shard; restart the engine")
        if self.dead is not None:
            raise TensorParallelError(self.dead)

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (ranks 1..N-1)."""
        return [p.pid for p in self._processes]

    def close(self) -> None:
        """Stop every worker (killed if it does not exit) and wait for them: no orphans."""
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, EOFError, ValueError):
                pass
            conn.close()
        for process in self._processes:
            process.join(10.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
        self._conns, self._processes = [], []


def worker_main(conn: Any, rank: int, world_size: int, store_port: int, spec: WorkerSpec, parent_pid: int) -> None:
    """A worker process: join the group, build rank ``rank``'s shard and KV cache, then run
    each forward rank 0 sends until told to stop or the pipe closes."""
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s %(levelname)s tp-{rank} %(name)s: %(message)s")
    try:
        torch.set_num_threads(spec.num_threads)
        group = make_group(store_port, rank, world_size)
        runner = _build_runner(spec, group)
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, then the process ends
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # rank 0 is gone
        if message is None:
            return
        kind, payload = message
        try:
            if kind == "forward":
                runner.forward_only(payload)
            elif kind == "logits":
                runner.logits_only(payload)
            elif kind == "copy":
                runner.copy_blocks(payload)
        except Exception:  # noqa: BLE001 - rank 0 met the same failure and handles it
            logger.exception("tensor-parallel worker %d: %s failed", rank, kind)
        if os.getppid() != parent_pid:
            return


def _build_runner(spec: WorkerSpec, group: TensorParallelGroup):
    from livelm.models.loader import load_model, use_int8_activations
    from livelm.models.tensor_parallel import shard_model
    from livelm.runner.model_runner import ModelRunner

    model = load_model(spec.model_dir, spec.dtype, torch.device("cpu"), spec.max_positions, spec.quantization)
    shard_model(model, group)
    if spec.activation_quantization == "int8":  # the shards are new modules
        use_int8_activations(model)
    return ModelRunner(model, spec.num_blocks, spec.block_size, frozenset(), spec.attention_backend, None,
                       spec.kv_dtype)
