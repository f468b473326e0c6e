"""The engine API that LLM and AsyncEngine share: one model, one scheduler, one step loop.

:class:`Engine` loads the model and its tokenizer, sizes the KV cache, turns prompts into
scheduler requests and each step's sequence updates into :class:`RequestOutput` deltas.
It is synchronous and not thread-safe: ``LLM`` drives it from the caller's thread,
``AsyncEngine`` from its engine thread only.

Its parts are public: ``scheduler`` (pure Python: requests, KV blocks, session pins)
and ``runner`` (the model). Callers use the scheduler directly for what is only
scheduling (pending work, closing or expiring sessions, ending an input stream); the
engine adds what needs the tokenizer, the model's limits or the callers' request states.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from livelm.config import CacheConfig, EngineConfig, SchedulerConfig
from livelm.core.kv_manager import blocks_needed
from livelm.core.kv_policy import FULL, KVPolicy
from livelm.core.request import FinishReason, Request, RequestStatus
from livelm.core.request_options import NO_OPTIONS, RequestOptions, check_priority
from livelm.core.scheduler import Scheduler, sliding_peak_tokens
from livelm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from livelm.core.scheduling_policy import DEFAULT_TENANT
from livelm.core.speculative.config import check_draft_model_given
from livelm.core.step_cost import StepCostModel
from livelm.core.token_ids import check_vocab_range
from livelm.engine.draft_setup import resolve_draft_model
from livelm.engine.fork import MAX_FORK_BRANCHES, Branch, ForkResult, ForkState, check_branches
from livelm.engine.request_state import RequestState
from livelm.engine.tokenizer import chat_prompt_ids, encode_prompt, load_tokenizer
from livelm.kernels.cpu_memory import keep_large_buffers_in_heap
from livelm.layers.attention.kv_format import check_kv_format, kv_format_name, kv_storage_dtype
from livelm.models.loader import load_model, use_int8_activations
from livelm.models.model_config import ModelConfig
from livelm.models.resolve import resolve_model_path
from livelm.models.rope import attention_factor
from livelm.models.tensor_parallel import check_tensor_parallel, shard_model
from livelm.models.weight_transfer import WeightReceiver
from livelm.models.weight_update import (
    StagedUpdate,
    WeightLayout,
    WeightSpec,
    check_mode,
    read_checkpoint,
    stage_update,
    tensor_items,
)
from livelm.outputs import RequestOutput
from livelm.runner.draft_model import DraftModelDrafter
from livelm.runner.kv_cache import default_cpu_kv_bytes
from livelm.runner.model_runner import ModelRunner
from livelm.runner.structured import GrammarBackend
from livelm.runner.tensor_parallel import TensorParallelError, TensorParallelWorkers, WorkerSpec
from livelm.sampling_params import SamplingParams, check_engine_limits
from livelm.structured_output import StructuredOutput

logger = logging.getLogger("livelm")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_ROPE_TABLE = 131072
# Rotary types whose rotation of a query/key pair depends only on their distance, which
# kv_policy "sinks" needs (positions by place in the cache; layers/attention/sinks.py).
SINKS_ROPE_TYPES = ("default", "linear", "llama3")
_CONFIG_FIELDS = {f.name for f in fields(EngineConfig)}


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
    # KV memory: blocks ever written (on CPU the cache is committed lazily, so these are
    # what it holds in memory) and the bytes of one block.
    num_touched_blocks: int = 0
    kv_block_bytes: int = 0
    # kv_policy "sinks" (docs/attention_sinks.md) and the requests of an all-sliding model
    # (Mistral ...): tokens whose blocks were rolled out of a window over the engine's
    # life; and, for sinks requests, the fill of the windows of those holding KV now
    # (tokens kept / (sinks + window), 0..1; 0 without such requests).
    num_evicted_tokens: int = 0
    kv_window_occupancy: float = 0.0
    # Liveness: unix time of the last completed step (0 before the first), and whether the
    # step loop still runs (AsyncEngine sets False once its engine thread stopped).
    last_step_time: float = 0.0
    engine_alive: bool = True
    # Latency targets (docs/scheduling.md): decode steps over their TPOT target, requests
    # whose first token missed its TTFT target, steps whose prefill the TPOT budget cut
    # (and those that ran only the minimum prefill), and the last step's predicted and
    # measured seconds (the cost model's fit).
    num_tpot_slo_misses: int = 0
    num_ttft_slo_misses: int = 0
    num_slo_capped_steps: int = 0
    num_slo_floor_steps: int = 0
    predicted_step_seconds: float = 0.0
    measured_step_seconds: float = 0.0
    # Speculative decoding (docs/speculative_decoding.md), over the engine's life:
    # verification steps with a draft, tokens drafted, drafted tokens accepted.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_draft_model_seconds: float = 0.0  # the draft model's forward passes (method "draft")
    # Load in tokens (what the data-parallel router balances, docs/distributed.md): input
    # tokens the waiting requests have yet to compute, and the context tokens of the
    # running ones (each decode step attends over them).
    num_waiting_tokens: int = 0
    num_running_tokens: int = 0

    @property
    def spec_acceptance_rate(self) -> float:
        """Drafted tokens accepted / drafted (0.0 before any draft)."""
        return self.spec_num_accepted_tokens / self.spec_num_draft_tokens if self.spec_num_draft_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens one verification step yields on average: 1 + accepted drafts per draft
        (0.0 before any draft)."""
        return 1.0 + self.spec_num_accepted_tokens / self.spec_num_drafts if self.spec_num_drafts else 0.0


