"""Rotary position embeddings: the scaling types transformers defines (default, linear,
dynamic NTK, llama3, YaRN, LongRoPE), computed with transformers' own fp32 arithmetic.

The tables are precomputed for every position up to the engine's limit, so a position's
rotation never depends on what else is in the batch. Two types depend on sequence length
in transformers, which recomputes its frequencies whenever a forward call reaches further:

* ``dynamic``: position ``p`` uses the frequencies transformers computes for
  ``seq_len = max(p + 1, max_position_embeddings)``.
* ``longrope``: position ``p`` uses the short factors below
  ``original_max_position_embeddings`` and the long factors from there on.

That is exactly what transformers does when a sequence is prefilled within the original
context and then decoded one token per call past it (each key is rotated once, as it is
first computed). Where transformers differs: one forward call whose last position is past
the original context rotates *every* token of that call with the longer frequencies
(including earlier positions), and its dynamic frequencies also remember the longest call
seen so far (a stateful cache). livelm rotates each position the same way in every
request, which chunked prefill, prefix caching and preemption need.
"""

from __future__ import annotations

import math

import torch

from livelm.layers.rotary import apply_rotary  # noqa: F401 - the models' name for it
from livelm.models.model_config import RopeConfig


def rotary_dim(head_dim: int, rope: RopeConfig) -> int:
    """How many leading dimensions of each head are rotated (``partial_rotary_factor``)."""
    return int(head_dim * rope.partial_rotary_factor)


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Per-pair rotation frequencies of the static types (fp32, as transformers computes
    them); for ``dynamic`` those within the original context, for ``longrope`` the short
    ones."""
    dim = rotary_dim(head_dim, rope)
    if rope.rope_type == "yarn":
        return _yarn(dim, rope)
    if rope.rope_type == "longrope":
        return _longrope(dim, rope, rope.short_factor)
    inv_freq = 1.0 / (rope.theta ** _exponents(dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    return inv_freq


def attention_factor(rope: RopeConfig) -> float:
    """The factor transformers multiplies cos and sin by (YaRN's and LongRoPE's mscale)."""
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.rope_type == "yarn":
        factor = _yarn_factor(rope)
        if rope.mscale and rope.mscale_all_dim:
            return float(_yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim))
        return _yarn_mscale(factor)
    if rope.rope_type == "longrope":
        factor = rope.factor if rope.factor_given else rope.max_position_embeddings / rope.original_max_position_embeddings
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(rope.original_max_position_embeddings))
    return 1.0


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn_factor(rope: RopeConfig) -> float:
    if rope.factor_given:
        return rope.factor
    return rope.max_position_embeddings / rope.original_max_position_embeddings


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, rope: RopeConfig) -> torch.Tensor:
    # Dimensions that rotate many times within the original context keep their frequency
    # (extrapolation), slow ones are divided by `factor` (interpolation), a linear ramp
    # between the two correction dimensions.
    base, factor = rope.theta, _yarn_factor(rope)
    old_len = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def _longrope(dim: int, rope: RopeConfig, factors: tuple[float, ...]) -> torch.Tensor:
    ext = torch.tensor(factors, dtype=torch.float32)
    return 1.0 / (ext * rope.theta ** _exponents(dim))


def _dynamic(dim: int, rope: RopeConfig, seq_len: int) -> torch.Tensor:
    # transformers' dynamic update passes seq_len as a 0-dim int64 tensor, so this part is
    # fp32 tensor arithmetic there; the same ops here give the same bits.
    seq = torch.maximum(torch.tensor(seq_len), torch.tensor(rope.max_position_embeddings))
    base = rope.theta * ((rope.factor * seq / rope.max_position_embeddings) - (rope.factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _exponents(dim))


def rotary_tables(head_dim: int, max_positions: int, rope: RopeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_positions, rotary_dim / 2] in fp32, times the attention factor."""
    dim = rotary_dim(head_dim, rope)
    t = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(t, inverse_frequencies(head_dim, rope))
    if rope.rope_type == "longrope" and max_positions > rope.original_max_position_embeddings:
        start = rope.original_max_position_embeddings
        freqs[start:] = torch.outer(t[start:], _longrope(dim, rope, rope.long_factor))
    elif rope.rope_type == "dynamic":
        # One set of frequencies per position past the original context (a loop: the
        # fp32 ops must be the scalar ones transformers runs; ~20 us a position).
        for p in range(rope.max_position_embeddings, max_positions):
            freqs[p] = t[p] * _dynamic(dim, rope, p + 1)
    scale = attention_factor(rope)
    return freqs.cos() * scale, freqs.sin() * scale


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables, applied to q and k at arbitrary token positions."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim(head_dim, rope)
        # Always computed on the CPU (then moved with the module): built under
        # torch.device("meta"), as the loader builds the model, these few ops would load
        # torch's meta kernels, 1.3 s of every start-up.
        with torch.device("cpu"):
            # Only one half is stored: transformers' cos/sin tables repeat it twice.
            cos, sin = rotary_tables(head_dim, max_positions, rope)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, rotary_dim/2] for a batch's positions (computed once per step)."""
        return (
            self.cos[positions].unsqueeze(1).to(dtype),
            self.sin[positions].unsqueeze(1).to(dtype),
        )

