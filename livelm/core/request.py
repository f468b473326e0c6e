"""The engine core's view of one request: its tokens, progress, KV blocks and status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from livelm.core.kv_policy import FULL, KVPolicy
from livelm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its lifecycle (see docs/architecture.md)."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    WAITING_FOR_INPUT = "waiting_for_input"
    SUSPENDED = "suspended"  # forked into branches, holding its KV until joined (docs/rl.md)
    FINISHED = "finished"


class FinishReason(enum.Enum):
    """Why a sequence stopped; the value is what the APIs report."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class Request:
    """One sequence the scheduler serves.

    The tokens the model must have seen are ``all_token_ids`` (prompt, then outputs);
    ``num_computed_tokens`` of them already have KV in the cache. A request is "caught up"
    when only its last token lacks KV: computing that token yields the next one. Input
    tokens may be appended later (``append_input``) because nothing here assumes the prompt
    is fixed: the scheduler only compares ``num_computed_tokens`` with ``num_tokens``.
    """

    request_id: str
    prompt_token_ids: list[int]
    # None makes an input-only request (see ``input_only``): nothing to sample with.
    sampling_params: SamplingParams | None
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    # n > 1: sequence ``index`` of parent request ``parent_id``; children fork the KV of the
    # first sequence's prompt once it has been computed instead of prefilling it again.
    index: int = 0
    parent_id: str | None = None
    fork_from: str | None = None
    input_closed: bool = True
    # Prefix caching and sessions (see core/prefix_cache.py and core/session_pins.py):
    # requests with different salts never share KV; a request naming a session leaves its
    # KV pinned for ``session_ttl`` seconds (None: the engine's default) when it finishes.
    cache_salt: str | None = None
    session_id: str | None = None
    session_ttl: float | None = None
    # Scheduling (core/scheduling_policy.py, docs/scheduling.md): higher priority first
    # under the priority policy; the tenant whose token share the fair policy balances;
    # latency targets in seconds (None: the engine's, if any). ``arrival_time`` and the
    # TTFT target give the deadline the deadline policy orders by.
    priority: int = 0
    tenant: str = ""
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    # What the request keeps in its KV (core/kv_policy.py). Under ``sinks`` the block table
    # is logical: ``block_ids`` holds the sink blocks, then the blocks from text block
    # ``num_sink_blocks + num_evicted_blocks`` on (see ``physical_block``).
    kv_policy: KVPolicy = FULL
    # Speculative decoding overrides (core/speculative/): None takes the engine's choice;
    # "off" never drafts for this request.
    speculative_method: str | None = None
    num_speculative_tokens: int | None = None

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None  # on the scheduler's clock
    # Prompt tokens whose KV was found (prefix cache or session pin) when the request was
    # first admitted (None before): the usage's cached tokens.
    num_cached_tokens: int | None = None
    # The prefix cache's bookkeeping: chained hashes of the full blocks of
    # ``all_token_ids`` (extended lazily), and the cache content ids of the leading blocks
    # whose KV this request holds and the cache knows.
    block_hashes: list[int] = field(default_factory=list)
    cache_chain: list[int] = field(default_factory=list)
    # Non-sink blocks rolled out of the window (released to the pool; a sliding-window
    # request's leading blocks, KVCacheManager._slide), and their tokens over the request's life (a metric; preemption starts the count of blocks again).
    num_evicted_blocks: int = 0
    num_evicted_tokens: int = 0
    # A sinks request preempted after rolling: the text position its kept window began at.
    # It is recomputed from what it kept (its sinks, then from here on), so tokens between
    # the sinks and this position are gone for good (core/kv_policy.py).
    kv_floor: int = 0
    # Every layer of the model slides by this window (set by the scheduler; None
    # otherwise): blocks that left it are released, chunks are at most a window long.
    sliding_window: int | None = None

    # Set from ``sampling_params`` once, so the scheduler's per-step checks stay plain
    # attribute reads. Streaming input (engine/input_stream.py): an input-only request
    # reads a stream's input into KV as it arrives and never samples; each generation
    # forks its KV.
    input_only: bool = field(init=False, default=False)
    wants_prompt_logprobs: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        params = self.sampling_params
        self.input_only = params is None
        self.wants_prompt_logprobs = params is not None and params.prompt_logprobs is not None
        self.rolling = self.kv_policy.is_sinks
        # Keeps a sinks request's KV apart from other layouts in the prefix cache and pins.
        self.cache_salt = self.kv_policy.salt(self.cache_salt)

    @classmethod
    def input_stream(cls, stream_id: str, token_ids: list[int], cache_salt: str | None = None,
                     kv_policy: KVPolicy = FULL) -> Request:
        """The input-only request that reads an input stream into KV (its input stays open)."""
        return cls(stream_id, list(token_ids), None, input_closed=False, cache_salt=cache_salt, kv_policy=kv_policy)

    def physical_block(self, text_block: int, block_size: int) -> int:
        """The pool block holding text block ``text_block`` (the logical table of a sinks
        request, or of a sliding-window one that released blocks; else the identity)."""
        if text_block < self.kv_policy.num_sink_blocks(block_size):
            return self.block_ids[text_block]
        return self.block_ids[text_block - self.num_evicted_blocks]

    @property
    def ttft_deadline(self) -> float | None:
        """When the first token is due (arrival + TTFT target), or None without a target."""
        return None if self.ttft_slo is None else self.arrival_time + self.ttft_slo

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens known so far."""
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt (input) part."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """How many tokens have been generated."""
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        """True once the request has stopped for any reason."""
        return self.status == RequestStatus.FINISHED

    def append_output(self, token_id: int) -> None:
        """Record a sampled token."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def append_context(self, token_ids: list[int]) -> None:
        """Extend the tokens the model has seen after the output so far (a fork's join
        appends its branches' outputs): they are context, not output of this request."""
        self.all_token_ids.extend(token_ids)

    def append_input(self, token_ids: list[int]) -> None:
        """Extend the prompt of a request that has not produced output yet (streaming input)."""
        if self.output_token_ids:
            raise ValueError("input can only be appended before the request generates output")
        self.prompt_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def truncate_input(self, num_tokens: int) -> None:
        """Drop the prompt from token ``num_tokens`` on (update mode revised it); the caller
        has already cut the KV back to at most ``num_tokens`` computed tokens."""
        if self.output_token_ids:
            raise ValueError("input can only be revised before the request generates output")
        if self.num_computed_tokens > num_tokens:
            raise RuntimeError("truncate the KV before the tokens it was computed from")
        del self.prompt_token_ids[num_tokens:]
        del self.all_token_ids[num_tokens:]
