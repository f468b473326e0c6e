"""Engine configuration: frozen dataclasses, validated at construction (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from livelm.core.request_options import MAX_SESSION_TTL_S, PRIORITY_LIMIT, check_slo_ms
from livelm.core.scheduling_policy import SCHEDULING_POLICIES
from livelm.core.speculative.config import SpeculativeConfig

# Values of EngineConfig.quantization (the formats are those of livelm.quant.formats).
QUANTIZATION_CHOICES: tuple[str, ...] = ("auto", "none", "q8_0", "q4_0", "q4_1", "int8", "q5_0", "q5_1")
# Values of EngineConfig.activation_quantization (livelm/quant/int8_activations.py).
ACTIVATION_QUANTIZATION_CHOICES: tuple[str, ...] = ("none", "int8")
# Values of EngineConfig.kv_cache_dtype: auto is the model's dtype (float32 on CPU).
KV_CACHE_DTYPE_CHOICES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16", "q8_0", "fp8")
# Values of EngineConfig.attention_backend (the backends of livelm.layers.attention, and auto).
ATTENTION_BACKEND_CHOICES: tuple[str, ...] = ("auto", "cpu", "torch")


def check_scheduling(policy: str, tpot_slo_ms: float | None, ttft_slo_ms: float | None,
                     min_prefill_tokens: int, max_priority: int) -> None:
    """ValueError saying what to fix in the scheduling options (shared by EngineConfig and
    SchedulerConfig)."""
    if policy not in SCHEDULING_POLICIES:
        raise ValueError(f"unknown scheduling_policy {policy!r}; choose one of {', '.join(SCHEDULING_POLICIES)}")
    check_slo_ms("tpot_slo_ms", tpot_slo_ms)
    check_slo_ms("ttft_slo_ms", ttft_slo_ms)
    if isinstance(min_prefill_tokens, bool) or not isinstance(min_prefill_tokens, int) or min_prefill_tokens < 1:
        raise ValueError(f"min_prefill_tokens must be an integer >= 1, got {min_prefill_tokens!r}")
    if isinstance(max_priority, bool) or not isinstance(max_priority, int) or not 0 <= max_priority <= PRIORITY_LIMIT:
        raise ValueError(f"max_priority must be an integer from 0 to {PRIORITY_LIMIT}, got {max_priority!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """How much work one engine step may do.

    ``max_num_batched_tokens`` is the one token budget per step shared by decodes and prefill
    chunks; ``max_num_seqs`` caps how many requests run at once. ``policy`` orders the work
    (core/scheduling_policy.py); ``tpot_slo_ms`` sizes each step's prefill so that running
    decodes keep that time per output token (at least ``min_prefill_tokens`` of prefill per
    step still run); ``ttft_slo_ms`` is the default TTFT target (the deadline policy orders
    by it; misses are counted); priorities lie in [-max_priority, max_priority].
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int = 2048
    policy: str = "fcfs"
    tpot_slo_ms: float | None = None
    ttft_slo_ms: float | None = None
    min_prefill_tokens: int = 8
    max_priority: int = 10

    def __post_init__(self) -> None:
        check_scheduling(self.policy, self.tpot_slo_ms, self.ttft_slo_ms, self.min_prefill_tokens, self.max_priority)
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry (``num_blocks`` blocks of ``block_size`` token slots) and
    what outlives a request: the prefix cache, and session pins (``session_ttl_s`` seconds
    after a session's turn, unless the request says otherwise)."""

    block_size: int = 16
    num_blocks: int = 0
    enable_prefix_caching: bool = True
    session_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")
        if not 0 <= self.session_ttl_s <= MAX_SESSION_TTL_S:  # also refuses NaN
            raise ValueError(f"session_ttl_s must be in [0, {MAX_SESSION_TTL_S:g}] seconds, got {self.session_ttl_s}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes one engine instance (what the LLM/AsyncEngine kwargs set).

    ``model`` is a local Hugging Face directory, a ``.gguf`` file, a hub id, or None for
    the embedded default model. ``max_model_len=None`` takes the model's own context
    length. KV memory is ``kv_cache_gib`` GiB on CPU (None, the default: what
    ``max_num_seqs`` full contexts could use, capped at 40% of the memory available at
    start-up, and committed lazily as blocks fill), or ``gpu_memory_utilization`` of the
    free device memory on CUDA; the pool is never made larger than ``max_num_seqs`` full
    contexts need.

    ``enable_prefix_caching`` reuses the KV of prompts' shared prefixes (on by default);
    ``session_ttl_s`` is how long a session's KV stays pinned after a turn (requests may
    override it; 0 pins only when a request asks); ``prefix_grouping`` lets
    ``LLM.generate`` reorder a batch so that prompts sharing a prefix run together.

    Streaming input (``AsyncEngine.open_stream``): at most ``max_input_streams`` streams
    open at once; a stream untouched for ``stream_idle_timeout_s`` seconds is closed; an
    append is refused while more than ``max_stream_pending_tokens`` of a stream's input
    tokens still wait to be prefilled.

    ``quantization`` sets how linear-layer weights are kept in memory: ``auto`` keeps a
    GGUF's own quantized format (the default model stays Q4_1) and loads other checkpoints
    as they are; ``none`` dequantizes everything to ``dtype``; ``q8_0``, ``q4_0``, ``q4_1``
    or ``int8`` quantize at load (docs/quantization.md).

    ``activation_quantization``: ``none`` (the default: matmuls take fp32 activations, exact
    to the dequantized weights) or ``int8`` (CPU: the activations of q8_0/q4_0/q4_1 linear
    layers are quantized per 32-element block to int8 and multiplied in integers, 2-2.5x
    faster batches and prefill, held to a perplexity bound rather than to fp32 results;
    docs/quantization.md). Layers in other formats keep fp32 activations.

    ``attention_backend``: ``cpu`` (livelm's C++ kernels, fp32 on CPU), ``torch`` (torch
    ops, any device), or ``auto`` (``cpu`` for fp32 on CPU, else ``torch``).

    ``kv_cache_dtype``: what the KV cache stores, ``auto`` (the model's dtype), ``float32``,
    ``bfloat16`` (half the memory and bytes read per decode step; the C++ kernels read it
    in place), ``float16`` (torch path), ``q8_0`` (llama.cpp's block-quantized int8, 27% of
    float32's bytes; the C++ kernels read it in place; head_dim divisible by 32) or ``fp8``
    (float8 e4m3, for CUDA; torch path). Keys and values are rounded when written;
    attention arithmetic stays in the model's dtype (layers/attention/kv_format.py).

    Scheduling (docs/scheduling.md): ``scheduling_policy`` is ``fcfs`` (arrival order),
    ``priority`` (the request's ``priority``, higher first; lower ones are preempted for
    it), ``fair`` (token-fair between tenants, VTC) or ``deadline`` (earliest TTFT deadline
    first); ``tpot_slo_ms`` makes each step's prefill fit the time per output token the
    running decodes should keep, by a cost model of this host learnt from measured steps
    (at least ``min_prefill_tokens`` of prefill still run each step); ``ttft_slo_ms`` is
    the default time-to-first-token target; request priorities lie in
    [-``max_priority``, ``max_priority``].

    ``max_n`` is the most sequences one request may ask for (``n``; it must also be at most
    ``max_num_seqs``): a larger ``n`` is refused when the request is added.

    Speculative decoding (docs/speculative_decoding.md): ``speculative_method`` is None
    (off unless a request asks), ``"ngram"`` (prompt lookup), ``"suffix"``
    (SuffixDecoding) or ``"draft"`` (the greedy tokens of ``speculative_draft_model``, a small
    model with the same tokenizer, a path or hub id resolved like ``model``); at most
    ``num_speculative_tokens`` tokens are drafted per request and step, fewer as
    ``speculative_adaptive`` follows each request's acceptance; a step with more than
    ``speculative_max_batch_decodes`` decoding requests does not speculate.
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float = 0.85
    num_kv_blocks: int | None = None
    seed: int = 0
    num_threads: int | None = None
    enable_prefix_caching: bool = True
    session_ttl_s: float = 30.0
    prefix_grouping: bool = True
    max_input_streams: int = 64
    stream_idle_timeout_s: float = 600.0
    max_stream_pending_tokens: int = 16384
    quantization: str = "auto"
    activation_quantization: str = "none"
    attention_backend: str = "auto"
    max_n: int = 16
    kv_cache_dtype: str = "auto"
    scheduling_policy: str = "fcfs"
    tpot_slo_ms: float | None = None
    ttft_slo_ms: float | None = None
    min_prefill_tokens: int = 8
    max_priority: int = 10
    speculative_method: str | None = None
    num_speculative_tokens: int = 5
    speculative_draft_model: str | None = None
    speculative_adaptive: bool = True
    speculative_max_batch_decodes: int = 16
    # Engine replicas behind one server (docs/distributed.md): 1 is this engine alone;
    # more needs livelm.serving.DataParallelEngine (``livelm serve --data-parallel-size``).
    data_parallel_size: int = 1
    # Ranks one model is split over (docs/distributed.md): worker processes joined by gloo,
    # CPU only for now; 1 is no split.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        check_scheduling(self.scheduling_policy, self.tpot_slo_ms, self.ttft_slo_ms, self.min_prefill_tokens,
                         self.max_priority)
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(
                f"unsupported quantization {self.quantization!r}; supported: {', '.join(QUANTIZATION_CHOICES)}"
            )
        if self.activation_quantization not in ACTIVATION_QUANTIZATION_CHOICES:
            raise ValueError(f"unknown activation_quantization {self.activation_quantization!r:.60}; "
                             f"choose one of {', '.join(ACTIVATION_QUANTIZATION_CHOICES)}")
        if self.activation_quantization != "none" and self.device.startswith("cuda"):
            raise ValueError("activation_quantization='int8' runs on CPU kernels only; use 'none' on CUDA")
        if self.attention_backend not in ATTENTION_BACKEND_CHOICES:
            raise ValueError(
                f"unknown attention_backend {self.attention_backend!r}; valid: {', '.join(ATTENTION_BACKEND_CHOICES)}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPE_CHOICES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPE_CHOICES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.kv_cache_gib is not None and not (math.isfinite(self.kv_cache_gib) and self.kv_cache_gib > 0):
            raise ValueError(f"kv_cache_gib must be a finite number > 0 (or None: sized to need), "
                             f"got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_input_streams < 0:
            raise ValueError(f"max_input_streams must be >= 0, got {self.max_input_streams}")
        if self.stream_idle_timeout_s <= 0:
            raise ValueError(f"stream_idle_timeout_s must be > 0, got {self.stream_idle_timeout_s}")
        if self.max_stream_pending_tokens < 1:
            raise ValueError(f"max_stream_pending_tokens must be >= 1, got {self.max_stream_pending_tokens}")
        if isinstance(self.max_n, bool) or not isinstance(self.max_n, int) or self.max_n < 1:
            raise ValueError(f"max_n must be an integer >= 1, got {self.max_n!r}")
        if not isinstance(self.speculative_adaptive, bool):
            raise ValueError(f"speculative_adaptive must be a bool, got {self.speculative_adaptive!r:.60}")
        b = self.speculative_max_batch_decodes
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"speculative_max_batch_decodes must be an integer >= 1, got {b!r:.60}")
        d = self.data_parallel_size
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"data_parallel_size must be an integer >= 1, got {d!r:.60}")
        t = self.tensor_parallel_size
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {t!r:.60}")
        if t > 1 and d > 1:
            raise ValueError("tensor_parallel_size > 1 with data_parallel_size > 1 is not supported yet "
                             "(a replica process cannot start worker processes of its own)")
        self.speculative  # noqa: B018 - the method's and length's checks (named as these fields)
        # Reuse the smaller configs' checks.
        SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, self.max_model_len or 1)
        CacheConfig(self.block_size, session_ttl_s=self.session_ttl_s)

    @property
    def speculative(self) -> SpeculativeConfig:
        """The speculative decoding these fields ask for (ValueError naming a bad one)."""
        return SpeculativeConfig(
            method=self.speculative_method,
            num_speculative_tokens=self.num_speculative_tokens,
            draft_model=self.speculative_draft_model,
            adaptive=self.speculative_adaptive,
            max_batch_decodes=self.speculative_max_batch_decodes,
        )
