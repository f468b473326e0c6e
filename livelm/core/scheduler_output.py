"""What passes between the parts of one engine step, through the scheduler.

The scheduler's plan for the runner (:class:`SchedulerOutput` of :class:`ScheduledChunk`),
the runner's results (:class:`ModelRunnerOutput`), and what the scheduler then reports
for each sequence it advanced (:class:`SequenceUpdate`, turned into public
:class:`~livelm.outputs.RequestOutput` deltas by :mod:`livelm.engine.request_state`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from livelm.core.kv_policy import KVPolicy
from livelm.core.request import FinishReason
from livelm.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one request to run this step.

    ``token_ids`` sit at positions ``start_position .. start_position + len(token_ids) - 1``;
    their K/V go into the slots the block table maps those positions to. When ``sample`` is
    true the chunk ends at the request's last known token, so its last logits give the next
    token. ``prompt_logprobs_from`` >= 0 asks for the logprobs of the prompt tokens that
    follow each position of this chunk (only while the chunk lies in the prompt).
    """

    request_id: str
    token_ids: list[int]
    start_position: int
    block_ids: list[int]
    sample: bool
    sampling_params: SamplingParams | None  # None for an input stream's chunks (never sampled)
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed_offset: int = 0
    want_prompt_logprobs: bool = False
    # A sinks request (core/kv_policy.py): its policy, and how many non-sink blocks its
    # logical ``block_ids`` skip (text block i >= sink blocks is ``block_ids[i - that]``);
    # a sliding-window request (no policy here) skips its leading released blocks so.
    kv_policy: KVPolicy | None = None
    num_evicted_blocks: int = 0
    kv_floor: int = 0  # text positions from the sinks up to here are gone (Request.kv_floor)
    # Speculative decoding: tokens drafted to follow the request's last known token. They
    # end ``token_ids`` (counted in the step's budget); the runner verifies them and
    # reports the tokens it accepted, plus one more, in ``ModelRunnerOutput.spec_sampled``.
    draft_token_ids: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Tokens computed for this request this step."""
        return len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """A single caught-up token: the common decode case."""
        return len(self.token_ids) == 1 and self.sample


@dataclass(frozen=True)
class SchedulerOutput:
    """The whole step: chunks to run, and requests whose runner state can be dropped."""

    chunks: list[ScheduledChunk]
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        """Tokens in this step (never above the token budget)."""
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        """Nothing to run."""
        return not self.chunks


@dataclass(frozen=True)
class SampledToken:
    """The runner's result for one request that sampled this step."""

    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_ids: list[int] | None = None
    top_logprobs: list[float] | None = None
    sampling_logprob: float | None = None  # under the sampled distribution (docs/rl.md)


@dataclass(frozen=True)
class PromptLogprobs:
    """Logprobs of prompt tokens computed in one chunk, for positions start..start+len-1."""

    start_index: int  # index in the prompt of the first token these logprobs score
    token_logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass(frozen=True)
class ModelRunnerOutput:
    """Per request id: the sampled token (``spec_sampled``: the tokens, for a chunk with
    drafts), and prompt logprobs when asked; ``failed`` holds the requests the runner could
    not serve this step (nothing sampled for them) and the error each one ends with."""

    sampled: dict[str, SampledToken]
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)
    failed: dict[str, Exception] = field(default_factory=dict)
    # Chunks with drafted tokens: the drafts accepted, then the token that follows them
    # (the target's correction or bonus token), in order.
    spec_sampled: dict[str, list[SampledToken]] = field(default_factory=dict)


@dataclass
class SequenceUpdate:
    """What one step changed in one sequence: new tokens (and logprobs), and whether it
    finished. ``parent_id``/``index`` identify the sequence inside a request with ``n > 1``.
    """

    request_id: str
    parent_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[SampledToken] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    sampling_logprobs: list[float] | None = None  # see SamplingParams.sampling_logprobs
    num_cached_tokens: int = 0  # prompt tokens whose KV was reused at admission

    @property
    def finished(self) -> bool:
        """True when this sequence has stopped."""
        return self.finish_reason is not None
