"""The batch sampler, by stage; the behaviour it picks ("Choices") is documented in
:mod:`livelm.runner.sampling.sampler`.

- ``batch``: :class:`SamplingBatch` (per-step inputs) and :class:`SamplerOutput`.
- ``token_mask``: :class:`TokenMask`, structured output's allowed tokens as -inf elsewhere.
- ``penalties``: min_tokens suppression, repetition / presence / frequency penalties.
- ``filters``: temperature, and top-k / top-p / min-p as per-row logit thresholds.
- ``draw``: the inverse-CDF draw, among top candidates or over whole rows.
- ``logprobs``: logprobs, ranks and top-K alternatives from the raw logits.
- ``sampler``: :class:`Sampler`, which composes them.
- ``rows``: row gather / scatter shared by the stages.
"""

from livelm.runner.sampling.batch import SamplerOutput, SamplingBatch
from livelm.runner.sampling.sampler import Sampler

__all__ = ["Sampler", "SamplerOutput", "SamplingBatch"]
