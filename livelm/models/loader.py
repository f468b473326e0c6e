"""Build a model from a Hugging Face directory: config.json plus *.safetensors (never pickle)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from livelm.models.llama import LlamaForCausalLM
from livelm.models.model_config import ModelConfig
from livelm.models.rope import RotaryEmbedding

logger = logging.getLogger("livelm")

_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors shards (ValueError when there are none)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"no *.safetensors weights in {model_dir}; livelm never loads pickled (.bin/.pt) "
            "checkpoints: convert them to safetensors first"
        )
    return files


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quantization: str = "auto",
) -> LlamaForCausalLM:
    """Instantiate the architecture named in config.json and fill it with its weights."""
    if quantization not in ("auto", "none"):  # quantizing at load lands with livelm/quant
        raise ValueError(f"quantization {quantization!r} is not available yet; supported: auto, none")
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
    model = model.to_empty(device=device).to(dtype)
    # Rotary tables are derived, not loaded: rebuild them (meta init left them empty).
    model.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope).to(device)

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                target = _copy_weight(cfg, params, name, f.get_tensor(name))
                if target:
                    loaded.add(target)
    missing = sorted(set(params) - {t.split(":")[0] for t in loaded})
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks weights for: {', '.join(missing[:8])}")
    model.eval()
    return model


def _copy_weight(cfg: ModelConfig, params: dict, name: str, tensor: torch.Tensor) -> str | None:
    """Copy one checkpoint tensor into its (possibly fused) parameter; returns its name."""
    if name.startswith("model."):
        name = name[len("model.") :]
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None  # some tied checkpoints store the copy anyway
    if "rotary_emb" in name:
        return None
    parts = name.split(".")
    fused = _FUSED.get(parts[-2]) if len(parts) >= 2 else None
    if fused is None:
        param = params.get(name)
        if param is None:
            logger.warning("ignoring unexpected checkpoint tensor %s", name)
            return None
        _check_shape(name, param, tensor)
        param.data.copy_(tensor)
        return name
    fused_name, part = fused
    target = ".".join([*parts[:-2], fused_name, parts[-1]])
    param = params[target]
    if fused_name == "qkv_proj":
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        sizes = [q, kv, kv]
    else:
        sizes = [cfg.intermediate_size] * 2
    start = sum(sizes[:part])
    dst = param.data.narrow(0, start, sizes[part])
    _check_shape(name, dst, tensor)
    dst.copy_(tensor)
    return f"{target}:{part}"


def _check_shape(name: str, dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"weight {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