def make_engine_config(model: str | None, kwargs: dict) -> EngineConfig:
    """EngineConfig from user keyword arguments, rejecting unknown ones by name."""
    unknown = set(kwargs) - _CONFIG_FIELDS
    if unknown:
        raise ValueError(f"unknown engine option(s) {sorted(unknown)}; valid: {sorted(_CONFIG_FIELDS)}")
    return EngineConfig(model=model, **kwargs)


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


def sequence_ids(request_id: str, n: int) -> list[str]:
    """The scheduler ids of a request's ``n`` sequences."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


class Engine:
    """Requests in, output deltas out: ``add``, then ``step`` until they finish."""

    # Every live engine, so tests can check after each test that no KV block leaked.
    live_instances: weakref.WeakSet[Engine] = weakref.WeakSet()

    def __init__(self, config: EngineConfig, served_name: str | None = None) -> None:
        self.config = config
        self.model_dir: Path = resolve_model_path(config.model)
        self.model_name = served_name or (config.model and Path(config.model).name) or self.model_dir.name
        self.tokenizer = load_tokenizer(self.model_dir)
        tp_size = config.tensor_parallel_size
        if config.num_threads:  # shared out between the tensor-parallel ranks
            torch.set_num_threads(max(1, config.num_threads // tp_size))
        torch.manual_seed(config.seed)
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        self.kv_dtype = kv_storage_dtype(config.kv_cache_dtype, self.dtype)  # the cache tensors' type
        if self.device.type == "cpu":
            keep_large_buffers_in_heap()
        self.model_config = mc = ModelConfig.from_dir(self.model_dir)
        check_kv_format(self.kv_dtype, mc.head_dim)  # before the weights load
        if tp_size > 1:  # before anything loads, too
            if self.device.type != "cpu":
                raise ValueError("tensor_parallel_size > 1 runs on CPU only so far (gloo); NCCL on CUDA is not built")
            check_tensor_parallel(mc, tp_size)
        # Speculative decoding's draft model (runner/draft_model.py): checked before anything loads.
        self.draft_dir: Path | None = None
        self.draft_model_config: ModelConfig | None = None
        if config.speculative_draft_model is not None:
            self.draft_dir, self.draft_model_config = resolve_draft_model(config.speculative_draft_model,
                                                                          self.tokenizer, mc)
            check_kv_format(self.kv_dtype, self.draft_model_config.head_dim)
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings and mc.rope.rope_type == "default":
            logger.warning(
                "max_model_len %d exceeds the model's %d positions", self.max_model_len, mc.max_position_embeddings
            )
        t0 = time.perf_counter()
        model = load_model(
            self.model_dir, self.dtype, self.device, min(self.max_model_len, _MAX_ROPE_TABLE), config.quantization,
            config.activation_quantization,
        )
        logger.info("loaded %s (%s, %s) in %.1fs", self.model_dir, self.dtype, self.device, time.perf_counter() - t0)
        draft_model = None
        if self.draft_dir is not None:
            t0 = time.perf_counter()
            draft_model = load_model(self.draft_dir, self.dtype, self.device, min(self.max_model_len, _MAX_ROPE_TABLE),
                                     config.quantization, config.activation_quantization)
            logger.info("loaded draft model %s in %.1fs", self.draft_dir, time.perf_counter() - t0)

        num_blocks = self._num_kv_blocks()
        self.cache_config = CacheConfig(
            config.block_size, num_blocks, config.enable_prefix_caching, config.session_ttl_s
        )
        self.eos_token_ids = frozenset(mc.eos_token_ids)
        # The draft model's own paged KV: as many token slots as the target's, in its own pool.
        self.draft: DraftModelDrafter | None = None
        if draft_model is not None:
            draft_runner = ModelRunner(draft_model, num_blocks, config.block_size, self.eos_token_ids,
                                       config.attention_backend, None, self.kv_dtype)
            self.draft = DraftModelDrafter(draft_runner, num_blocks, config.block_size)
            draft_gib = num_blocks * ModelRunner.kv_bytes_per_block(self.draft_model_config, config.block_size,
                                                                    self.kv_dtype) / 2**30
            logger.info("draft model KV cache: its own %d blocks (%.2f GiB)", num_blocks, draft_gib)
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len,
                policy=config.scheduling_policy, tpot_slo_ms=config.tpot_slo_ms, ttft_slo_ms=config.ttft_slo_ms,
                min_prefill_tokens=config.min_prefill_tokens, max_priority=config.max_priority,
            ),
            self.cache_config,
            speculative=config.speculative,
            drafter=self.draft,
            sliding_window=self._release_window(),
        )
        # Constrained decoding (docs/structured_output.md); its costly parts start on first use.
        self.structured = GrammarBackend(self.tokenizer, mc.vocab_size, self.eos_token_ids)
        self.tp_workers: TensorParallelWorkers | None = None
        if tp_size > 1:
            self.tp_workers = self._start_tensor_parallel(model, num_blocks)
        self.runner = ModelRunner(
            model, num_blocks, config.block_size, self.eos_token_ids, config.attention_backend, self.structured,
            self.kv_dtype, self.tp_workers,
        )
        # The TPOT budget's cost model, with the row counts where this host's kernels change.
        self.scheduler.step_cost = StepCostModel(breakpoints=self.runner.kernel_row_breakpoints())
        self.kv_block_bytes = ModelRunner.kv_bytes_per_block(self.model_config, config.block_size, self.kv_dtype)
        self._log_kv_cache(num_blocks)
        self.states: dict[str, RequestState] = {}  # requests in flight, by id
        self.last_step_was_empty = False  # nothing could be scheduled (waiting for KV, a fork)
        self.last_step_time = 0.0  # time.time() when the last step completed
        # Input streams a step failed and ended (no caller-side state): (id, error), for
        # their owner (AsyncEngine) to take and close.
        self.failed_streams: list[tuple[str, Exception]] = []
        self._ids = itertools.count()
        # RL serving (docs/rl.md): the version of the weights in use (0: as loaded; each
        # update adds one), the accepted tensor layout (built on first use) and the update
        # group a trainer sends weights over (join_update_group).
        self.weight_version = 0
        self._weight_layout: WeightLayout | None = None
        self.update_receiver: WeightReceiver | None = None
        self.forks: dict[str, ForkState] = {}  # open forks, by parent request id
        Engine.live_instances.add(self)  # last: an engine that failed to build is not live

    def _start_tensor_parallel(self, model, num_blocks: int) -> TensorParallelWorkers:
        """Start ranks 1..N-1 (each loads the model and keeps its share), keep rank 0's
        share of ``model`` here, and wait until every rank is ready."""
        config = self.config
        spec = WorkerSpec(str(self.model_dir), self.dtype, min(self.max_model_len, _MAX_ROPE_TABLE),
                          config.quantization, num_blocks, config.block_size, config.attention_backend,
                          self.kv_dtype, torch.get_num_threads(), logger.getEffectiveLevel(),
                          config.activation_quantization)
        workers = TensorParallelWorkers(config.tensor_parallel_size, spec)
        try:
            shard_model(model, workers.group)
            if config.activation_quantization == "int8":  # the shards are new modules
                use_int8_activations(model)
            workers.wait_ready()
        except BaseException:
            workers.close()
            raise
        # Workers are daemon processes (they end with this one); close() stops them sooner.
        weakref.finalize(self, workers.close)
        logger.info("tensor parallel: %d ranks (worker pids %s), %d threads each", config.tensor_parallel_size,
                    workers.pids, torch.get_num_threads())
        return workers

    def close(self) -> None:
        """Stop this engine's tensor-parallel worker processes, if any (idempotent); the
        engine cannot step afterwards."""
        if self.tp_workers is not None:
            self.tp_workers.close()
            self.tp_workers.dead = "the engine was closed"

    def _release_window(self) -> int | None:
        """The window by which KV leaves every layer (ModelConfig.sliding_window when all
        layers slide and it is shorter than the context), None when nothing is released: a
        global layer still reads every key."""
        mc = self.model_config
        window = mc.sliding_window
        if not mc.all_layers_slide or window is None or window >= self.max_model_len:
            return None
        return window

    def _num_kv_blocks(self) -> int:
        """Blocks in the KV pool: ``num_kv_blocks`` when given; else what ``kv_cache_gib``
        holds (CPU) or ``gpu_memory_utilization`` of the free memory (CUDA); by default on
        CPU, what ``max_num_seqs`` full contexts could use, capped at a share of the memory
        available now (runner/kv_cache.py). Never more than those full contexts need."""
        cfg = self.config
        if cfg.num_kv_blocks:
            return cfg.num_kv_blocks
        per_block = ModelRunner.kv_bytes_per_block(self.model_config, cfg.block_size, self.kv_dtype)
        if self.draft_model_config is not None:  # the draft pool has as many blocks
            per_block += ModelRunner.kv_bytes_per_block(self.draft_model_config, cfg.block_size, self.kv_dtype)
        useful = cfg.max_num_seqs * blocks_needed(self.max_model_len, cfg.block_size)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * cfg.gpu_memory_utilization
        elif cfg.kv_cache_gib is not None:
            budget = cfg.kv_cache_gib * 2**30
        else:
            budget = default_cpu_kv_bytes(useful * per_block)
        return max(1, min(int(budget // per_block), useful))

    def _log_kv_cache(self, num_blocks: int) -> None:
        cfg = self.config
        tokens = num_blocks * cfg.block_size
        gib = num_blocks * self.kv_block_bytes / 2**30
        contexts = tokens / self.max_model_len
        lazily = ", reserved lazily (memory is used as blocks fill)" if self.device.type == "cpu" else ""
        logger.info("KV cache: %d tokens (%d blocks of %d, %.2f GiB %s%s): %.1f full %d-token contexts",
                    tokens, num_blocks, cfg.block_size, gib, kv_format_name(self.kv_dtype), lazily,
                    contexts, self.max_model_len)

    # ----------------------------------------------------------------- prompts

    def new_request_id(self) -> str:
        """A request id unique within this engine."""
        return f"req-{next(self._ids)}"

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """Token ids for a text or token-id prompt."""
        return encode_prompt(self.tokenizer, prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation rendered through the chat template."""
        return chat_prompt_ids(self.tokenizer, messages)

    # ---------------------------------------------------------------- requests

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, options: RequestOptions) -> None:
        """Raise ValueError (saying what to fix) for a request the engine cannot serve."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty: give at least one token")
        check_vocab_range(prompt_token_ids, self.model_config.vocab_size, "prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else 1
        rolling = options.kv_policy.is_sinks
        if rolling:  # a rolling window: any length fits, in bounded KV (core/kv_policy.py)
            self.check_kv_policy(options.kv_policy)
        if not rolling and n + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds the "
                f"context length of {self.max_model_len} tokens: shorten the prompt or lower max_tokens"
            )
        capacity = self.scheduler.kv_capacity_tokens
        need = n + max_tokens
        window = self.scheduler.kv.sliding_window
        if window is not None:  # every layer slides: a request holds about two windows at most
            need = min(need, sliding_peak_tokens(window, self.config.block_size))
        if not rolling and need > capacity:
            raise ValueError(
                f"prompt + max_tokens = {n + max_tokens} tokens cannot fit in the KV cache "
                f"({capacity} tokens): raise kv_cache_gib or lower max_tokens"
            )
        if options.session_id is not None and params.n > 1:
            raise ValueError("a session turn must have n == 1 (which sequence would the next turn continue?)")
        if options.priority is not None:
            check_priority(options.priority, self.config.max_priority)
        check_draft_model_given(options.speculative_method, self.config.speculative_draft_model)
        if not rolling and params.max_tokens is None and n + params.min_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) + min_tokens ({params.min_tokens}) exceeds the context length "
                f"of {self.max_model_len} tokens: lower min_tokens"
            )
        # Stop ids may name any token of the model's or the tokenizer's vocabulary.
        check_engine_limits(params, max_n=self.config.max_n, max_num_seqs=self.config.max_num_seqs,
                            vocab_size=max(self.model_config.vocab_size, len(self.tokenizer)))
        self.check_structured(params.structured)

    def check_kv_policy(self, policy: KVPolicy) -> None:
        """ValueError unless this engine can serve ``policy`` (core/kv_policy.py): a window of
        at least a block and at most the context, a rotary type whose rotation depends on
        the distance between positions only, and a pool that holds the request's peak."""
        if not policy.is_sinks:
            return
        window = self.model_config.sliding_window
        if window is not None and window < self.max_model_len:
            # The sinks path (layers/attention/sinks.py) attends over sinks + its own window
            # with cache positions, which a sliding layer's window would cut differently (a
            # window as long as the context never cuts: Phi-3-128k's, say).
            raise ValueError(
                f"kv_policy 'sinks' cannot run on this model: its layers attend over a sliding window "
                f"of {window} tokens, which the sinks attention path does not apply; use kv_policy 'full'"
            )
        cfg = self.model_config
        if cfg.attn_softcap is not None or cfg.local_rope is not None:
            # The sinks path neither soft-caps scores nor rotates layers by their own tables.
            raise ValueError(
                f"kv_policy 'sinks' cannot run on {cfg.architecture}: its attention "
                f"{'soft-caps scores' if cfg.attn_softcap is not None else 'rotates sliding layers by their own rotary'}, "
                f"which the sinks attention path does not apply; use kv_policy 'full'"
            )
        bs = self.config.block_size
        if policy.window < bs:
            raise ValueError(f"kv_window ({policy.window}) must be at least one KV block ({bs} tokens)")
        if policy.num_sink_tokens + policy.window > self.max_model_len:
            raise ValueError(
                f"kv_window + num_sink_tokens = {policy.num_sink_tokens + policy.window} exceeds the "
                f"context length of {self.max_model_len} tokens: lower kv_window"
            )
        rope = self.model_config.rope
        if rope.rope_type not in SINKS_ROPE_TYPES or attention_factor(rope) != 1.0:
            raise ValueError(
                f"kv_policy 'sinks' needs a rotary embedding that depends on relative positions only "
                f"({', '.join(SINKS_ROPE_TYPES)}, no attention factor); this model's is {rope.rope_type!r}"
            )
        peak = blocks_needed(policy.num_sink_tokens, bs) + blocks_needed(3 * policy.window, bs) + 3
        if peak > self.cache_config.num_blocks:
            raise ValueError(
                f"kv_window {policy.window} needs up to {peak} KV blocks at once, the KV cache has "
                f"{self.cache_config.num_blocks}: lower kv_window or raise kv_cache_gib"
            )

    def check_structured(self, structured: StructuredOutput | None) -> None:
        """ValueError (llguidance's message) unless ``structured`` compiles for this model.
        Compiled grammars are cached, so the step that first samples the request finds it
        ready; thread-safe (``AsyncEngine.check_structured`` calls it from any thread)."""
        if structured is not None:
            self.structured.compile(structured)

    def add(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
        fork_from: str | None = None,
        options: RequestOptions = NO_OPTIONS,
    ) -> RequestState:
        """Tokenize (unless ``prompt_token_ids`` are given), validate and queue one request.

        ``options`` are its session and cache salt (parsed by the caller: the public APIs
        read them from ``SamplingParams.extra``). n > 1 becomes n sequences sharing the
        prompt's KV. ``fork_from`` names an input stream whose KV the prompt starts with (a
        reply to streamed input): the prompt's tokens the stream has computed are shared.
        """
        arrival = time.perf_counter()
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str) and not prompt:
            raise ValueError("the prompt is empty: give at least one character")
        ids = prompt_token_ids if prompt_token_ids is not None else self.prompt_ids(prompt)
        self.validate(ids, params, options)
        queued = params
        if params.max_tokens is None:
            # A sinks request is not bounded by the context: a context's worth by default.
            room = self.max_model_len if options.kv_policy.is_sinks else self.max_model_len - len(ids)
            queued = replace(params, max_tokens=max(room, max(1, params.min_tokens)))
        stream = self.scheduler.requests.get(fork_from or "")
        if stream is not None and stream.input_only and stream.input_closed:
            # A reply to a closed stream does not wait for the stream's prefill to finish:
            # it shares what is computed and computes the rest within its own prompt, so
            # the stream stops where it is (its input is of use only to replies now).
            self.scheduler.update_input(stream.request_id, stream.num_computed_tokens, [])
        for i, seq_id in enumerate(sequence_ids(request_id, params.n)):
            self.scheduler.add_request(
                Request(
                    request_id=seq_id,
                    prompt_token_ids=list(ids),
                    sampling_params=queued,
                    eos_token_ids=self.eos_token_ids,
                    index=i,
                    parent_id=request_id,
                    fork_from=f"{request_id}#0" if i > 0 else fork_from,
                    cache_salt=options.cache_salt,
                    session_id=options.session_id,
                    session_ttl=options.session_ttl,
                    priority=options.priority or 0,
                    tenant=options.tenant or DEFAULT_TENANT,
                    ttft_slo=None if options.ttft_slo_ms is None else options.ttft_slo_ms / 1000,
                    tpot_slo=None if options.tpot_slo_ms is None else options.tpot_slo_ms / 1000,
                    kv_policy=options.kv_policy,
                    speculative_method=options.speculative_method,
                    num_speculative_tokens=options.num_speculative_tokens,
                )
            )
        state = RequestState(request_id, prompt if isinstance(prompt, str) else None, ids, params, self.tokenizer, arrival)
        self.states[request_id] = state
        return state

    def step(self) -> list[tuple[RequestState, RequestOutput]]:
        """Run one scheduling + model step; returns (request, delta output) for each
        request that moved.

        A request the step cannot serve (a seed the generator refuses, logits that are not
        finite, a failure of the model step that only its chunk causes, a failure turning
        its tokens into text) ends alone: its last delta has ``finish_reason="error"`` and
        ``state.error`` says why; the others go on as if it had not been there. Isolation
        costs nothing until something fails. What no request can be blamed for raises.
        """
        started = time.perf_counter()
        sched = self.scheduler.schedule()
        self.last_step_was_empty = sched.is_empty
        if sched.is_empty:
            if sched.finished_request_ids:
                self.runner.execute(sched)  # lets the runner drop their state
            return []
        isolated = False
        try:
            ran = self.runner.execute(sched)
        except TensorParallelError:
            raise  # a rank is gone: no request is to blame, and none can be served
        except Exception as e:
            ran, isolated = self._isolate(sched, e), True
        moved = self._fail_sequences(ran.failed) if ran.failed else []
        updates = self.scheduler.update(sched, ran)
        deltas: dict[str, list] = {}
        for out in updates:
            state = self.states.get(out.parent_id)
            if state is None:
                continue
            try:
                result = state.process(out, self.weight_version)
            except Exception as e:
                logger.exception("request %s failed turning its output into text", out.parent_id)
                deltas.pop(out.parent_id, None)
                moved.append(self.fail(out.parent_id, RuntimeError(f"the output could not be decoded: {e!r}")))
                continue
            if result.stop_matched is not None:
                seq = state.seqs[out.index]
                self.scheduler.finish_request(result.stop_matched, FinishReason.STOP, seq.stop_reason)
            if result.delta is not None:
                deltas.setdefault(out.parent_id, []).append(result.delta)
        for rid, ds in deltas.items():
            state = self.states[rid]
            moved.append((state, state.delta_output(ds)))
            if state.finished:
                del self.states[rid]
        if not isolated:  # the step as a whole: what the TPOT budget's cost model learns from
            self.scheduler.observe_step(sched, time.perf_counter() - started)
        self.last_step_time = time.time()
        return moved

    def _isolate(self, sched: SchedulerOutput, error: Exception) -> ModelRunnerOutput:
        """The runner failed the whole step: run each chunk alone to find the requests that
        cause it (they end; the rest get their results). Only on failure."""
        logger.warning(
            "engine step failed (%s: %s); running its %d chunk(s) one by one to find the cause",
            type(error).__name__, error, len(sched.chunks), exc_info=error,
        )
        ran = self.runner.execute_each(sched)
        if len(sched.chunks) > 1 and len(ran.failed) == len(sched.chunks):
            logger.error("every request of the failed step fails alone too: ending them all")
        return ran

    def _fail_sequences(self, failed: dict[str, Exception]) -> list[tuple[RequestState, RequestOutput]]:
        """End the requests (all their sequences) and input streams the runner could not serve."""
        moved = []
        for seq_id, error in failed.items():
            req = self.scheduler.requests.get(seq_id)
            parent = (req.parent_id or seq_id) if req is not None else seq_id
            logger.error("request %s failed: %s: %s", parent, type(error).__name__, error)
            if parent in self.states:
                moved.append(self.fail(parent, error))
            elif req is not None and req.input_only:
                self.scheduler.finish_request(seq_id)
                self.failed_streams.append((seq_id, error))
        return moved

    def fail(self, request_id: str, error: Exception) -> tuple[RequestState, RequestOutput] | None:
        """End a request with an error (``finish_reason="error"``, ``state.error``) and free
        its KV; returns its state and final delta, if it existed."""
        self.forks.pop(request_id, None)
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        for seq_id in sequence_ids(request_id, state.params.n):
            self.scheduler.finish_request(seq_id, FinishReason.ABORT)
        return state, state.delta_output(state.fail(error))

    def abort(self, request_id: str, stop_reason: str | None = None) -> RequestOutput | None:
        """Stop a request and free its KV; returns its final (aborted) delta, if it existed.
        ``stop_reason`` says why when the caller did not ask for it (``"weight_update"``).
        A forked parent's fork is dropped (its branches go on as requests of their own)."""
        self.forks.pop(request_id, None)
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        for seq_id in sequence_ids(request_id, state.params.n):
            self.scheduler.finish_request(seq_id, FinishReason.ABORT)
        return state.delta_output(state.abort(stop_reason))

    # --------------------------------------------------------------- fork/join

    def fork(self, request_id: str, branches: list[Branch], branch_ids: list[str] | None = None) -> ForkResult:
        """Fork a running request into branches at its current position (docs/rl.md).

        Every branch is a request of its own (ids ``branch_ids``, default
        ``<id>.<fork>.<i>``) whose prompt is the parent's tokens so far plus its suffix; it
        starts on the parent's KV (full blocks shared, the partial one copied: nothing is
        recomputed) and decodes in the same batches as everything else. The parent is
        suspended until :meth:`join`. ValueError (nothing changed) for a request that is
        not running (unknown, finished, forked already), ``n > 1``, a branch count out of
        range, or a branch the engine could not serve.
        """
        state = self.states.get(request_id)
        req = self.scheduler.requests.get(request_id)
        if state is None or req is None or req.is_finished:
            raise ValueError(f"request {request_id!r} is not running: only a running request can fork")
        if state.params.n != 1:
            raise ValueError("only a request with n == 1 can fork")
        if request_id in self.forks:
            raise ValueError(f"request {request_id!r} has forked already: join it first")
        branches = check_branches(branches, min(MAX_FORK_BRANCHES, self.config.max_num_seqs))
        if branch_ids is None:
            branch_ids = [f"{request_id}.{next(self._ids)}.{i}" for i in range(len(branches))]
        if len(branch_ids) != len(branches) or len(set(branch_ids)) != len(branches) or not all(
            isinstance(b, str) and b for b in branch_ids
        ):
            raise ValueError("branch_ids must be distinct non-empty strings, one per branch")
        context = list(req.all_token_ids)
        children, suffixes, states = [], {}, {}
        for bid, branch in zip(branch_ids, branches, strict=True):
            if bid in self.states or bid in self.scheduler.requests:
                raise ValueError(f"request id {bid!r} is already in use")
            suffix = self.prompt_ids(branch.suffix) if branch.suffix else []
            ids = context + suffix
            self.validate(ids, branch.params, NO_OPTIONS)
            params = branch.params
            if params.max_tokens is None:
                params = replace(params, max_tokens=max(self.max_model_len - len(ids), max(1, params.min_tokens)))
            children.append(Request(request_id=bid, prompt_token_ids=ids, sampling_params=params,
                                    eos_token_ids=self.eos_token_ids, parent_id=bid, cache_salt=req.cache_salt))
            suffixes[bid] = suffix
            text = branch.suffix if isinstance(branch.suffix, str) else None
            states[bid] = RequestState(bid, text, ids, branch.params, self.tokenizer)
        copies = self.scheduler.fork(request_id, children)
        if copies:
            self.runner.copy_blocks(copies)
        self.states.update(states)
        self.forks[request_id] = ForkState(request_id, context, list(branch_ids), suffixes, states)
        return ForkResult(context, list(branch_ids))

    def join(
        self,
        request_id: str,
        branch_ids: list[str] | None = None,
        separator: str | list[int] = "",
        prefix: str | list[int] = "",
        suffix: str | list[int] = "",
        include_branch_prompts: bool = True,
    ) -> tuple[list[int], list[tuple[RequestState, RequestOutput]]]:
        """Resume a forked request with its branches' tokens appended to its context:
        ``prefix``, then for each branch in ``branch_ids`` order (default: all, in fork
        order) its suffix prompt (unless ``include_branch_prompts`` is False) and its output
        tokens, ``separator`` between two branches, then ``suffix``. A branch still running
        is aborted first (its output so far counts). Only the appended tokens are computed.
        Returns the appended token ids and the aborted branches' final deltas."""
        fork = self.forks.get(request_id)
        if fork is None:
            raise ValueError(f"request {request_id!r} has not forked: nothing to join")
        order = fork.branch_ids if branch_ids is None else branch_ids
        if not isinstance(order, list | tuple) or len(set(order)) != len(order) or not all(
            b in fork.states for b in order
        ):
            raise ValueError(f"branch_ids must be distinct branches of this fork: {fork.branch_ids}")
        if not isinstance(include_branch_prompts, bool):
            raise ValueError("include_branch_prompts must be a boolean")
        pieces = [self._join_piece(p, name) for p, name in ((separator, "separator"), (prefix, "prefix"),
                                                            (suffix, "suffix"))]
        sep, head, tail = pieces
        appended = list(head)
        for i, bid in enumerate(order):
            if i:
                appended += sep
            if include_branch_prompts:
                appended += fork.suffixes[bid]
            appended += fork.states[bid].seqs[0].token_ids
        appended += tail
        req = self.scheduler.suspended[request_id]
        total = req.num_tokens + len(appended) + 1
        limit = min(self.max_model_len, self.scheduler.kv_capacity_tokens)
        if total > limit:
            raise ValueError(f"the joined context ({total} tokens) exceeds the {limit} tokens the engine can hold")
        check_vocab_range(appended, self.model_config.vocab_size, "join")
        moved = []
        for bid in order:
            if bid in self.states:
                state = self.states[bid]
                out = self.abort(bid)
                if out is not None:
                    moved.append((state, out))
        del self.forks[request_id]
        self.scheduler.join(request_id, appended)
        self.states[request_id].add_context(appended)
        return appended, moved

    def _join_piece(self, piece: object, name: str) -> list[int]:
        if isinstance(piece, str):
            return self.prompt_ids(piece) if piece else []
        if isinstance(piece, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in piece):
            return list(piece)
        raise ValueError(f"{name} must be text or a list of token ids")

    # ---------------------------------------------------------- weight updates

    @property
    def weight_layout(self) -> WeightLayout:
        """The tensor names and shapes an update may carry."""
        if self._weight_layout is None:
            self._weight_layout = WeightLayout(self.runner.model)
        return self._weight_layout

    def stage_weights(self, weights: str | Path | Mapping | Iterable) -> StagedUpdate:
        """Read and check new weights, built beside the live ones (nothing changes yet):
        ``weights`` is a path (model directory, ``.safetensors`` or ``.gguf`` file of the
        same architecture) or a name -> tensor mapping (any subset of the checkpoint's
        tensors). ValueError, naming the tensor, for anything that does not fit. Safe to
        call from another thread while the engine steps (it only reads the live model)."""
        self._check_updatable()
        if isinstance(weights, str | Path):
            items: Iterable = read_checkpoint(weights)
        else:
            items = tensor_items(weights)
        return stage_update(self.runner.model, items, self.weight_layout)

    def _check_updatable(self) -> None:
        if self.config.tensor_parallel_size > 1:
            raise ValueError("weight updates are not supported with tensor_parallel_size > 1 (each rank holds "
                             "a shard); serve RL rollouts with tensor_parallel_size=1")

    def join_update_group(self, host: str, port: int, rank: int = 1, world_size: int = 2,
                          backend: str = "gloo", timeout_s: float = 600.0) -> None:
        """Join a trainer's update group (blocks until all its ranks joined; see
        models/weight_transfer.py). Replaces a group joined before."""
        self._check_updatable()
        if self.update_receiver is not None:
            self.update_receiver.close()
            self.update_receiver = None
        self.update_receiver = WeightReceiver(host, port, rank, world_size, backend, timeout_s)

    def receive_weights(self) -> StagedUpdate:
        """Receive one update from the trainer of the update group and stage it; the header
        is checked before any tensor is received (a refusal raises ValueError here and in
        the trainer). Safe from another thread, like :meth:`stage_weights`."""
        if self.update_receiver is None:
            raise ValueError("no update group joined: call join_update_group first")
        layout = self.weight_layout

        def check(specs: list[WeightSpec]) -> None:
            for spec in specs:
                layout.check_spec(spec)

        return stage_update(self.runner.model, self.update_receiver.receive(check), layout)

    def apply_weights(self, staged: StagedUpdate, mode: str = "continue") -> list[tuple[RequestState, RequestOutput]]:
        """Swap staged weights in (between steps) and bump :attr:`weight_version`.

        ``mode`` says what happens to requests in flight: ``"abort"`` ends every started
        one (``finish_reason="abort"``, ``stop_reason="weight_update"``); ``"continue"``
        and ``"wait"`` (whose caller let them finish first) recompute the KV of every
        request holding some with the new weights. Cached prefixes and session pins are
        dropped either way: no KV of the old weights is ever reused. Returns the aborted
        requests' final deltas.
        """
        check_mode(mode)
        moved: list[tuple[RequestState, RequestOutput]] = []
        if mode == "abort":
            started = {r.parent_id or r.request_id for r in self.scheduler.requests.values()
                       if not r.input_only and (r.block_ids or r.output_token_ids or r.num_preemptions)}
            for rid in [rid for rid in self.states if rid in started]:
                state = self.states[rid]
                out = self.abort(rid, "weight_update")
                if out is not None:
                    moved.append((state, out))
        self.runner.load_weights(staged)
        self.weight_version += 1
        self.scheduler.recompute_all()
        logger.info("weights updated to version %d (%d tensors, mode %s)",
                    self.weight_version, staged.num_tensors, mode)
        return moved

    def update_weights(self, weights: str | Path | Mapping | Iterable, mode: str = "continue") -> int:
        """Stage and apply new weights at once (the synchronous API: ``LLM``, tests);
        ``"wait"`` steps the requests in flight to their end first (their outputs are
        dropped: use AsyncEngine to receive them). Returns the new weight version."""
        check_mode(mode)
        staged = self.stage_weights(weights)
        if mode == "wait":
            self.scheduler.hold_new_requests = True
            try:
                while self.scheduler.has_started_requests():
                    self.step()
            finally:
                self.scheduler.hold_new_requests = False
        self.apply_weights(staged, mode)
        return self.weight_version

    # ------------------------------------------------------------ input streams

    def open_input_stream(self, stream_id: str, cache_salt: str | None = None, kv_policy: KVPolicy = FULL) -> None:
        """Start reading a stream's input into KV (see engine/input_stream.py); it is freed
        by ``scheduler.finish_request(stream_id)``. Under ``kv_policy`` "sinks" the stream
        never ends: old input rolls out of its window (docs/attention_sinks.md)."""
        self.check_kv_policy(kv_policy)
        self.scheduler.add_request(Request.input_stream(stream_id, [], cache_salt, kv_policy))

    def update_input_stream(self, stream_id: str, keep: int, append: list[int], close: bool = False) -> None:
        """Keep the stream's first ``keep`` input tokens and append ``append`` (ValueError
        when the result would not leave room for a reply); ``close`` ends its input."""
        req = self.scheduler.requests.get(stream_id)
        if req is None or not req.input_only:
            raise ValueError(f"no open input stream {stream_id!r}")
        self.check_stream_input(req.all_token_ids[:keep] + append, req.kv_policy)
        self.scheduler.update_input(stream_id, keep, append, close)

    def check_stream_input(self, token_ids: list[int], kv_policy: KVPolicy = FULL) -> None:
        """ValueError unless a stream may hold ``token_ids`` (vocabulary, context, KV; a
        ``sinks`` stream any length)."""
        check_vocab_range(token_ids, self.model_config.vocab_size, "input")
        if kv_policy.is_sinks:
            return
        capacity = self.scheduler.kv_capacity_tokens
        limit = min(self.max_model_len, capacity) - 1
        if len(token_ids) > limit:
            raise ValueError(
                f"the streamed input ({len(token_ids)} tokens) exceeds the {limit} tokens a stream may "
                f"hold (context length {self.max_model_len}, KV cache {capacity} tokens, one token "
                "left for a reply)"
            )

    def input_stream_progress(self, stream_id: str) -> int:
        """Input tokens of an open stream that have KV."""
        return self.scheduler.requests[stream_id].num_computed_tokens

    # -------------------------------------------------------------------- load

    def _window_occupancy(self) -> float:
        """Tokens the running sinks requests keep over what their windows may hold."""
        kept = capacity = 0
        for req in self.scheduler.running:
            if req.rolling:
                policy, computed = req.kv_policy, req.num_computed_tokens
                kept += min(computed, policy.num_sink_tokens) + min(max(0, computed - policy.num_sink_tokens),
                                                                    policy.window)
                capacity += policy.num_sink_tokens + policy.window
        return kept / capacity if capacity else 0.0

    def stats(self) -> EngineStats:
        """Current load of the engine."""
        s = self.scheduler.stats()
        kv = s.kv
        running = s.num_running
        if s.num_input_streams:  # an input stream waiting for input is not running
            running -= sum(r.status is RequestStatus.WAITING_FOR_INPUT for r in self.scheduler.running)
        return EngineStats(
            num_running=running,
            num_waiting=s.num_waiting,
            num_free_blocks=kv.num_free_blocks,
            num_total_blocks=kv.num_total_blocks,
            kv_usage=kv.kv_usage,
            num_preemptions=s.num_preemptions,
            prefix_cache_queried_tokens=kv.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=kv.prefix_cache_hit_tokens,
            num_cached_blocks=kv.num_cached_blocks,
            num_cache_evictions=kv.num_cache_evictions,
            num_sessions=kv.num_sessions,
            num_pinned_blocks=kv.num_pinned_blocks,
            num_session_pins_expired=kv.num_session_pins_expired,
            num_session_pins_dropped=kv.num_session_pins_dropped,
            num_session_pins_closed=kv.num_session_pins_closed,
            num_input_streams=s.num_input_streams,
            num_computed_tokens=s.num_computed_tokens,
            num_touched_blocks=kv.num_touched_blocks,
            kv_block_bytes=self.kv_block_bytes,
            num_evicted_tokens=kv.num_evicted_tokens,
            kv_window_occupancy=self._window_occupancy(),
            last_step_time=self.last_step_time,
            num_tpot_slo_misses=s.slo.num_tpot_misses,
            num_ttft_slo_misses=s.slo.num_ttft_misses,
            num_slo_capped_steps=s.slo.num_capped_steps,
            num_slo_floor_steps=s.slo.num_floor_steps,
            predicted_step_seconds=s.slo.predicted_step_s,
            measured_step_seconds=s.slo.measured_step_s,
            spec_num_drafts=s.spec.num_drafts,
            spec_num_draft_tokens=s.spec.num_draft_tokens,
            spec_num_accepted_tokens=s.spec.num_accepted_tokens,
            spec_draft_model_seconds=s.spec.draft_model_seconds,
            num_waiting_tokens=sum(r.num_tokens - r.num_computed_tokens for r in self.scheduler.waiting),
            num_running_tokens=sum(r.num_tokens for r in self.scheduler.running),
        )
