"""llama.cpp's GGUF tensor names to Hugging Face ones, per model family.

The family is the GGUF file's ``general.architecture``, except that a ``llama`` file
carrying expert tensors (``ffn_*_exps``) is Mixtral, as llama.cpp's converter writes it.
Gemma's four norms per layer keep llama.cpp's names for them (``ffn_norm`` is the one before
the MLP). Phi-3 stores Hugging Face's fused ``qkv_proj`` as ``attn_qkv`` and ``gate_up_proj``
(gate rows, then up rows) as ``ffn_up``, so those names keep their fused HF form. The
routed experts of a MoE layer are stacked in one tensor per projection, ``[n_expert,
rows, cols]``; their HF name carries :data:`EXPERT` where each expert's index goes.
"""

from __future__ import annotations

from collections.abc import Collection

from livelm.models.gguf_rope import ROPE_FREQS

# family -> (transformers model_type, architectures entry)
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "gemma": ("gemma", "GemmaForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
# The general.architecture values livelm converts (Mixtral's files say "llama").
GGUF_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "phi3", "qwen2moe", "qwen3moe", "gemma", "gemma2", "gemma3")
# Families whose norms llama.cpp stores as 1 + weight.
GEMMA_FAMILIES: tuple[str, ...] = ("gemma", "gemma2", "gemma3")
MOE_FAMILIES: tuple[str, ...] = ("qwen2moe", "qwen3moe", "mixtral")
EXPERT = "{expert}"
# Phi-3's LongRoPE factors, read back into rope_scaling (models/gguf_families.py).
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

_PHI3_TENSORS = {
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",  # gate rows, then up rows: Phi-3's fused layout
}

_QWEN_MOE_TENSORS = {
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": f"mlp.experts.{EXPERT}.gate_proj.weight",
    "ffn_up_exps.weight": f"mlp.experts.{EXPERT}.up_proj.weight",
    "ffn_down_exps.weight": f"mlp.experts.{EXPERT}.down_proj.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}

_MIXTRAL_TENSORS = {  # Mixtral checkpoints' own names (w1 gate, w3 up, w2 down)
    "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
    "ffn_gate_exps.weight": f"block_sparse_moe.experts.{EXPERT}.w1.weight",
    "ffn_up_exps.weight": f"block_sparse_moe.experts.{EXPERT}.w3.weight",
    "ffn_down_exps.weight": f"block_sparse_moe.experts.{EXPERT}.w2.weight",
}

# Gemma's norms around attention and the MLP: llama.cpp's ffn_norm is the pre-MLP norm, as
# for llama, but Gemma's post_attention_layernorm normalizes the attention output.
_GEMMA_TENSORS = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}

_FAMILY_TENSORS: dict[str, dict[str, str]] = {
    "gemma2": _GEMMA_TENSORS,
    "gemma3": _GEMMA_TENSORS,
    "phi3": _PHI3_TENSORS,
    "qwen2moe": _QWEN_MOE_TENSORS,
    "qwen3moe": {k: v for k, v in _QWEN_MOE_TENSORS.items() if "shexp" not in k},
    "mixtral": _MIXTRAL_TENSORS,
}


def gguf_family(arch: str, tensor_names: Collection[str]) -> str:
    """The model family of a file of ``general.architecture`` ``arch`` (see module doc)."""
    if arch == "llama" and any(n.endswith("_exps.weight") for n in tensor_names):
        return "mixtral"
    return arch


def hf_tensor_name(gguf_name: str, family: str) -> str:
    """The HF name of GGUF tensor ``gguf_name`` (with :data:`EXPERT` for a stacked expert
    tensor); extra tensors read back into the config keep their GGUF name. ValueError for
    a tensor the family has no place for."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    if gguf_name == ROPE_FREQS or (family == "phi3" and gguf_name in ROPE_FACTORS):
        return gguf_name
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        table = {**_LAYER_TENSORS, **_FAMILY_TENSORS.get(family, {})}
        if parts[2] in table:
            return f"model.layers.{parts[1]}.{table[parts[2]]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent we know of (in a {family} file)")


def check_layer_tensors(names: Collection[str], family: str, num_layers: int, shared_expert: bool) -> None:
    """ValueError naming the first tensor a layer (or the model) of ``family`` needs and the
    file lacks, so that a truncated file fails at conversion, not at load."""
    need = ["token_embd.weight", "output_norm.weight"]
    attention = ["attn_qkv"] if family == "phi3" else ["attn_q", "attn_k", "attn_v"]
    for i in range(num_layers):
        layer = [*attention, "attn_output", "attn_norm", "ffn_norm"]
        if family in ("gemma2", "gemma3"):
            layer += ["post_attention_norm", "post_ffw_norm"]
        if family == "gemma3":
            layer += ["attn_q_norm", "attn_k_norm"]
        if family == "phi3":
            layer += ["ffn_up", "ffn_down"]
        elif family in MOE_FAMILIES and (family == "mixtral" or f"blk.{i}.ffn_gate_inp.weight" in names):
            layer += ["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
            if shared_expert:
                layer += ["ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
        else:  # a dense layer (Qwen-MoE's mlp_only_layers too)
            layer += ["ffn_gate", "ffn_up", "ffn_down"]
        need += [f"blk.{i}.{t}.weight" for t in layer]
    for name in need:
        if name not in names:
            raise ValueError(f"GGUF file of a {family} model lacks tensor {name!r}")
