"""The architecture facts livelm needs, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# HF architecture name -> (attention has q/k/v bias by default, per-head q/k RMSNorm)
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
    "Phi3ForCausalLM": (False, False),
    "Qwen2MoeForCausalLM": (True, False),
    "Qwen3MoeForCausalLM": (False, True),
    "MixtralForCausalLM": (False, False),
    "GemmaForCausalLM": (False, False),
    "Gemma2ForCausalLM": (False, False),
    "Gemma3ForCausalLM": (False, True),
}
MOE_ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM")
# Every layer slides by ``sliding_window`` when the config gives one (transformers masks
# all their layers with it, whatever the context length).
_WINDOWED = ("MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM")
# Windows switched on by ``use_sliding_window``; which layers slide, as transformers' config
# classes decide it when the config lists no ``layer_types``.
_QWEN_WINDOWED = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
# Gemma: sliding and global layers alternate (``layer_types``; else Gemma 2 slides the even
# layers, Gemma 3 all but every ``sliding_window_pattern``-th), norms scale by 1 + weight,
# GeGLU, embeddings scaled by sqrt(hidden_size), norms after attention and around the MLP.
GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Gemma (1): 1 + weight norms, GeGLU and scaled embeddings, otherwise a Llama.
GEMMA1 = "GemmaForCausalLM"
# Architectures whose config class ties embeddings and head unless config.json says not.
_TIED_BY_DEFAULT = (GEMMA1, *GEMMA_ARCHITECTURES)
# Gemma3TextConfig's defaults for what livelm reads: the text_config of a Gemma 3
# multimodal checkpoint on the Hub holds only the fields that differ from them.
_GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
    max_position_embeddings=131_072, query_pre_attn_scalar=256, sliding_window=4096,
    hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, tie_word_embeddings=True,
)  # fmt: skip
# Activation names of config.json -> the gated feed-forward livelm runs (gate * act(gate) * up).
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, as transformers' ``rope_parameters`` names them
    (``rope_type`` one of ROPE_TYPES; livelm/models/rope.py computes the tables)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    factor_given: bool = True  # False: YaRN / LongRoPE derive it from the two lengths
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 2048  # the model's; dynamic NTK scales past it
    partial_rotary_factor: float = 1.0
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward of the sparse layers (Qwen2-MoE, Qwen3-MoE, Mixtral)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of each routed expert
    renormalize: bool  # top-k weights rescaled to sum to 1 (norm_topk_prob; Mixtral always)
    weights_in_model_dtype: bool  # Qwen casts routing weights to the model dtype, Mixtral not
    shared_intermediate_size: int  # Qwen2-MoE's sigmoid-gated shared expert; 0: none
    sparse_layers: tuple[bool, ...]  # per layer: MoE (True) or the dense MLP

    @staticmethod
    def from_dict(raw: dict, arch: str, num_layers: int) -> MoEConfig:
        """The MoE fields of a config.json of one of MOE_ARCHITECTURES."""
        if arch == "MixtralForCausalLM":
            return MoEConfig(
                num_experts=int(raw.get("num_local_experts", raw.get("num_experts", 0))),
                top_k=int(raw["num_experts_per_tok"]),
                intermediate_size=int(raw["intermediate_size"]),
                renormalize=True,
                weights_in_model_dtype=False,
                shared_intermediate_size=0,
                sparse_layers=(True,) * num_layers,
            )
        # Released Qwen configs say num_experts; transformers 5 writes num_local_experts.
        experts = int(raw.get("num_experts", raw.get("num_local_experts", 0)) or 0)
        step = int(raw.get("decoder_sparse_step", 1) or 1)
        dense = set(raw.get("mlp_only_layers") or [])
        sparse = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(num_layers))
        shared = int(raw.get("shared_expert_intermediate_size", 0) or 0) if arch == "Qwen2MoeForCausalLM" else 0
        moe = MoEConfig(
            num_experts=experts,
            top_k=int(raw["num_experts_per_tok"]),
            intermediate_size=int(raw["moe_intermediate_size"]),
            renormalize=bool(raw.get("norm_topk_prob", arch == "Qwen3MoeForCausalLM")),
            weights_in_model_dtype=True,
            shared_intermediate_size=shared,
            sparse_layers=sparse,
        )
        if any(sparse) and not 0 < moe.top_k <= experts:
            raise ValueError(f"num_experts_per_tok={moe.top_k} must be in 1..num_experts ({experts})")
        return moe


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a decoder-only transformer of a supported family."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    rope: RopeConfig
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    moe: MoEConfig | None = None
    # Per layer: the sliding window of its attention (the query at position p sees keys at
    # positions > p - window), or None for a global layer; () when no layer slides.
    sliding_windows: tuple[int | None, ...] = ()
    activation: str = "silu"  # of the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    # Gemma: norms scale by (offset + weight); the embedding output is multiplied by
    # embedding_scale; attention scores by query_pre_attn_scalar ** -0.5 (else head_dim's);
    # attention scores and final logits soft-capped (cap * tanh(x / cap)) when set;
    # sandwich_norms: a norm after attention and one before and one after the MLP.
    norm_offset: float = 0.0
    embedding_scale: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sandwich_norms: bool = False
    # Gemma 3: the sliding layers' own rotary (their theta), None: every layer uses ``rope``.
    local_rope: RopeConfig | None = None

    @property
    def sliding_window(self) -> int | None:
        """The window of the sliding layers (livelm supports one window per model), or None."""
        return next((w for w in self.sliding_windows if w is not None), None)

    @property
    def all_layers_slide(self) -> bool:
        """True when every layer slides: KV that left the window is needed by no layer."""
        return bool(self.sliding_windows) and all(w is not None for w in self.sliding_windows)

    def window_of(self, layer: int) -> int | None:
        """The sliding window of ``layer``, None for a global one."""
        return self.sliding_windows[layer] if self.sliding_windows else None

    def rope_of(self, layer: int) -> RopeConfig:
        """The rotary parameters ``layer`` uses (Gemma 3's sliding layers have their own)."""
        return self.local_rope if self.local_rope is not None and self.window_of(layer) is not None else self.rope

    @property
    def attention_scale(self) -> float:
        """What attention scores are multiplied by before the softmax."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @staticmethod
    def from_dir(model_dir: str | Path) -> ModelConfig:
        """Parse ``config.json`` of a local model directory; ValueError if unsupported."""
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ValueError(f"{model_dir} has no config.json: is it a Hugging Face model directory?") from e
        return ModelConfig.from_dict(raw)

    @staticmethod
    def from_dict(raw: dict) -> ModelConfig:
        """Build from the parsed ``config.json`` of a supported architecture."""
        archs = raw.get("architectures") or []
        if "Gemma3ForConditionalGeneration" in archs and isinstance(raw.get("text_config"), dict):
            raw, archs = gemma3_text_config(raw), ["Gemma3ForCausalLM"]
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or raw.get('model_type')!r}; livelm supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        default_bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
        gemma = arch in GEMMA_ARCHITECTURES
        # Gemma 2/3 configs name it hidden_activation (transformers ignores their hidden_act);
        # Gemma 1's "gelu" is, as transformers reads it, the tanh approximation.
        if gemma:
            act_name = raw.get("hidden_activation", "gelu_pytorch_tanh")
        elif arch == GEMMA1:
            act_name = raw.get("hidden_act") or "gelu_pytorch_tanh"
            act_name = "gelu_pytorch_tanh" if act_name == "gelu" else act_name
        else:
            act_name = raw.get("hidden_act", "silu")
        activation = ACTIVATIONS.get(act_name)
        if activation is None:
            raise ValueError(f"unsupported activation {act_name!r}: livelm supports {', '.join(ACTIVATIONS)}")
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        head_dim = raw.get("head_dim") or hidden // num_heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        extra = _gemma_fields(raw, arch, head_dim) if gemma else {}
        if arch == GEMMA1:
            extra = {"norm_offset": 1.0, "embedding_scale": float(hidden) ** 0.5}
        return ModelConfig(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", arch in _TIED_BY_DEFAULT)),
            attention_bias=bool(raw.get("attention_bias", default_bias)),
            qk_norm=qk_norm,
            rope=extra.pop("rope") if gemma else _parse_rope(raw, arch, head_dim),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            moe=MoEConfig.from_dict(raw, arch, raw["num_hidden_layers"]) if arch in MOE_ARCHITECTURES else None,
            sliding_windows=_parse_windows(raw, arch, raw["num_hidden_layers"]),
            activation=activation,
            **extra,
        )


def _parse_windows(raw: dict, arch: str, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window as transformers (v5) applies it to ``arch``; () for none.

    Mistral, Mixtral and Phi-3 slide every layer by ``sliding_window`` when it is set. The
    Qwen families slide only with ``use_sliding_window``: the layers the config's
    ``layer_types`` mark ``sliding_attention``, else Qwen2 / Qwen3 the layers from
    ``max_window_layers`` on, Qwen2-MoE the even layers below it, Qwen3-MoE every layer.
    """
    if arch in _WINDOWED:
        window = raw.get("sliding_window")
        sliding = [True] * num_layers
    elif arch in GEMMA_ARCHITECTURES:
        window = raw.get("sliding_window", 4096)
        pattern = 2 if arch == "Gemma2ForCausalLM" else int(raw.get("sliding_window_pattern", 6) or 6)
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
        sliding = _layer_types(raw.get("layer_types") or default, num_layers)
    elif arch in _QWEN_WINDOWED and raw.get("use_sliding_window"):
        window = raw.get("sliding_window", 4096)
        types = raw.get("layer_types")
        limit = int(raw.get("max_window_layers", 28))
        if arch == "Qwen3MoeForCausalLM":
            sliding = [True] * num_layers  # its attention reads config.sliding_window in every layer
        elif types is not None:
            sliding = _layer_types(types, num_layers)
        elif arch == "Qwen2MoeForCausalLM":
            sliding = [i % 2 == 0 and i < limit for i in range(num_layers)]
        else:
            sliding = [i >= limit for i in range(num_layers)]
    else:
        return ()
    if window is None or not any(sliding):
        return ()
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be a positive integer (or null for none), got {window!r:.40}")
    return tuple(window if s else None for s in sliding)


def gemma3_text_config(raw: dict) -> dict:
    """The text model's config of a Gemma 3 multimodal checkpoint (Gemma 3 4B, 12B, 27B):
    livelm runs its language model on text; the vision tower is not loaded. The top level's
    token ids and embedding tie win, as transformers' Gemma3Config has them."""
    text = {**_GEMMA3_TEXT_DEFAULTS, **raw["text_config"], "architectures": ["Gemma3ForCausalLM"]}
    for key in ("bos_token_id", "eos_token_id", "tie_word_embeddings"):
        if raw.get(key) is not None:
            text[key] = raw[key]
    return text


def _layer_types(types: object, num_layers: int) -> list[bool]:
    """Which layers slide, from a config's ``layer_types``; ValueError when malformed."""
    if (not isinstance(types, list) or len(types) != num_layers
            or any(t not in ("sliding_attention", "full_attention") for t in types)):
        raise ValueError(
            f"layer_types must name 'sliding_attention' or 'full_attention' for each of the "
            f"{num_layers} layers, got {types!r:.200}"
        )
    return [t == "sliding_attention" for t in types]


def _gemma_fields(raw: dict, arch: str, head_dim: int) -> dict:
    """The ModelConfig fields of a Gemma 2 / Gemma 3 text config (its rotary included)."""
    if raw.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true (an embedding model's encoder) is not supported: "
                         "livelm runs causal decoders")
    gemma2 = arch == "Gemma2ForCausalLM"
    fields: dict = dict(
        norm_offset=1.0,
        embedding_scale=float(raw["hidden_size"]) ** 0.5,
        query_pre_attn_scalar=_positive(raw, "query_pre_attn_scalar", 256),
        attn_softcap=_positive(raw, "attn_logit_softcapping", 50.0 if gemma2 else None),
        final_softcap=_positive(raw, "final_logit_softcapping", 30.0 if gemma2 else None),
        sandwich_norms=True,
    )
    params = raw.get("rope_parameters") or {}
    if gemma2 or not ({"full_attention", "sliding_attention"} & set(params)):
        fields["rope"] = _parse_rope(raw, arch, head_dim)
        if not gemma2:  # a v4-style Gemma 3 config: rope_scaling for the global layers only
            local_theta = float(raw.get("rope_local_base_freq", 10000.0))
            fields["local_rope"] = RopeConfig(theta=local_theta, max_position_embeddings=fields["rope"].max_position_embeddings)
            if "rope_theta" not in raw and "rope_theta" not in params:
                fields["rope"] = _parse_rope({**raw, "rope_theta": 1_000_000.0}, arch, head_dim)
        return fields
    # transformers 5 writes one rope_parameters dict per layer type.
    full = {"rope_theta": 1_000_000.0, **(params.get("full_attention") or {})}
    local = {"rope_theta": float(raw.get("rope_local_base_freq", 10000.0)), **(params.get("sliding_attention") or {})}
    base = {k: v for k, v in raw.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    fields["rope"] = _parse_rope({**base, "rope_parameters": full}, arch, head_dim)
    fields["local_rope"] = _parse_rope({**base, "rope_parameters": local}, arch, head_dim)
    return fields


def _positive(raw: dict, key: str, default: float | None) -> float | None:
    """A positive float config field (or None where the config sets it null)."""
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{key} must be a positive number (or null), got {value!r:.40}")
    return float(value)


def _parse_rope(raw: dict, arch: str, head_dim: int) -> RopeConfig:
    # transformers v5 writes "rope_parameters"; v4 wrote "rope_theta" + "rope_scaling".
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if arch == "Phi3ForCausalLM" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi-3's config class renames these, so transformers runs LongRoPE
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}: livelm supports {', '.join(ROPE_TYPES)}")
    max_pos = int(raw.get("max_position_embeddings", 2048))
    # As transformers: a top-level original_max_position_embeddings (Phi-3) wins over the
    # one in the scaling dict, and the model's own length stands in for a missing one.
    original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
    partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) or 1.0)
    rope = RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor") or 1.0),
        factor_given=params.get("factor") is not None,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original),
        max_position_embeddings=max_pos,
        partial_rotary_factor=partial,
        attention_factor=_optional_float(params.get("attention_factor")),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=_optional_float(params.get("mscale")),
        mscale_all_dim=_optional_float(params.get("mscale_all_dim")),
        truncate=bool(params.get("truncate", True)),
        short_factor=tuple(float(f) for f in params.get("short_factor") or ()),
        long_factor=tuple(float(f) for f in params.get("long_factor") or ()),
    )
    _check_rope(rope, head_dim)
    return rope


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _check_rope(rope: RopeConfig, head_dim: int) -> None:
    """ValueError naming the field of a rope config livelm would otherwise misread."""
    rot = int(head_dim * rope.partial_rotary_factor)
    if not 0 < rope.partial_rotary_factor <= 1 or rot % 2:
        raise ValueError(
            f"partial_rotary_factor={rope.partial_rotary_factor} gives {rot} rotated dimensions "
            f"of head_dim {head_dim}: it must be in (0, 1] and give an even count"
        )
    if rope.rope_type in ("linear", "dynamic", "llama3") and not rope.factor_given:
        raise ValueError(f"rope_scaling of type {rope.rope_type!r} needs a 'factor'")
    if rope.rope_type == "dynamic" and rot <= 2:
        raise ValueError("dynamic rope scaling needs more than 2 rotated dimensions per head")
    if rope.rope_type == "longrope":
        for name in ("short_factor", "long_factor"):
            if len(getattr(rope, name)) != rot // 2:
                raise ValueError(
                    f"rope_scaling {name} has {len(getattr(rope, name))} entries; LongRoPE needs "
                    f"one per rotated pair ({rot // 2})"
                )
