"""Per-request sampling settings, validated when built."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from livelm.structured_output import StructuredOutput

_GREEDY_EPS = 1e-5

# What one request may ask for (docs/serving.md#request-limits). Numbers must be finite
# everywhere; these bound the rest so that no request can make the sampler's arithmetic
# overflow or make the engine do unbounded work for it.
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
# seed + the sequence's index (n > 1) seeds a torch.Generator, which takes 64 bits.
MAX_SEED = 2**63 - 1
# A stop string is matched against every delta, and the matcher keeps each one's prefixes.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


def is_valid_unicode(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (UTF-8 cannot encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_tuple(name: str, value: object, what: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be {what}, got {value!r:.100}")
    return tuple(value)


def _check_int(name: str, value: object, or_none: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{or_none}, got {value!r:.40}")


def _check_finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r:.40}")
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r:.40}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next tokens of one request and when to stop.

    ``temperature=0`` is greedy decoding. ``top_k=0`` (or -1) and ``top_p=1`` disable those
    filters. ``logprobs=K`` returns the sampled token's log-probability plus the top K
    alternatives (``0`` returns only the sampled one); ``prompt_logprobs`` does the same for
    each prompt token. Log-probabilities are those of the model's raw distribution, before
    temperature, penalties and filters (as in vLLM and OpenAI).

    Every field is checked here, so the Python API and the server refuse the same things
    (a ValueError naming the field and what to fix): numbers must be finite;
    ``temperature`` is in [0, ``MAX_TEMPERATURE`` = 100], ``repetition_penalty`` in
    [0.01, 100]; ``seed`` is an integer in [0, 2**63 - 1] (negative seeds are refused, not
    wrapped); at most ``MAX_STOP_STRINGS`` = 16 stop strings of at most
    ``MAX_STOP_STRING_CHARS`` = 256 characters each, and at most 256 ``stop_token_ids``;
    booleans must be ``bool``, integers ``int`` (not ``bool``). ``structured`` constrains
    the output (:class:`~livelm.structured_output.StructuredOutput`, or a JSON schema dict
    or pydantic model class as shorthand; not with ``ignore_eos`` or ``min_tokens``, since
    the constraint decides where the output ends); whether it compiles is checked when the
    request is added. What depends on the engine
    (``n`` against ``max_n`` and ``max_num_seqs``, stop token ids against the vocabulary)
    is checked by :func:`check_engine_limits` when the request is added.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # RL rollouts (docs/rl.md): each token's log-probability under the distribution it was
    # drawn from (after penalties, temperature and filters; 0.0 for greedy rows).
    sampling_logprobs: bool = False
    structured: StructuredOutput | Any = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Accept a single string or any iterable for the tuple fields (users pass lists).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", _as_tuple("stop", self.stop, "a string or a list of strings"))
        object.__setattr__(self, "stop_token_ids",
                           _as_tuple("stop_token_ids", self.stop_token_ids, "a list of token ids"))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.structured is not None:
            from livelm.structured_output import StructuredOutput  # it imports this module

            object.__setattr__(self, "structured", StructuredOutput.coerce(self.structured))
        self._validate()

    def _validate(self) -> None:
        for name in ("n", "top_k", "min_tokens"):
            _check_int(name, getattr(self, name))
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), " or None")
        for name in ("n", "top_k", "min_tokens", "seed", "max_tokens", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:  # numpy integers become ints
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "sampling_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean (true or false), got {getattr(self, name)!r:.40}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            _check_finite(name, getattr(self, name))
        if self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r:.40}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 means greedy), got {self.temperature!r:.40}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r:.40}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 or -1 disables it), got {self.top_k!r:.40}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r:.40}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] "
                f"(1 disables it), got {self.repetition_penalty!r:.40}"
            )
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r:.40}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r:.40}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r:.40}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r:.40}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise ValueError(f"{name} must be an integer in [0, 20] or None, got {value!r:.40}")
        self._validate_stop()
        self._validate_structured()
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(
                f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r:.40}: use a non-negative "
                "64-bit seed (leave it out for a random one)"
            )

    def _validate_structured(self) -> None:
        # A constraint decides where the output ends: EOS is allowed exactly where the
        # structure is complete, and forced when nothing else may follow. ignore_eos would
        # then loop on EOS, and min_tokens would hold back the only allowed token (the
        # scheduler ends a request on EOS only from min_tokens on): refuse both.
        if self.structured is None:
            return
        if self.ignore_eos:
            raise ValueError(
                "ignore_eos cannot be combined with structured output: the constraint decides "
                "where the output ends (use max_tokens to bound it)"
            )
        if self.min_tokens:
            raise ValueError(
                "min_tokens cannot be combined with structured output: the constraint decides "
                "where the output ends (leave min_tokens at 0)"
            )

    def _validate_stop(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError("stop strings must be non-empty strings")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(
                    f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters each, got one of {len(s)}"
                )
            if not is_valid_unicode(s):
                raise ValueError("stop strings must be valid Unicode text (no lone surrogates)")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}"
            )
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature ~ 0)."""
        return self.temperature < _GREEDY_EPS


def check_engine_limits(params: SamplingParams, *, max_n: int, max_num_seqs: int, vocab_size: int) -> None:
    """Raise ValueError (saying what to fix) for what ``params`` ask beyond one engine's
    limits: ``n`` above its ``max_n`` or above what it runs at once (``max_num_seqs``), or
    a stop token id outside its vocabulary ``[0, vocab_size)``. ``Engine.validate`` and the
    server (before a response starts) both call it."""
    if params.n > max_n:
        raise ValueError(f"n must be at most {max_n} (the engine's max_n), got {params.n}")
    if params.n > max_num_seqs:
        raise ValueError(
            f"n must be at most {max_num_seqs}, the sequences the engine runs at once (max_num_seqs), "
            f"got {params.n}: lower n or raise max_num_seqs"
        )
    bad = next((t for t in params.stop_token_ids if t >= vocab_size), None)
    if bad is not None:
        raise ValueError(f"stop_token_ids: token id {bad} is outside the vocabulary [0, {vocab_size})")
