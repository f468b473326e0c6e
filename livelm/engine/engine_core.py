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
from livelm.runner.model_runner import ModelRunner
from livelm.sampling_params import SamplingParams

logger = logging.getLogger("livelm")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_ROPE_TABLE = 131072


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float
    num_preemptions: int


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
        self.model_config = ModelConfig.from_dir(model_dir)
        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings and mc.rope.rope_type == "default":
            logger.warning(
                "max_model_len %d exceeds the model's %d positions", self.max_model_len, mc.max_position_embeddings
            )
        t0 = time.perf_counter()
        model = load_model(model_dir, self.dtype, self.device, min(self.max_model_len, _MAX_ROPE_TABLE))
        logger.info("loaded %s (%s, %s) in %.1fs", model_dir, self.dtype, self.device, time.perf_counter() - t0)

        num_blocks = self._num_kv_blocks()
        self.cache_config = CacheConfig(config.block_size, num_blocks)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len),
            self.cache_config,
        )
        self.eos_token_ids = frozenset(mc.eos_token_ids)
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

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Validate and queue a request; n > 1 becomes n sequences sharing the prompt's KV."""
        self.validate(prompt_token_ids, params)
        if params.max_tokens is None:
            params = _with_max_tokens(params, self.max_model_len - len(prompt_token_ids))
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
                    fork_from=f"{request_id}#0" if i > 0 else None,
                )
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

    def step(self) -> list[EngineCoreOutput]:
        """One scheduling + model step; returns what each touched sequence produced."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if sched.finished_request_ids:
                self.runner.execute(sched)
            return []
        result = self.runner.execute(sched)
        return self.scheduler.update(sched, result)

    def stats(self) -> EngineStats:
        """Current load of the engine."""
        pool = self.scheduler.kv.pool
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_free_blocks=pool.num_free_blocks,
            num_total_blocks=pool.num_blocks,
            kv_usage=pool.usage,
            num_preemptions=self.scheduler.num_preemptions,
        )


def _with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_tokens=max(max_tokens, max(1, params.min_tokens)))
