"""Build a model from a Hugging Face directory: config.json plus *.safetensors (never pickle)."""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import safe_open

from livelm.layers.quantized import QuantizedModule, QuantLinear, SplitQuantLinear
from livelm.models.llama import LlamaForCausalLM
from livelm.models.model_config import ModelConfig
from livelm.models.prepare import swap_quantized_modules
from livelm.models.rope import RotaryEmbedding
from livelm.models.weight_cache import QuantizedWeightCache
from livelm.quant.formats import QuantizedTensor, check_format, dequantize, quantize
from livelm.quant.int8_activations import INT8_ACTIVATION_FORMATS
from livelm.quant.plan import check_quantization, plan_formats
from livelm.quant.storage import QUANT_METADATA_KEY, stored_quantized

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
    activation_quantization: str = "none",
) -> LlamaForCausalLM:
    """Instantiate the architecture named in config.json and fill it with its weights.

    ``quantization`` (see EngineConfig): ``auto`` keeps quantized checkpoint tensors (a
    converted GGUF's) quantized and float ones float, ``none`` dequantizes everything, a
    format name quantizes every linear layer and the token embedding at load.
    ``activation_quantization="int8"`` gives the q8_0/q4_0/q4_1 linear layers int8
    activations (CPU only; livelm/quant/int8_activations.py).
    """
    check_quantization(quantization)
    if activation_quantization not in ("none", "int8"):
        raise ValueError(f"unknown activation_quantization {activation_quantization!r:.60}; choose none or int8")
    if activation_quantization == "int8" and device.type != "cpu":
        raise ValueError(f"activation_quantization='int8' runs on CPU kernels only, not on {device.type}")
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    if cfg.moe is not None and quantization not in ("auto", "none"):
        # The routed experts are stacked parameters, not linear layers the quantized
        # kernels can swap; quantizing only the rest would leave most weights float.
        raise ValueError(
            f"quantization={quantization!r} is not supported for mixture-of-experts models "
            f"({cfg.architecture}): their expert weights stay float; use quantization='none' or 'auto'"
        )
    checkpoint = Checkpoint(safetensors_files(model_dir))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
        stored: dict[str, dict[int, tuple[int | None, str | None]]] = {}
        for name in checkpoint.names():
            target = _target(cfg, name)
            if target is not None:
                tname, start, rows = target
                stored.setdefault(tname, {})[start] = (rows, checkpoint.formats.get(name))
        plan = plan_formats(model, quantization, stored)
        swap_quantized_modules(model, plan)
    _materialize(model, device, dtype)
    if isinstance(model.lm_head, QuantLinear) and cfg.tie_word_embeddings:
        model.lm_head.share_weight(model.embed_tokens)
    # Rotary tables are derived, not loaded: rebuild them (meta init left them empty).
    model.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope).to(device)
    if cfg.local_rope is not None:
        model.local_rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.local_rope).to(device)
    if plan:
        counts = Counter(f for v in plan.values() for f in ([v] if isinstance(v, str) else [f for _, f in v]))
        logger.info("quantized weights: %s", ", ".join(f"{n} layers {f}" for f, n in sorted(counts.items())))

    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    expected = set(params) | {f"{p}.weight" for p in plan if not (p == "lm_head" and cfg.tie_word_embeddings)}
    loaded: set[str] = set()
    cache = QuantizedWeightCache(checkpoint.files, quantization) if plan and QuantizedWeightCache.enabled() else None
    cached = cache.lookup() if cache is not None else None
    sources = checkpoint.tensors(skip=cached.keys() if cached else ())
    for name, tensor in itertools.chain(sources, (cached or {}).items()):
        target = _target(cfg, name)
        if target is None:
            continue
        tname, start, rows = target
        module = modules.get(tname.rpartition(".")[0])
        if tname.endswith(".weight") and isinstance(module, QuantizedModule):
            quantized = _copy_quantized(name, module, start, rows, tensor)
            if quantized is not None and cache is not None and cached is None:
                cache.add(name, quantized)
        elif tname.endswith(".weight") and isinstance(module, SplitQuantLinear):
            # Only under "auto", with every part already in its stored format: nothing to cache.
            _copy_quantized(name, module.part_at(start, rows), 0, None, tensor)
        elif tname in params:
            src = dequantize(tensor) if isinstance(tensor, QuantizedTensor) else tensor
            if src.dim() == 3 and tname.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                src = src.reshape(-1, src.shape[-1])  # transformers 5's stacked [E, rows, in]
            param = params[tname].data
            dst = param if rows is None else param.narrow(0, start, rows)
            _check_shape(name, dst, src)
            dst.copy_(src)
        else:
            logger.warning("ignoring unexpected checkpoint tensor %s", name)
            continue
        loaded.add(tname)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks weights for: {', '.join(missing[:8])}")
    if cache is not None and cached is None:
        cache.save()
    if activation_quantization == "int8":
        use_int8_activations(model)
    model.eval()
    return model


