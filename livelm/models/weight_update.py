"""New weights for a loaded, prepared model, without a restart (RL serving, docs/rl.md).

An update is a set of checkpoint tensors (Hugging Face names, or livelm's fused names),
possibly a subset of the model's. It happens in two phases, so that nothing live changes
until everything is known to be right:

1. :func:`stage_update` checks every tensor (name, shape, dtype, finite values) and builds
   the new modules beside the live ones, in the model's own layout: fp32 CPU linears packed
   again (``packed_linear``, the call ``prepare_model`` makes), quantized modules
   requantized row by row (``quantize``, as the loader does), the tied LM head's packed copy
   rebuilt. A fused weight (q|k|v, gate|up) of which only some parts come reads the other
   parts from the live module (unpacking a packed one exactly, see :func:`unpack_linear`).
   Any failure raises ValueError and leaves the model untouched.
2. :meth:`StagedUpdate.apply` swaps the staged modules and tensors in: attribute
   assignments only, so it cannot fail halfway.

The result equals what the loader builds from a checkpoint holding the new weights: the
same conversions run on the same tensors (tested against a fresh engine).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from livelm.layers.packed_linear import PackedLinear, PanelLinear, packed_linear
from livelm.layers.quantized import QuantizedModule, QuantLinear, SplitQuantLinear
from livelm.models.llama import LlamaForCausalLM
from livelm.models.loader import Checkpoint, _target, safetensors_files
from livelm.models.prepare import _bind_submodules
from livelm.quant.formats import QuantizedTensor, dequantize, quantize

logger = logging.getLogger("livelm")

# What happens to running requests when an update is applied (docs/rl.md).
UPDATE_MODES = ("wait", "abort", "continue")
# Tensor dtypes an update may carry (as a trainer names them over a process group).
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Incoming = torch.Tensor | QuantizedTensor


def check_mode(mode: object) -> str:
    """``mode`` if it is one of :data:`UPDATE_MODES`, else ValueError."""
    if not isinstance(mode, str) or mode not in UPDATE_MODES:
        raise ValueError(f"mode must be one of {list(UPDATE_MODES)}, got {mode!r:.40}")
    return mode


@dataclass(frozen=True)
class WeightSpec:
    """One tensor an update announces: checkpoint name, shape, dtype name (``float32``...)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class WeightLayout:
    """The tensor names and shapes a model accepts, from its config (built on the meta device)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.config = cfg = model.config
        with torch.device("meta"):
            plain = LlamaForCausalLM(cfg, 1)
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(p.shape) for n, p in plain.named_parameters()}

    def target(self, name: object, shape: tuple[int, ...]) -> tuple[str, int, int | None] | None:
        """Where tensor ``name`` of ``shape`` goes (model tensor, first row, rows), None for
        a tensor that is not loaded (rotary tables, a tied checkpoint's LM head copy);
        ValueError for a name the model does not have or a shape that does not fit."""
        if not isinstance(name, str) or not name or len(name) > 512:
            raise ValueError(f"weight name must be a non-empty string, got {name!r:.60}")
        target = _target(self.config, name)
        if target is None:
            return None
        tname, start, rows = target
        full = self.shapes.get(tname)
        if full is None:
            raise ValueError(f"weight {name!r}: the model has no such tensor (not the same architecture?)")
        want = full if rows is None else (rows, *full[1:])
        if tuple(shape) != want:
            raise ValueError(f"weight {name!r} has shape {list(shape)}, expected {list(want)}")
        return target

    def check_spec(self, spec: WeightSpec) -> tuple[str, int, int | None] | None:
        """:meth:`target` for an announced tensor, its dtype checked too."""
        if spec.dtype not in FLOAT_DTYPES:
            raise ValueError(f"weight {spec.name!r} has dtype {spec.dtype!r}; expected one of {sorted(FLOAT_DTYPES)}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 1 << 31 for d in spec.shape):
            raise ValueError(f"weight {spec.name!r} has an invalid shape {spec.shape!r:.80}")
        return self.target(spec.name, spec.shape)


def check_incoming(name: str, tensor: object) -> None:
    """ValueError unless ``tensor`` is a float tensor (or a QuantizedTensor) of finite values."""
    if isinstance(tensor, QuantizedTensor):
        values = tensor.scales()
    elif isinstance(tensor, torch.Tensor):
        if tensor.dtype not in FLOAT_DTYPES.values():
            raise ValueError(f"weight {name!r} has dtype {tensor.dtype}; expected float32, float16 or bfloat16")
        values = tensor
    else:
        raise ValueError(f"weight {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"weight {name!r} holds NaN or infinite values")


def unpack_linear(module: nn.Module) -> torch.Tensor:
    """The [out, in] fp32 weight of a live linear layer, packed or not.

    A packed layer keeps no plain copy: multiplying the identity by it gives the weight back
    exactly (each output is one product ``1 * w`` plus exact zeros, no rounding).
    """
    if isinstance(module, nn.Linear):
        return module.weight.detach().clone()
    eye = torch.eye(module.in_features, dtype=torch.float32)
    with torch.inference_mode():
        if isinstance(module, PanelLinear):
            out = module._kernels.fp32_linear(eye, module.packed, None, module.out_features)
        elif isinstance(module, PackedLinear):
            out = torch.ops.mkldnn._linear_pointwise(eye, module.packed, None, "none", [], "")
        else:
            raise TypeError(f"cannot read the weight of {type(module).__name__}")
    return out.t().contiguous().clone()


@dataclass
class StagedUpdate:
    """New weights built beside the live ones; :meth:`apply` swaps them in."""

    modules: dict[str, nn.Module] = field(default_factory=dict)  # module path -> new module
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> new data
    buffers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # quantized module -> qs/d/m
    tied_head: nn.Module | None = None
    tied_head_changed: bool = False
    retie_quantized_head: bool = False
    names: list[str] = field(default_factory=list)  # checkpoint names it carries

    @property
    def num_tensors(self) -> int:
        """Checkpoint tensors in the update."""
        return len(self.names)

    def apply(self, model: LlamaForCausalLM) -> None:
        """Swap the staged weights into ``model`` (plain attribute assignments)."""
        for path, module in self.modules.items():
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, module)
        params = dict(model.named_parameters())
        for name, data in self.params.items():
            params[name].data = data
        for path, tensors in self.buffers.items():
            module = model.get_submodule(path)
            for key, t in tensors.items():
                setattr(module, key, t)
        if self.retie_quantized_head:
            model.lm_head.share_weight(model.embed_tokens)
        _bind_submodules(model)  # swapped modules: plain attributes again (prepare_model's)


def stage_update(
    model: LlamaForCausalLM,
    items: Iterable[tuple[str, Incoming]],
    layout: WeightLayout | None = None,
) -> StagedUpdate:
    """Check ``items`` and build the new weights (see the module docstring); the model is
    not touched. ValueError names the first tensor that is wrong."""
    layout = layout or WeightLayout(model)
    pieces: dict[str, list[tuple[int, int | None, str, Incoming]]] = {}
    seen: set[str] = set()
    names: list[str] = []
    for name, tensor in items:
        check_incoming(name, tensor)
        shape = tuple(tensor.shape)
        target = layout.target(name, shape)
        names.append(name)
        if target is None:
            continue
        tname, start, rows = target
        key = f"{tname}[{start}]"
        if key in seen:
            raise ValueError(f"weight {name!r} is given twice")
        seen.add(key)
        pieces.setdefault(tname, []).append((start, rows, name, tensor))
    if not names:
        raise ValueError("the update holds no tensors")
    staged = StagedUpdate(names=names)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for tname, parts in pieces.items():
        path, _, kind = tname.rpartition(".")
        module = modules.get(path)
        if kind == "weight" and isinstance(module, QuantizedModule):
            staged.buffers[path] = _quantized_weight(module, parts)
            if path == "embed_tokens" and isinstance(model.lm_head, QuantLinear) and model.config.tie_word_embeddings:
                staged.retie_quantized_head = True
        elif kind == "weight" and isinstance(module, SplitQuantLinear):
            raise ValueError(f"{path} keeps its parts in the GGUF formats they were stored in "
                             f"({', '.join(p.fmt for p in module.parts)}); live updates of it are not supported")
        elif kind == "bias" and isinstance(module, PanelLinear | PackedLinear):
            continue  # repacked with its weight (a bias alone: below)
        elif isinstance(module, PanelLinear | PackedLinear):
            staged.modules[path] = _repacked(module, tname, parts, pieces, layout)
        else:
            current = params[tname].data
            staged.params[tname] = _assembled(current, parts, current.dtype)
    # A packed linear whose bias alone came: repack it with its current weight.
    for tname in pieces:
        path, _, kind = tname.rpartition(".")
        if kind == "bias" and isinstance(modules.get(path), PanelLinear | PackedLinear) and path not in staged.modules:
            staged.modules[path] = _repacked(modules[path], f"{path}.weight", [], pieces, layout)
    if "embed_tokens.weight" in staged.params and model.lm_head is None:
        # The tied LM head's packed copy reads the new table (prepare_model's call).
        staged.tied_head = packed_linear(staged.params["embed_tokens.weight"], None)
        staged.tied_head_changed = True
    return staged


def _assembled(current: torch.Tensor, parts, dtype: torch.dtype) -> torch.Tensor:
    """A new float tensor: the given rows from ``parts``, the rest copied from ``current``."""
    n = current.shape[0]
    covered = sum(n if rows is None else rows for _, rows, _, _ in parts)
    if covered >= n:
        out = torch.empty(current.shape, dtype=dtype, device=current.device)
    else:
        out = current.to(dtype=dtype, copy=True)
    for start, rows, _name, tensor in parts:
        src = dequantize(tensor) if isinstance(tensor, QuantizedTensor) else tensor
        dst = out if rows is None else out.narrow(0, start, rows)
        dst.copy_(src)
    return out


def _repacked(module: nn.Module, wname: str, parts, pieces, layout: WeightLayout) -> nn.Module:
    """A new packed linear over the module's weight with ``parts`` written in."""
    path = wname.rpartition(".")[0]
    shape = layout.shapes[wname]
    covered = sum(shape[0] if r is None else r for _, r, _, _ in parts)
    current = unpack_linear(module) if covered < shape[0] else torch.empty(shape, dtype=torch.float32)
    weight = _assembled(current, parts, torch.float32) if parts else current
    bias = module.bias
    bias_parts = pieces.get(f"{path}.bias")
    if bias_parts:
        base = bias if bias is not None else torch.zeros(shape[0])
        bias = _assembled(base, bias_parts, torch.float32)
    new = packed_linear(weight, bias)
    if new is None:  # cannot happen: the live module was packed from the same kind of weight
        raise RuntimeError(f"could not pack the new weight of {path}")
    return new


def _quantized_weight(module: QuantizedModule, parts) -> dict[str, torch.Tensor]:
    """New qs/d/m of a quantized module, requantized from the parts (the loader's rules:
    a part stored in another format is dequantized and quantized again)."""
    covered = sum(module.out_features if r is None else r for _, r, _, _ in parts)
    qt = module.qweight
    if covered < module.out_features:
        new = {k: t.clone() for k, t in qt.tensors().items()}
    else:
        new = {k: torch.empty_like(t) for k, t in qt.tensors().items()}
    dst_all = QuantizedTensor(qt.fmt, qt.shape, new["qs"], new["d"], new.get("m"))
    for start, rows, _name, src in parts:
        if isinstance(src, QuantizedTensor) and src.fmt != module.fmt:
            src = dequantize(src)
        if not isinstance(src, QuantizedTensor):
            src = quantize(src, module.fmt)
        dst = dst_all if rows is None else dst_all.rows(start, rows)
        for key, t in dst.tensors().items():
            t.copy_(src.tensors()[key])
    return new


# ------------------------------------------------------------------ sources


def read_checkpoint(path: str | Path) -> Iterator[tuple[str, Incoming]]:
    """The tensors of a model directory, a ``.safetensors`` file or a ``.gguf`` file (converted
    to a temporary directory first). ValueError for a path that is none of those."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"weights path {str(path)!r:.200} does not exist")
    if p.is_file() and p.suffix.lower() == ".safetensors":
        yield from Checkpoint([p]).tensors()
        return
    if p.is_file() and p.suffix.lower() == ".gguf":
        from livelm.models.gguf_convert import convert_gguf_to_hf

        with tempfile.TemporaryDirectory(prefix="livelm-update-") as tmp:
            out = convert_gguf_to_hf(p, Path(tmp) / "model")
            yield from Checkpoint(safetensors_files(out)).tensors()
        return
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not any(p.glob("*.safetensors")) and len(ggufs) == 1:
            yield from read_checkpoint(ggufs[0])
            return
        yield from Checkpoint(safetensors_files(p)).tensors()
        return
    raise ValueError(f"weights path {str(path)!r:.200} is not a directory, a .safetensors or a .gguf file")


def tensor_items(tensors: Mapping[str, Incoming] | Iterable[tuple[str, Incoming]]) -> list[tuple[str, Incoming]]:
    """(name, tensor) pairs of a mapping or an iterable of pairs (ValueError otherwise)."""
    if isinstance(tensors, Mapping):
        return list(tensors.items())
    try:
        items = list(tensors)
    except TypeError:
        raise ValueError(f"weights must be a mapping of name to tensor, got {type(tensors).__name__}") from None
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError("weights must be a mapping of name to tensor or (name, tensor) pairs")
    return items


def specs_to_json(specs: list[WeightSpec]) -> bytes:
    """The header a trainer sends before its tensors (JSON: never pickle)."""
    return json.dumps({"tensors": [[s.name, list(s.shape), s.dtype] for s in specs]}).encode()


def specs_from_json(data: bytes) -> list[WeightSpec]:
    """The header's tensor specs; ValueError for anything malformed."""
    try:
        obj = json.loads(data.decode())
        rows = obj["tensors"]
        specs = [WeightSpec(str(n), tuple(int(d) for d in s), str(t)) for n, s, t in rows]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed weight update header: {e}") from None
    if not specs:
        raise ValueError("the update holds no tensors")
    return specs


def numel(shape: tuple[int, ...]) -> int:
    """Elements of a tensor of ``shape``."""
    return math.prod(shape)
