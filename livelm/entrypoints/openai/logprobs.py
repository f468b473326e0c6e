"""Engine logprobs -> each API's own shape (completions: parallel lists; chat: a list of
token objects with bytes)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from livelm.entrypoints.openai.protocol import (
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)
from livelm.outputs import Logprob, PositionLogprobs

# JSON has no -inf; OpenAI clients expect a float, so clamp as vLLM does.
_MIN_LOGPROB = -9999.0


def _finite(value: float) -> float:
    return max(value, _MIN_LOGPROB) if not math.isnan(value) else _MIN_LOGPROB


class TokenText:
    """The text of single tokens, as logprob entries show them (cached per token id)."""

    def __init__(self, tokenizer: Any) -> None:
        self._decode = lru_cache(maxsize=65536)(
            lambda tid: tokenizer.decode([tid], skip_special_tokens=False)
        )

    def __call__(self, token_id: int, logprob: Logprob | None = None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self._decode(token_id)


def _top(position: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    # The chosen token may sit outside the top k (it is always present), so sort and cut.
    return sorted(position.items(), key=lambda kv: -kv[1].logprob)[:k]


def append_completion_logprobs(
    dest: CompletionLogprobs,
    token_ids: list[int],
    positions: list[PositionLogprobs | None],
    k: int,
    token_text: TokenText,
    text_offset: int,
) -> int:
    """Append tokens to a completions-shaped logprobs object; return the new text offset.

    A ``None`` position (the first prompt token has no logprob) gets ``None`` entries.
    """
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = position.get(token_id) if position else None
        text = token_text(token_id, chosen)
        dest.tokens.append(text)
        dest.token_logprobs.append(None if chosen is None else _finite(chosen.logprob))
        if position is None:
            dest.top_logprobs.append(None)
        else:
            dest.top_logprobs.append(
                {token_text(tid, lp): _finite(lp.logprob) for tid, lp in _top(position, k)}
            )
        dest.text_offset.append(text_offset)
        text_offset += len(text)
    return text_offset


def chat_logprobs(
    token_ids: list[int], positions: list[PositionLogprobs], k: int, token_text: TokenText
) -> list[ChatTokenLogprob]:
    """Chat-shaped logprobs of generated tokens."""
    result = []
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = position.get(token_id)
        text = token_text(token_id, chosen)
        top = [
            TopLogprob(token=(t := token_text(tid, lp)), logprob=_finite(lp.logprob),
                       bytes=list(t.encode("utf-8")))
            for tid, lp in _top(position, k)
        ]
        result.append(
            ChatTokenLogprob(
                token=text,
                logprob=_MIN_LOGPROB if chosen is None else _finite(chosen.logprob),
                bytes=list(text.encode("utf-8")),
                top_logprobs=top,
            )
        )
    return result