def use_int8_activations(model: torch.nn.Module) -> int:
    """Give every quantized linear layer whose format allows it int8 activations; returns
    how many (the others are named in the log, once per format)."""
    taken, kept = 0, Counter()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            if mod.fmt in INT8_ACTIVATION_FORMATS:
                mod.int8_activations = True
                taken += 1
            else:
                kept[mod.fmt] += 1
    if kept:
        logger.info("int8 activations: %s layers keep fp32 activations (%s weights have no int8 kernel; "
                    "supported: %s)", sum(kept.values()), ", ".join(sorted(kept)), ", ".join(INT8_ACTIVATION_FORMATS))
    if taken == 0:
        logger.warning("activation_quantization='int8' has no effect: no linear layer holds q8_0/q4_0/q4_1 "
                       "weights (set quantization, e.g. q8_0)")
    else:
        logger.info("int8 activations in %d linear layers", taken)
    return taken


def _materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter and buffer uninitialized storage on ``device``, floating
    ones in ``dtype`` (what ``model.to_empty(device=device).to(dtype)`` does).

    ``to_empty`` runs ``empty_like`` on each meta tensor, which loads torch's meta
    registrations and sympy: ~0.3 s of every start. ``torch.empty`` of the same shape does
    not. Tensors shared between modules stay shared."""
    made: dict[int, torch.Tensor] = {}  # id of the meta tensor -> its replacement

    def fresh(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            empty = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)
            made[id(t)] = torch.nn.Parameter(empty, t.requires_grad) if isinstance(t, torch.nn.Parameter) else empty
        return made[id(t)]

    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is not None and t.is_meta:
                    tensors[name] = fresh(t)


class Checkpoint:
    """The tensors of a checkpoint's safetensors files, quantized ones (``<name>.qs``,
    ``.d``, ``.m``, formats listed in the file's ``livelm.quant`` metadata) grouped back
    into QuantizedTensors under their weight's name."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.formats: dict[str, str] = {}
        self._keys: dict[Path, list[str]] = {}
        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                self._keys[path] = list(f.keys())
                meta = (f.metadata() or {}).get(QUANT_METADATA_KEY)
                if meta:
                    self.formats.update(json.loads(meta))
        for fmt in self.formats.values():
            check_format(fmt)

    def names(self) -> list[str]:
        """Weight names (a quantized weight's name, not its parts')."""
        out: list[str] = []
        for keys in self._keys.values():
            out.extend(k for k in keys if _base(k) not in self.formats)
        return out + list(self.formats)

    def tensors(self, skip: Collection[str] = ()):
        """(name, float tensor or QuantizedTensor) for every weight not named in ``skip``,
        file by file."""
        for path, keys in self._keys.items():
            parts: dict[str, dict[str, torch.Tensor]] = {}
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in keys:
                    base = _base(key)
                    if base in skip:
                        continue
                    if base in self.formats:
                        parts.setdefault(base, {})[key.rpartition(".")[2]] = f.get_tensor(key)
                    else:
                        yield key, f.get_tensor(key)
            for base, t in parts.items():
                yield base, stored_quantized(self.formats[base], t)


