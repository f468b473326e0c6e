"""The sampler's per-step input (:class:`SamplingBatch`) and output (:class:`SamplerOutput`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livelm.runner.sampling.token_mask import TokenMask
from livelm.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """Per-step sampling inputs, built by the model runner: row ``i`` is one sequence.

    ``eos_token_ids[i]`` and the row's ``stop_token_ids`` are suppressed while the row has
    fewer than ``min_tokens`` output tokens (the runner passes an empty set for
    ``ignore_eos`` requests). ``generators[i]`` is the request's own generator (on the
    logits' device) when it has a seed, else ``None``. ``token_mask`` holds the tokens the
    constrained rows may take (structured output), ``None`` when no row is constrained.
    """

    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    generators: list[torch.Generator | None]
    eos_token_ids: list[set[int]]
    token_mask: TokenMask | None = None


@dataclass
class SamplerOutput:
    """Sampled tokens of one step and, when any row asked, their raw-distribution logprobs.

    The logprob tensors are ``None`` when no row asked (``params.logprobs is None`` on every
    row); ``top_ids`` / ``top_logprobs`` are also ``None`` when the largest ``logprobs`` asked
    is 0. ``K`` is the largest ``logprobs`` over the rows; a row that asked for fewer reads
    its first ``params.logprobs`` columns. Rows that did not ask hold filler: NaN logprob,
    rank 0, top id -1, top logprob NaN.
    """

    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None = None  # [N] float32, log-softmax of raw logits at the token
    ranks: torch.Tensor | None = None  # [N] int64, 1-based rank of the token in raw logits
    top_ids: torch.Tensor | None = None  # [N, K] int64
    top_logprobs: torch.Tensor | None = None  # [N, K] float32
    # [N] float32 when a row set ``sampling_logprobs``: log-probability of the token under the
    # distribution it was drawn from (runner/sampling/sampling_logprobs.py); NaN elsewhere.
    sampling_logprobs: torch.Tensor | None = None
