"""Weights from a trainer process to engines over ``torch.distributed`` (docs/rl.md).

An *update group* is a process group of its own (a ``TCPStore`` plus a gloo or NCCL
backend, never the default ``torch.distributed`` group, so a trainer's own groups are left
alone): rank 0 is the trainer, ranks 1.. are engines. One update is:

1. the trainer broadcasts a JSON header, every tensor's name, shape and dtype;
2. every engine checks the header against its model and all-reduces a refusal count: when
   any engine refuses, the trainer's :meth:`WeightSender.send` raises ValueError and no
   tensor is sent (the engines keep their weights);
3. the trainer broadcasts the tensors one by one; each engine receives into fresh staging
   buffers of the announced shape and dtype, never into live weights.

A trainer that dies mid-broadcast makes the engine's receive raise (the connection closes,
or the group's timeout passes): the staging buffers are dropped and the engine serves on
with the weights it had.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist

from livelm.models.weight_update import FLOAT_DTYPES, WeightSpec, specs_from_json, specs_to_json

BACKENDS = ("gloo", "nccl")
_DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}
_MAX_HEADER_BYTES = 64 << 20


class _Group:
    """A standalone process group: ``world_size`` ranks meeting at ``host:port``."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r:.40}")
        if not (isinstance(world_size, int) and world_size >= 2 and 0 <= rank < world_size):
            raise ValueError(f"need world_size >= 2 and 0 <= rank < world_size, got rank {rank}, size {world_size}")
        if not (isinstance(port, int) and 0 < port < 65536):
            raise ValueError(f"port must be an integer in [1, 65535], got {port!r:.40}")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size = rank, world_size
        self.store = dist.TCPStore(host, port, world_size, rank == 0, timeout)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
            self.device = torch.device("cpu")
        else:  # pragma: no cover - needs CUDA
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size)
            self.device = torch.device("cuda", torch.cuda.current_device())

    def broadcast(self, tensor: torch.Tensor) -> None:
        self.pg.broadcast(tensor, 0).wait()

    def sum(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.pg.allreduce([t]).wait()
        return int(t.item())

    def send_bytes(self, data: bytes) -> None:
        self.broadcast(torch.tensor([len(data)], dtype=torch.int64, device=self.device))
        self.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device))

    def recv_bytes(self) -> bytes:
        n = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast(n)
        size = int(n.item())
        if not 0 < size <= _MAX_HEADER_BYTES:
            raise ValueError(f"weight update header of {size} bytes")
        buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        self.broadcast(buf)
        return bytes(buf.cpu().numpy())

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except Exception:  # noqa: BLE001 - best effort: the peer may be gone
            pass


class WeightSender(_Group):
    """The trainer's end of an update group (rank 0; it hosts the group's store).

    ``WeightSender(host, port, world_size=1 + number of engines)`` waits until every engine
    joined (``AsyncEngine.join_update_group`` / ``Engine.join_update_group``).
    """

    def __init__(self, host: str, port: int, world_size: int = 2, backend: str = "gloo",
                 timeout_s: float = 600.0) -> None:
        super().__init__(host, port, 0, world_size, backend, timeout_s)

    def send(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Broadcast one update; ValueError (sending nothing) when an engine refuses it.

        The engines must be receiving (``update_weights_from_group``) at the same time.
        """
        items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
        specs = []
        for name, t in items:
            if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPE_NAMES:
                raise ValueError(f"weight {name!r}: only float32/float16/bfloat16 tensors can be sent")
            specs.append(WeightSpec(name, tuple(t.shape), _DTYPE_NAMES[t.dtype]))
        self.send_bytes(specs_to_json(specs))
        refused = self.sum(0)
        if refused:
            raise ValueError(f"{refused} engine(s) refused the update (their logs say why); nothing was sent")
        for _, t in items:
            self.broadcast(t.detach().to(self.device).contiguous())


class WeightReceiver(_Group):
    """An engine's end of an update group (rank >= 1)."""

    def __init__(self, host: str, port: int, rank: int = 1, world_size: int = 2, backend: str = "gloo",
                 timeout_s: float = 600.0) -> None:
        if rank < 1:
            raise ValueError("an engine's rank in an update group must be >= 1 (rank 0 is the trainer)")
        super().__init__(host, port, rank, world_size, backend, timeout_s)

    def receive(self, check: Callable[[list[WeightSpec]], None]) -> list[tuple[str, torch.Tensor]]:
        """Receive one update into fresh tensors (on the CPU), after ``check(specs)`` accepted
        its header (its ValueError refuses the update and is raised here)."""
        error: ValueError | None = None
        try:
            specs = specs_from_json(self.recv_bytes())
            check(specs)
        except ValueError as e:
            error = e
        refused = self.sum(1 if error is not None else 0)
        if error is not None:
            raise error
        if refused:
            raise ValueError("another engine of the update group refused the update")
        out = []
        for spec in specs:
            buf = torch.empty(spec.shape, dtype=FLOAT_DTYPES[spec.dtype], device=self.device)
            self.broadcast(buf)
            out.append((spec.name, buf.cpu()))
        return out
