"""What the engine hands back to callers: per-request outputs and their completions."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token at one position, with its rank in the distribution."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# One position: token id -> Logprob (the sampled/actual token plus the top-N alternatives).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with ``n > 1`` has several).

    In a streamed output (``AsyncEngine.generate``) ``text`` and ``token_ids`` are the
    delta since the previous output; in a final output they are the whole completion.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    # RL rollouts (docs/rl.md), one entry per token of ``token_ids``: the weight version
    # that produced it, and (with ``SamplingParams.sampling_logprobs``) its log-probability
    # under the distribution it was drawn from.
    weight_versions: list[int] = field(default_factory=list)
    sampling_logprobs: list[float] | None = None

    @property
    def finished(self) -> bool:
        """True once this sequence has stopped."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt and its completions so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # time.perf_counter() stamps: arrival_time, first_token_time, last_token_time, and
    # num_generated_tokens (see engine/request_state.py: RequestState.metrics).
    metrics: dict[str, float] = field(default_factory=dict)
    # Prompt tokens whose KV was reused (prefix cache or session pin), not computed.
    num_cached_tokens: int = 0
