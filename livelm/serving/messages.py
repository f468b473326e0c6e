"""The messages between the server process and its engine replicas (docs/distributed.md).

Each side sends lists of these frozen dataclasses over one ``multiprocessing`` pipe per
replica (pickled; a list per event-loop turn, so a busy step's deltas travel together).
Server -> replica: requests in, cancellation, input streams, calls, shutdown. Replica ->
server: readiness, output deltas, failures, stream progress, load reports, call results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from livelm.config import EngineConfig
from livelm.core.kv_policy import KVPolicy
from livelm.core.request_options import RequestOptions
from livelm.outputs import RequestOutput
from livelm.sampling_params import SamplingParams

# ----------------------------------------------------------------- server -> replica


@dataclass(frozen=True)
class Generate:
    """Run one request; ``fork_from`` names the replica's input stream it replies to."""

    request_id: str
    prompt_token_ids: list[int]
    prompt_text: str | None
    params: SamplingParams
    options: RequestOptions
    fork_from: str | None = None


@dataclass(frozen=True)
class Cancel:
    """Abort a request (idempotent)."""

    request_id: str


@dataclass(frozen=True)
class OpenStream:
    """Open an input stream (token ids; the server tokenizes streamed text)."""

    stream_id: str
    cache_salt: str | None
    kv_policy: KVPolicy


@dataclass(frozen=True)
class UpdateStream:
    """Keep the first ``keep`` input tokens, append ``append``; ``close`` ends the input."""

    stream_id: str
    keep: int
    append: list[int]
    close: bool


@dataclass(frozen=True)
class CloseStream:
    """Free an input stream's KV."""

    stream_id: str


@dataclass(frozen=True)
class Call:
    """Call a replica's AsyncEngine method (one of ``CALLABLE``); answered by CallResult."""

    call_id: int
    method: str
    args: tuple = ()


@dataclass(frozen=True)
class Shutdown:
    """Let in-flight requests finish for ``drain_timeout_s``, abort the rest, exit."""

    drain_timeout_s: float = 0.0


# The AsyncEngine methods a Call may name (async ones are awaited).
CALLABLE = frozenset({"close_session", "check_structured", "check_kv_policy", "abort_all", "stats"})

# ----------------------------------------------------------------- replica -> server


@dataclass(frozen=True)
class ReplicaInfo:
    """What the server needs to know of a replica's engine (sent once it is loaded)."""

    pid: int
    model_dir: str
    model_name: str
    max_model_len: int
    vocab_size: int
    kv_capacity_tokens: int
    config: EngineConfig


@dataclass(frozen=True)
class Ready:
    """The replica loaded its engine and takes requests."""

    info: ReplicaInfo


@dataclass(frozen=True)
class StartFailed:
    """The replica could not build its engine (the server reports ``reason``)."""

    reason: str


@dataclass(frozen=True)
class Output:
    """One output delta of a request (the last has ``finished=True``)."""

    request_id: str
    output: RequestOutput


@dataclass(frozen=True)
class Failed:
    """A request the engine refused or could not run: ``kind`` is ``value`` (a
    ValueError: the caller's fault, a 400) or ``runtime``."""

    request_id: str
    kind: str
    message: str


@dataclass(frozen=True)
class StreamProgress:
    """An input stream's prefill reached ``num_computed`` tokens."""

    stream_id: str
    num_computed: int


@dataclass(frozen=True)
class StreamClosed:
    """The replica closed an input stream (idle timeout, invalid input, shutdown)."""

    stream_id: str
    reason: str


@dataclass(frozen=True)
class Load:
    """The replica's engine stats after a step (what the router balances on)."""

    stats: Any  # EngineStats (engine floor); kept Any so this module stays light


@dataclass(frozen=True)
class CallResult:
    """The answer to a Call: ``value``, or ``error`` (``kind``, message) as in Failed."""

    call_id: int
    value: Any = None
    error: tuple[str, str] | None = None


def error_kind(exc: BaseException) -> str:
    """``value`` for a ValueError (the request's fault), else ``runtime``."""
    return "value" if isinstance(exc, ValueError) else "runtime"


def rebuild_error(kind: str, message: str) -> Exception:
    """The exception a Failed/CallResult stands for, in the server process."""
    return ValueError(message) if kind == "value" else RuntimeError(message)