def _base(key: str) -> str:
    head, _, tail = key.rpartition(".")
    return head if tail in ("qs", "d", "m") else key


def _copy_quantized(
    name: str, module: QuantizedModule, start: int, rows: int | None, src
) -> QuantizedTensor | None:
    """Write checkpoint weight ``src`` into rows of a quantized module (quantizing or
    requantizing if needed); returns the weight when it was (re)quantized here."""
    quantized = False
    if isinstance(src, QuantizedTensor) and src.fmt != module.fmt:
        logger.info("%s: stored as %s, requantized to %s", name, src.fmt, module.fmt)
        src = dequantize(src)
    if not isinstance(src, QuantizedTensor):
        if src.dim() != 2 or src.shape[1] != module.in_features:
            raise ValueError(f"weight {name} has shape {tuple(src.shape)}, expected [*, {module.in_features}]")
        src = quantize(src, module.fmt)
        quantized = True
    dst = module.qweight
    if rows is not None:
        dst = dst.rows(start, rows)
    if src.shape != dst.shape:
        raise ValueError(f"weight {name} has shape {src.shape}, expected {dst.shape}")
    for key, t in dst.tensors().items():
        t.copy_(src.tensors()[key])
    return src if quantized else None


# Gemma 3 multimodal checkpoints: the language model's tensors under one of these prefixes
# (transformers 4 and 5 spell it differently), the vision tower's skipped.
_TEXT_MODEL_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.")
_MULTIMODAL_SKIPPED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")

_EXPERT_PARTS = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}


def _target(cfg: ModelConfig, name: str) -> tuple[str, int, int | None] | None:
    """Where checkpoint tensor ``name`` goes: (model tensor name, first row, rows or None
    for the whole tensor), or None for tensors that are not loaded."""
    if name.startswith(_MULTIMODAL_SKIPPED):
        return None  # a multimodal checkpoint's vision tower: livelm runs its text model
    for prefix in _TEXT_MODEL_PREFIXES:  # a multimodal checkpoint's language model (Gemma 3)
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if name.startswith("model."):
        name = name[len("model.") :]
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None  # some tied checkpoints store the copy anyway
    if "rotary_emb" in name:
        return None
    name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name for the MoE block
    parts = name.split(".")
    if cfg.moe is not None and len(parts) == 7 and parts[3] == "experts" and parts[5] in _EXPERT_PARTS:
        return _expert_target(cfg, parts)
    fused = _FUSED.get(parts[-2]) if len(parts) >= 2 else None
    if fused is None:
        return name, 0, None
    fused_name, part = fused
    target = ".".join([*parts[:-2], fused_name, parts[-1]])
    if fused_name == "qkv_proj":
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        sizes = [q, kv, kv]
    elif cfg.moe is not None and "shared_expert" in parts:
        sizes = [cfg.moe.shared_intermediate_size] * 2
    else:
        sizes = [cfg.intermediate_size] * 2
    return target, sum(sizes[:part]), sizes[part]


def _expert_target(cfg: ModelConfig, parts: list[str]) -> tuple[str, int, int | None]:
    # layers.{L}.mlp.experts.{e}.{gate_proj|up_proj|down_proj (or w1|w3|w2)}.weight: a row
    # range of the layer's stacked expert weights (models/moe.py).
    assert cfg.moe is not None
    if not parts[4].isdigit() or int(parts[4]) >= cfg.moe.num_experts or parts[6] != "weight":
        raise ValueError(f"checkpoint tensor {'.'.join(parts)}: no such expert weight "
                         f"(the model has {cfg.moe.num_experts} experts)")
    expert, part, inter = int(parts[4]), _EXPERT_PARTS[parts[5]], cfg.moe.intermediate_size
    prefix = ".".join(parts[:4])
    if part == 2:
        return f"{prefix}.down_proj", expert * cfg.hidden_size, cfg.hidden_size
    return f"{prefix}.gate_up_proj", expert * 2 * inter + part * inter, inter


def _check_shape(name: str, dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"weight {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
