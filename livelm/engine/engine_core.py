"""EngineCore: loads the model, sizes the KV cache, and runs scheduler + runner steps."""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from livelm.config import CacheConfig, EngineConfig, SchedulerConfig
from livelm.core.engine_output import EngineCoreOutput
from livelm.core.kv_manager import blocks_needed
from livelm.core.request import FinishReason, Request
from livelm.core.scheduler import Scheduler
from livelm.models.loader import load_model
from livelm.models.model_config import ModelConfig
from livelm.runner.cpu_memory import keep_large_buffers_in_heap
from livelm.runner.model_runner import ModelRunner
from livelm.sampling_params import SamplingParams

logger = logging.getLogger("livelm")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_ROPE_TABLE = 131072


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load.

    Prefix cache: tokens looked up and tokens reused (cache or session pin) over all
    admitted requests, blocks registered, and cached free blocks evicted for new data.
    Sessions: sessions and distinct blocks pinned now, and pins ended by TTL, dropped
    under memory pressure, or closed by the user. Input streams: streams open now,
    and ``num_computed_tokens``, every token the model has computed KV for (prompts,
    streamed input and generated tokens alike; work a cache hit saved is not in it).
    """

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float
    num_preemptions: int
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    num_cached_blocks: int = 0
    num_cache_evictions: int = 0
    num_sessions: int = 0
    num_pinned_blocks: int = 0
    num_session_pins_expired: int = 0
    num_session_pins_dropped: int = 0
    num_session_pins_closed: int = 0
    num_input_streams: int = 0
    num_computed_tokens: int = 0


def pick_device(name: str) -> torch.device:
    """"auto" is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is fp32 on CPU (bf16 matmuls are far slower on AVX2) and bf16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class EngineCore:
    """The step loop's body: schedule, run the model, update requests."""

    # Every live engine, so tests can check after each test that no KV block leaked.
    live_instances: weakref.WeakSet[EngineCore] = weakref.WeakSet()

    def __init__(self, model_dir: str | Path, config: EngineConfig) -> None:
        self.config = config
        EngineCore.live_instances.add(self)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            keep_large_buffers_in_heap()
        self.model_config = ModelConfig.from_dir(model_dir)
        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings and mc.rope.rope_type == "default":
            logger.warning(
                "max_model_len %d exceeds the model's %d positions", self.max_model_len, mc.max_position_embeddings
            )
        t0 = time.perf_counter()
        model = load_model(
            model_dir, self.dtype, self.device, min(self.max_model_len, _MAX_ROPE_TABLE), config.quantization
        )
        logger.info("loaded %s (%s, %s) in %.1fs", model_dir, self.dtype, self.device, time.perf_counter() - t0)

        num_blocks = self._num_kv_blocks()
        self.cache_config = CacheConfig(
            config.block_size, num_blocks, config.enable_prefix_caching, config.session_ttl_s
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len),
            self.cache_config,
        )
        self.eos_token_ids = frozenset(mc.eos_token_ids)
        self.last_step_was_empty = False  # nothing could be scheduled (waiting for KV, a fork)
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.eos_token_ids)
        logger.info("KV cache: %d blocks of %d tokens", num_blocks, config.block_size)

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks:
            return cfg.num_kv_blocks
        per_block = ModelRunner.kv_bytes_per_block(self.model_config, cfg.block_size, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * cfg.gpu_memory_utilization
        else:
            budget = cfg.kv_cache_gib * 2**30
        # More blocks than max_num_seqs full contexts could never be used.
        useful = cfg.max_num_seqs * blocks_needed(self.max_model_len, cfg.block_size)
        return max(1, min(int(budget // per_block), useful))

    # ------------------------------------------------------------------ requests

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (saying what to fix) for a request the engine cannot serve."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        max_tokens = params.max_tokens if params.max_tokens is not None else 1
        if n + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds the "
                f"context length of {self.max_model_len} tokens: shorten the prompt or lower max_tokens"
            )
        capacity = self.scheduler.kv_capacity_tokens
        if n + max_tokens > capacity:
            raise ValueError(
                f"prompt + max_tokens = {n + max_tokens} tokens cannot fit in the KV cache "
                f"({capacity} tokens): raise kv_cache_gib or lower max_tokens"
            )
        session_id, _, _ = request_options(params)
        if session_id is not None and params.n > 1:
            raise ValueError("a session turn must have n == 1 (which sequence would the next turn continue?)")

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, fork_from: str | None = None
    ) -> None:
        """Validate and queue a request; n > 1 becomes n sequences sharing the prompt's KV.

        ``fork_from`` names an input stream whose KV the request's prompt starts with (a
        generation replying to streamed input): the prompt's tokens the stream has computed
        are shared, not computed again.
        """
        self.validate(prompt_token_ids, params)
        if params.max_tokens is None:
            params = _with_max_tokens(params, self.max_model_len - len(prompt_token_ids))
        session_id, session_ttl, cache_salt = request_options(params)
        stream = self.scheduler.requests.get(fork_from or "")
        if stream is not None and stream.input_only and stream.input_closed:
            # A reply to a closed stream does not wait for the stream's prefill to finish:
            # it shares what is computed and computes the rest within its own prompt, so
            # the stream stops where it is (its input is of use only to replies now).
            self.scheduler.update_input(stream.request_id, stream.num_computed_tokens, [])
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            self.scheduler.add_request(
                Request(
                    request_id=seq_id,
                    prompt_token_ids=list(prompt_token_ids),
                    sampling_params=params,
                    eos_token_ids=self.eos_token_ids,
                    index=i,
                    parent_id=request_id,
                    fork_from=f"{request_id}#0" if i > 0 else fork_from,
                    cache_salt=cache_salt,
                    session_id=session_id,
                    session_ttl=session_ttl,
                )
            )

    # ------------------------------------------------------------ input streams

    def add_input_stream(self, stream_id: str, token_ids: list[int], cache_salt: str | None = None) -> None:
        """Start reading a stream's input into KV (see engine/input_stream.py)."""
        self.check_stream_tokens(token_ids)
        self.scheduler.add_request(
            Request(
                request_id=stream_id,
                prompt_token_ids=list(token_ids),
                sampling_params=_INPUT_ONLY_PARAMS,
                input_closed=False,
                input_only=True,
                cache_salt=cache_salt,
            )
        )

    def update_input_stream(self, stream_id: str, keep: int, append: list[int], close: bool = False) -> None:
        """Keep the stream's first ``keep`` input tokens and append ``append`` (ValueError
        when the result would not leave room for a reply); ``close`` ends its input."""
        req = self.scheduler.requests.get(stream_id)
        if req is None or not req.input_only:
            raise ValueError(f"no open input stream {stream_id!r}")
        self.check_stream_tokens(req.all_token_ids[:keep] + append)
        self.scheduler.update_input(stream_id, keep, append, close)

    def input_stream_progress(self, stream_id: str) -> tuple[int, int]:
        """``(input tokens received, input tokens with KV)`` of an open stream."""
        req = self.scheduler.requests[stream_id]
        return req.num_tokens, req.num_computed_tokens

    def check_stream_tokens(self, token_ids: list[int]) -> None:
        """ValueError unless a stream may hold ``token_ids`` (vocabulary, context, KV)."""
        vocab = self.model_config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"input token id {bad} is outside the vocabulary [0, {vocab})")
        limit = min(self.max_model_len, self.scheduler.kv_capacity_tokens) - 1
        if len(token_ids) > limit:
            raise ValueError(
                f"the streamed input ({len(token_ids)} tokens) exceeds the {limit} tokens a stream may "
                f"hold (context length {self.max_model_len}, KV cache "
                f"{self.scheduler.kv_capacity_tokens} tokens, one token left for a reply)"
            )

    def sequence_ids(self, request_id: str, n: int) -> list[str]:
        """The scheduler ids of a request's sequences."""
        return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]

    def finish_sequence(self, seq_id: str, reason: FinishReason, stop_reason=None) -> None:
        """End one sequence now (abort, or a stop string matched by the frontend)."""
        self.scheduler.finish_request(seq_id, reason, stop_reason)

    def has_unfinished(self) -> bool:
        """True while requests are waiting or running."""
        return self.scheduler.has_unfinished()

    def has_pending_work(self) -> bool:
        """True while a step would do something (input streams waiting for input need none)."""
        return self.scheduler.has_pending_work()

    def close_session(self, session_id: str) -> bool:
        """Release a session's pinned KV now; False when the session is unknown."""
        return self.scheduler.close_session(session_id)

    def seconds_to_next_pin_expiry(self) -> float | None:
        """How long until a session pin expires (None without pins); idle loops wake then."""
        expiry = self.scheduler.next_pin_expiry()
        return None if expiry is None else max(0.0, expiry - self.scheduler.clock())

    def expire_sessions(self) -> int:
        """Release session pins whose TTL is over (steps do it too)."""
        return self.scheduler.expire_sessions()

    def step(self) -> list[EngineCoreOutput]:
        """One scheduling + model step; returns what each touched sequence produced."""
        sched = self.scheduler.schedule()
        self.last_step_was_empty = sched.is_empty
        if sched.is_empty:
            if sched.finished_request_ids:
                self.runner.execute(sched)
            return []
        result = self.runner.execute(sched)
        return self.scheduler.update(sched, result)

    def stats(self) -> EngineStats:
        """Current load of the engine."""
        kv = self.scheduler.kv
        pool, sessions = kv.pool, kv.sessions
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_free_blocks=pool.num_free_blocks,
            num_total_blocks=pool.num_blocks,
            kv_usage=pool.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queried_tokens=kv.num_queried_tokens,
            prefix_cache_hit_tokens=kv.num_hit_tokens,
            num_cached_blocks=kv.prefix_cache.num_cached_blocks,
            num_cache_evictions=pool.num_evictions,
            num_sessions=sessions.num_sessions,
            num_pinned_blocks=sessions.num_pinned_blocks,
            num_session_pins_expired=sessions.num_expired,
            num_session_pins_dropped=sessions.num_dropped,
            num_session_pins_closed=sessions.num_closed,
            num_input_streams=sum(r.input_only for r in self.scheduler.requests.values()),
            num_computed_tokens=self.scheduler.num_computed_tokens,
        )


# Input streams never sample; their params only satisfy the Request type.
_INPUT_ONLY_PARAMS = SamplingParams(max_tokens=1)


def request_options(params: SamplingParams) -> tuple[str | None, float | None, str | None]:
    """``(session_id, session_ttl, cache_salt)`` from ``params.extra``, checked.

    ``session_id`` (str) names a session whose KV stays pinned after the turn,
    ``session_ttl`` (seconds >= 0) overrides the engine's pin time for this turn, and
    ``cache_salt`` (str) keeps this request's KV apart from other salts (per tenant).
    """
    extra = params.extra or {}
    session_id, ttl, salt = extra.get("session_id"), extra.get("session_ttl"), extra.get("cache_salt")
    if session_id is not None and (not isinstance(session_id, str) or not session_id):
        raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0):
        raise ValueError(f"session_ttl must be a number of seconds >= 0, got {ttl!r}")
    if salt is not None and not isinstance(salt, str):
        raise ValueError(f"cache_salt must be a string, got {salt!r}")
    return session_id, None if ttl is None else float(ttl), salt or None


def _with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_tokens=max(max_tokens, max(1, params.min_tokens)))
