"""Turn an API request into :class:`SamplingParams`, rejecting what livelm does not serve."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from livelm.core.kv_policy import parse_kv_policy
from livelm.core.request_options import MAX_TENANT_CHARS, RequestOptions
from livelm.entrypoints.openai.errors import OpenAIError, bad_request_from_value_error
from livelm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    SamplingRequest,
    StructuredFields,
)
from livelm.entrypoints.openai.tools import NO_TOOLS, ToolPlan
from livelm.sampling_params import SamplingParams
from livelm.structured_output import StructuredOutput

if TYPE_CHECKING:
    from livelm.entrypoints.openai.streaming_protocol import SessionGenerateRequest

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_OPTION_FIELDS = {f.name: f.name for f in dataclasses.fields(RequestOptions)} | {
    "num_sink_tokens": "num_sink_tokens", "kv_window": "kv_window"}
_KV_POLICY_FIELDS = ("kv_policy", "num_sink_tokens", "kv_window")


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
                ("kv_policy", req.kv_policy),
                ("num_sink_tokens", req.num_sink_tokens),
                ("kv_window", req.kv_window),
                ("speculative_method", req.speculative_method),
                ("num_speculative_tokens", req.num_speculative_tokens),
                ("user", req.user),
                ("priority", req.priority),
                ("tenant", _tenant(req)),
                ("ttft_slo_ms", req.ttft_slo_ms),
                ("tpot_slo_ms", req.tpot_slo_ms),
            )
            if v is not None and v != ""
        },
    )


def _tenant(req: SamplingRequest) -> str | None:
    """The request's tenant: ``tenant``, else OpenAI's ``user`` (end-user id; cut to the
    longest tenant name, so a long ``user`` never makes a request invalid)."""
    if req.tenant:
        return req.tenant
    return req.user[:MAX_TENANT_CHARS] if req.user else None


def _check_common(req: SamplingRequest) -> None:
    if req.logit_bias:
        raise _unsupported("logit_bias", "logit_bias")
    try:  # the engine parses the same options again, after a stream may have started
        RequestOptions(session_id=req.session_id or None, session_ttl=req.session_ttl,
                       cache_salt=req.cache_salt, priority=req.priority, tenant=_tenant(req),
                       ttft_slo_ms=req.ttft_slo_ms, tpot_slo_ms=req.tpot_slo_ms,
                       kv_policy=parse_kv_policy(req.kv_policy, req.num_sink_tokens, req.kv_window),
                       speculative_method=req.speculative_method,
                       num_speculative_tokens=req.num_speculative_tokens)
    except ValueError as exc:
        raise bad_request_from_value_error(exc, _OPTION_FIELDS, "prompt") from exc
    if req.session_id and req.n > 1:
        raise OpenAIError("a session turn must have n == 1", 400, param="n")
    if req.stream_options is not None and not req.stream:
        raise OpenAIError("stream_options is only allowed when stream is true", 400,
                          param="stream_options")


_LEGACY = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_KINDS = ("json", "json_object", "regex", "choice", "grammar")


def _constraints(req: StructuredFields) -> list[tuple[str, dict]]:
    """Every output constraint the request gives: ``(param, StructuredOutput kwargs)``."""
    found: list[tuple[str, dict]] = []
    fmt = req.response_format
    if isinstance(fmt, JsonObjectFormat):
        found.append(("response_format", {"json_object": True}))
    elif isinstance(fmt, JsonSchemaFormat):
        found.append(("response_format", {"json": fmt.json_schema.schema_}))
    so = req.structured_outputs
    if so is not None:
        given = {k: v for k, v in (("json", so.json_), ("json_object", so.json_object or None),
                                   ("regex", so.regex), ("choice", so.choice),
                                   ("grammar", so.grammar)) if v is not None}
        if len(given) != 1:
            raise OpenAIError(f"structured_outputs takes exactly one of {', '.join(_KINDS)}; got "
                              f"{', '.join(given) or 'none'}", 400, param="structured_outputs")
        found.append(("structured_outputs", given))
    for name in _LEGACY:
        value = getattr(req, name)
        if value is not None:  # vLLM's older names: guided_json -> json, ...
            found.append((name, {name.removeprefix("guided_"): value}))
    return found


def structured_output(req: StructuredFields, plan: ToolPlan = NO_TOOLS
                      ) -> tuple[StructuredOutput | None, str | None]:
    """The output constraint of a request and the field it came from: ``response_format``
    (json_object / json_schema), ``structured_outputs``, a legacy ``guided_*`` field, or
    the tool plan (``tool_choice`` required or a named function). More than one is a 400,
    and so are tools offered (tool_choice auto) beside a response format: a constraint
    would keep the model from writing its calls."""
    found = _constraints(req)
    if plan.structured is not None:
        found.insert(0, ("tool_choice", {}))
    elif plan.offered and plan.mode == "auto" and found:
        raise OpenAIError(f"tools with tool_choice 'auto' cannot be combined with {found[0][0]}: "
                          "use tool_choice 'none' or drop the constraint", 400, param=found[0][0])
    if len(found) > 1:
        raise OpenAIError(f"give at most one output constraint; got {found[0][0]} and "
                          f"{found[1][0]}", 400, param=found[1][0])
    if not found:
        return None, None
    param, kwargs = found[0]
    if plan.structured is not None:
        return plan.structured, "tools" if plan.mode == "required" else "tool_choice"
    try:
        return StructuredOutput(**kwargs), param
    except ValueError as exc:
        raise OpenAIError(f"{param}: {exc}", 400, param=param) from exc


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
    kwargs["structured"], param = structured_output(req)
    names = {name: name for name in _SAMPLING_FIELDS} | {"prompt_logprobs": "logprobs",
                                                         "structured": param or "response_format"}
    return _build(kwargs, names, "prompt")


def chat_sampling_params(req: ChatCompletionRequest, room: int,
                         plan: ToolPlan = NO_TOOLS) -> SamplingParams:
    """SamplingParams of a ``/v1/chat/completions`` request.

    ``room`` is how many tokens fit after the prompt; it is the default ``max_tokens``
    (OpenAI chat generates until the context is full when no limit is given). ``plan`` is
    the request's use of tools (:func:`~livelm.entrypoints.openai.tools.tool_plan`).
    """
    _check_common(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise OpenAIError("top_logprobs requires logprobs to be true", 400, param="top_logprobs")
    kwargs = _common_kwargs(req)
    limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    kwargs["max_tokens"] = max(room, 1) if limit is None else limit
    kwargs["logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
    kwargs["structured"], param = structured_output(req, plan)
    if (plan.mode == "auto" and plan.parser is not None and not plan.parser.skip_special_tokens
            and "skip_special_tokens" not in req.model_fields_set):
        kwargs["skip_special_tokens"] = False  # the format's marker is a special token
    names = {name: name for name in _SAMPLING_FIELDS} | {
        "max_tokens": limit_param,
        "logprobs": "top_logprobs",
        "structured": param or "response_format",
    }
    return _build(kwargs, names, "messages")


def stream_reply_sampling_params(req: SessionGenerateRequest) -> SamplingParams:
    """SamplingParams of a reply to streamed input (``/v1/stream`` generate events and
    ``/v1/sessions/{id}/generate``): completions' fields and defaults, without ``prompt``.

    The reply forks the input stream's KV, so the per-request session and salt fields do
    not apply (the salt is the stream's, set when it opens).
    """
    for param in ("session_id", "session_ttl", "cache_salt", *_KV_POLICY_FIELDS):
        if getattr(req, param) is not None:
            raise OpenAIError(
                f"{param} does not apply to a reply to streamed input (it shares the input "
                "session's KV; give cache_salt or kv_policy when opening the session)", 400, param=param,
            )
    _check_common(req)
    if getattr(req, "echo", False):
        raise _unsupported("echo", "echo in a reply to streamed input")
    extra = req.model_extra or {}
    for param in ("tools", "tool_choice"):  # a reply has no chat template to offer tools in
        if extra.get(param) is not None:
            raise _unsupported(param, f"{param} in a reply to streamed input")
    kwargs = _common_kwargs(req)
    kwargs["max_tokens"] = 16 if req.max_tokens is None else req.max_tokens
    kwargs["logprobs"] = getattr(req, "logprobs", None)
    kwargs["structured"], param = structured_output(req)
    names = {name: name for name in _SAMPLING_FIELDS} | {"structured": param or "response_format"}
    return _build(kwargs, names, "suffix")


def constraint_param(req: StructuredFields, plan: ToolPlan = NO_TOOLS) -> str:
    """The request field a 400 about its output constraint names."""
    if plan.structured is not None:
        return "tools" if plan.mode == "required" else "tool_choice"
    found = _constraints(req)
    return found[0][0] if found else "response_format"
