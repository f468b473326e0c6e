"""Turn an API request into :class:`SamplingParams`, rejecting what livelm does not serve."""

from __future__ import annotations

import dataclasses

from livelm.core.request_options import RequestOptions
from livelm.entrypoints.openai.errors import OpenAIError, bad_request_from_value_error
from livelm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
)
from livelm.sampling_params import SamplingParams

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_OPTION_FIELDS = {f.name: f.name for f in dataclasses.fields(RequestOptions)}


def _unsupported(param: str, what: str) -> OpenAIError:
    return OpenAIError(f"{what} is not supported by livelm", 400, param=param, code="unsupported")


def _common_kwargs(req: SamplingRequest) -> dict:
    # None means "the API default", which is not always SamplingParams' default.
    return dict(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=req.seed,
        stop=req.stop or (),
        stop_token_ids=req.stop_token_ids or (),
        include_stop_str_in_output=req.include_stop_str_in_output,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        skip_special_tokens=req.skip_special_tokens,
        extra={
            k: v
            for k, v in (
                ("session_id", req.session_id),
                ("session_ttl", req.session_ttl),
                ("cache_salt", req.cache_salt),
                ("user", req.user),
            )
            if v is not None and v != ""
        },
    )


def _check_common(req: SamplingRequest) -> None:
    if req.logit_bias:
        raise _unsupported("logit_bias", "logit_bias")
    try:  # the engine parses the same options again, after a stream may have started
        RequestOptions(session_id=req.session_id or None, session_ttl=req.session_ttl,
                       cache_salt=req.cache_salt)
    except ValueError as exc:
        raise bad_request_from_value_error(exc, _OPTION_FIELDS, "prompt") from exc
    if req.session_id and req.n > 1:
        raise OpenAIError("a session turn must have n == 1", 400, param="n")
    if req.stream_options is not None and not req.stream:
        raise OpenAIError("stream_options is only allowed when stream is true", 400,
                          param="stream_options")


def _build(kwargs: dict, param_names: dict[str, str], prompt_param: str) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise bad_request_from_value_error(exc, param_names, prompt_param) from exc
    except TypeError as exc:  # a wrong type that pydantic let through (should not happen)
        raise OpenAIError("invalid sampling parameters: check the types of the fields", 400) from exc


def completion_sampling_params(req: CompletionRequest) -> SamplingParams:
    """SamplingParams of a ``/v1/completions`` request (max_tokens defaults to 16)."""
    _check_common(req)
    if req.suffix:
        raise _unsupported("suffix", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise _unsupported("best_of", "best_of different from n")
    kwargs = _common_kwargs(req)
    kwargs["max_tokens"] = 16 if req.max_tokens is None else req.max_tokens
    kwargs["logprobs"] = req.logprobs
    # echo with logprobs returns the prompt's logprobs too, in the same shape.
    kwargs["prompt_logprobs"] = req.logprobs if req.echo and req.logprobs is not None else None
    names = {name: name for name in _SAMPLING_FIELDS} | {"prompt_logprobs": "logprobs"}
    return _build(kwargs, names, "prompt")


def chat_sampling_params(req: ChatCompletionRequest, room: int) -> SamplingParams:
    """SamplingParams of a ``/v1/chat/completions`` request.

    ``room`` is how many tokens fit after the prompt; it is the default ``max_tokens``
    (OpenAI chat generates until the context is full when no limit is given).
    """
    _check_common(req)
    if req.tools:
        raise _unsupported("tools", "tool calling")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise _unsupported("response_format", "structured output (response_format)")
    if req.top_logprobs is not None and not req.logprobs:
        raise OpenAIError("top_logprobs requires logprobs to be true", 400, param="top_logprobs")
    kwargs = _common_kwargs(req)
    limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    kwargs["max_tokens"] = max(room, 1) if limit is None else limit
    kwargs["logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
    names = {name: name for name in _SAMPLING_FIELDS} | {
        "max_tokens": limit_param,
        "logprobs": "top_logprobs",
    }
    return _build(kwargs, names, "messages")


def stream_reply_sampling_params(req: SamplingRequest) -> SamplingParams:
    """SamplingParams of a reply to streamed input (``/v1/stream`` generate events and
    ``/v1/sessions/{id}/generate``): completions' fields and defaults, without ``prompt``.

    The reply forks the input stream's KV, so the per-request session and salt fields do
    not apply (the salt is the stream's, set when it opens).
    """
    _check_common(req)
    for param in ("session_id", "session_ttl", "cache_salt"):
        if getattr(req, param) is not None:
            raise OpenAIError(
                f"{param} does not apply to a reply to streamed input (it shares the input "
                "session's KV; give cache_salt when opening the session)", 400, param=param,
            )
    if getattr(req, "echo", False):
        raise _unsupported("echo", "echo in a reply to streamed input")
    kwargs = _common_kwargs(req)
    kwargs["max_tokens"] = 16 if req.max_tokens is None else req.max_tokens
    kwargs["logprobs"] = getattr(req, "logprobs", None)
    names = {name: name for name in _SAMPLING_FIELDS}
    return _build(kwargs, names, "suffix")
