"""What every route handler shares: the engine, the config, metrics and admission."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from livelm.config import EngineConfig
from livelm.core.request_options import RequestOptions
from livelm.core.speculative.config import check_draft_model_given
from livelm.entrypoints.openai.admission import AdmissionControl
from livelm.entrypoints.openai.config import ServerConfig
from livelm.entrypoints.openai.errors import OpenAIError, bad_request_from_value_error
from livelm.entrypoints.openai.logprobs import TokenText
from livelm.entrypoints.openai.metrics import ServerMetrics
from livelm.entrypoints.openai.tool_parsers import ToolParser
from livelm.sampling_params import SamplingParams, check_engine_limits

T = TypeVar("T")

# Tokenizing this many characters takes long enough (milliseconds) to stall every other
# stream on the event loop; smaller prompts are cheaper than a thread hop.
_OFF_LOOP_CHARS = 16_384


async def off_loop_if_large(size: int, work: Callable[[], T]) -> T:
    """Run CPU-bound ``work`` (tokenization) in a worker thread when ``size`` is large."""
    if size < _OFF_LOOP_CHARS:
        return work()
    return await asyncio.to_thread(work)


@dataclass
class ServerState:
    """The objects behind one app (kept on ``app.state.livelm``)."""

    engine: Any
    config: ServerConfig
    model_name: str
    metrics: ServerMetrics
    admission: AdmissionControl
    token_text: TokenText
    # The parser of the model's own tool-call format (tool_choice "auto"; None: calls are
    # not parsed) and whether the chat template renders tools itself (else the fallback
    # prompt of tool_prompt.py).
    tool_parser: type[ToolParser] | None = None
    native_tools: bool = False

    @property
    def tokenizer(self) -> Any:
        """The engine's Hugging Face tokenizer."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """Longest prompt + completion the engine accepts."""
        return int(self.engine.max_model_len)

    def check_model(self, name: str | None) -> None:
        """Raise a 404 unless ``name`` is the served model (a missing name means it)."""
        if name is not None and name != self.model_name:
            raise OpenAIError(
                f"The model `{name if len(name) <= 80 else name[:80] + '...'}` does not exist; "
                f"this server serves `{self.model_name}`.",
                404,
                "not_found_error",
                param="model",
                code="model_not_found",
            )

    @property
    def vocab_size(self) -> int:
        """Token ids must be below this."""
        return max(len(self.tokenizer), int(getattr(self.engine, "vocab_size", 0) or 0))

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        """Reject token ids the model cannot embed (they would crash the engine step)."""
        vocab = self.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            shown = ", ".join(str(t) if abs(t) < 2**64 else "(a huge integer)" for t in bad[:5])
            raise OpenAIError(
                f"token ids must be in [0, {vocab}); got [{shown}]", 400, param=param
            )

    def check_params(self, params: SamplingParams, n_param: str = "n") -> None:
        """400 for what ``params`` ask beyond the engine's limits (``n`` above ``max_n`` or
        ``max_num_seqs``, stop token ids outside the vocabulary): the engine would refuse
        them too, but only once a streamed response has started. A 503 when the engine has
        stopped, for the same reason: a stream would only carry the error as an event."""
        if not getattr(self.engine, "is_alive", True):
            reason = getattr(self.engine, "dead_reason", None) or "it was shut down"
            raise OpenAIError(f"the engine stopped: {reason}", 503, "service_unavailable",
                              code="engine_stopped")
        config = getattr(self.engine, "config", None)
        defaults = EngineConfig()
        try:
            check_engine_limits(
                params,
                max_n=getattr(config, "max_n", defaults.max_n),
                max_num_seqs=getattr(config, "max_num_seqs", defaults.max_num_seqs),
                vocab_size=self.vocab_size,
            )
        except ValueError as exc:
            raise bad_request_from_value_error(
                exc, {"n": n_param, "stop_token_ids": "stop_token_ids"}, "prompt"
            ) from exc
        try:  # a per-request "draft" needs the server's draft model
            check_draft_model_given(params.extra.get("speculative_method"),
                                    getattr(config, "speculative_draft_model", None))
        except ValueError as exc:
            raise OpenAIError(str(exc), 400, param="speculative_method") from exc
        check_policy = getattr(self.engine, "check_kv_policy", None)
        if check_policy is not None:
            try:  # the window against the model (block size, context, rotary type, pool)
                check_policy(RequestOptions.from_extra(params.extra).kv_policy)
            except ValueError as exc:
                raise bad_request_from_value_error(
                    exc, {"kv_window": "kv_window", "num_sink_tokens": "num_sink_tokens", "kv_policy": "kv_policy"},
                    "prompt") from exc

    async def check_structured(self, params: SamplingParams, param: str) -> None:
        """400 naming ``param`` for an output constraint that does not compile (an invalid
        JSON schema, regex or grammar), before any compute. The engine compiles it in a
        worker thread (compiled grammars are cached, so the request's own compile later is
        free)."""
        check = getattr(self.engine, "check_structured", None)
        if params.structured is None or check is None:
            return
        try:
            await asyncio.to_thread(check, params.structured)
        except ValueError as exc:
            message = str(exc) if len(str(exc)) <= 2000 else str(exc)[:2000] + "..."
            raise OpenAIError(f"{param}: {message}", 400, param=param,
                              code="invalid_structured_output") from exc

    def prompt_ids(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a prompt, exactly as the engine would make them."""
        if isinstance(prompt, list):
            self.check_token_ids(prompt, param)
            return prompt
        if not prompt:
            raise OpenAIError(f"{param} must not be empty", 400, param=param)
        encode = getattr(self.engine, "encode", None)
        return list(encode(prompt) if encode else self.tokenizer(prompt).input_ids)

    def check_context(self, num_prompt_tokens: int, max_tokens: int | None, param: str,
                      rolling: bool = False) -> None:
        """400 with the numbers when prompt + completion cannot fit the context (never for a
        ``rolling`` request, kv_policy "sinks": its window rolls on past the context)."""
        if rolling:
            return
        limit = self.max_model_len
        wanted = num_prompt_tokens + (max_tokens or 0)
        if num_prompt_tokens < limit and wanted <= limit:
            return
        what = "messages" if param == "messages" else "prompt"
        detail = f"{num_prompt_tokens} in the {what}"
        if max_tokens:
            detail += f", {max_tokens} for the completion"
        raise OpenAIError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{wanted} tokens ({detail}). Please reduce the length of the {what}"
            + (" or max_tokens." if max_tokens else "."),
            400, param=param, code="context_length_exceeded",
        )
