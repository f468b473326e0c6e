"""Pydantic models of the OpenAI API requests and responses that livelm serves.

Requests accept unknown fields and ignore them (clients send fields of newer API versions),
except the documented livelm extras: ``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``min_tokens``, ``stop_token_ids``, ``skip_special_tokens``,
``include_stop_str_in_output``, ``session_id``, ``session_ttl``, ``cache_salt``, the
scheduling fields (``priority``, ``tenant``, ``ttft_slo_ms``, ``tpot_slo_ms``),
``speculative_method``, ``num_speculative_tokens`` and the
structured-output fields (``structured_outputs`` and vLLM's legacy ``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar``). Value ranges are checked by
:class:`~livelm.sampling_params.SamplingParams`, so the API and the Python engine agree.

Types are checked here, strictly enough that nothing odd reaches the engine: numbers must
be finite (no ``NaN``/``Infinity``), booleans must be JSON ``true``/``false`` (not
``"yes"`` or ``1``), integers must not be booleans, and text must be valid Unicode (a lone
surrogate such as ``"\ud800"`` is refused with a 400 naming the field).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from livelm.sampling_params import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, is_valid_unicode
from livelm.structured_output import MAX_CHOICES

# The most prompts one completions request may list, and messages one conversation may
# hold (docs/serving.md#request-limits): longer lists are refused before any work on them.
MAX_PROMPTS = 2048
MAX_MESSAGES = 8192
# Tools one request may offer (OpenAI's own limit), the length of a function's
# description, and the tool calls one assistant message of the history may hold.
MAX_TOOLS = 128
MAX_DESCRIPTION_CHARS = 8192
MAX_TOOL_CALLS = 128
# OpenAI's rule for function and schema names.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"

# "abort" only reaches a client when the server shuts down under it.
FinishReason = Literal["stop", "length", "abort", "tool_calls"]


def random_id(prefix: str) -> str:
    """An OpenAI-looking id such as ``cmpl-1f0c...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _valid_text(value: str) -> str:
    if not is_valid_unicode(value):
        raise PydanticCustomError(
            "unicode_invalid", "text is not valid Unicode (it holds a lone surrogate): send UTF-8 text"
        )
    return value


def _no_bool(kind: str) -> Any:
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticCustomError(f"{kind}_type", f"Input should be a valid {kind}, not a boolean")
        return value

    return BeforeValidator(check)


# Field types of the requests: text that UTF-8 can encode, integers and numbers that are
# not booleans (lax pydantic reads true as 1), and booleans that are booleans.
Text = Annotated[str, AfterValidator(_valid_text)]
Int = Annotated[int, _no_bool("integer")]
Float = Annotated[float, _no_bool("number")]
Bool = StrictBool


def _prompt_shape(value: Any) -> str | None:
    # One union member per shape, chosen by looking at the value: pydantic then validates
    # only that member (trying all four on a list of two million token-id lists reports
    # millions of errors and takes seconds).
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        first = value[0] if value else 0
        if isinstance(first, str):
            return "list[str]"
        return "list[list[int]]" if isinstance(first, list) else "list[int]"
    return None


Prompt = Annotated[
    Annotated[Text, Tag("str")]
    | Annotated[list[Text], Field(max_length=MAX_PROMPTS), Tag("list[str]")]
    | Annotated[list[Int], Tag("list[int]")]
    | Annotated[list[list[Int]], Field(max_length=MAX_PROMPTS), Tag("list[list[int]]")],
    Discriminator(
        _prompt_shape,
        custom_error_type="prompt_type",
        custom_error_message="Input should be a string, a list of strings, a list of token ids "
        "or a list of token-id lists",
    ),
]


class OpenAIModel(BaseModel):
    """Base of every request: unknown fields are accepted and ignored; floats must be
    finite."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(OpenAIModel):
    """``stream_options``: ``include_usage`` adds a last chunk with usage and no choices."""

    include_usage: Bool = False


Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Description = Annotated[Text, Field(max_length=MAX_DESCRIPTION_CHARS)]
# A JSON schema as sent (its values are checked when it is compiled, see
# livelm/structured_output.py: no NaN, bounded size).
Schema = dict[str, Any]
Choices = Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)]


class TextFormat(OpenAIModel):
    """``response_format: {"type": "text"}``: no constraint."""

    type: Literal["text"]


class JsonObjectFormat(OpenAIModel):
    """``response_format: {"type": "json_object"}``: any JSON object."""

    type: Literal["json_object"]


class JsonSchemaSpec(OpenAIModel):
    """``response_format.json_schema``: a named JSON schema the output must match."""

    name: Name
    description: Description | None = None
    schema_: Schema = Field(alias="schema")
    strict: Bool | None = None


class JsonSchemaFormat(OpenAIModel):
    """``response_format: {"type": "json_schema", "json_schema": {...}}``."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


_FORMATS = {"text": "TextFormat", "json_object": "JsonObjectFormat", "json_schema": "JsonSchemaFormat"}


def _format_tag(value: Any) -> str | None:
    # Tags named like the classes keep the member out of a 400's param (errors.py drops
    # capitalised path parts): "response_format.json_schema.name", not "....json_schema...".
    if isinstance(value, dict):
        return _FORMATS.get(value.get("type"))  # type: ignore[arg-type]
    return type(value).__name__ if isinstance(value, BaseModel) else None


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("TextFormat")]
    | Annotated[JsonObjectFormat, Tag("JsonObjectFormat")]
    | Annotated[JsonSchemaFormat, Tag("JsonSchemaFormat")],
    Discriminator(
        _format_tag,
        custom_error_type="response_format_type",
        custom_error_message='response_format must be {"type": "text"}, {"type": "json_object"} or '
        '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
    ),
]


class StructuredOutputs(OpenAIModel):
    """vLLM's ``structured_outputs``: exactly one of ``json`` (a schema), ``json_object``,
    ``regex``, ``choice`` or ``grammar`` (Lark syntax). Unknown keys are refused, so a
    constraint livelm does not serve is never dropped silently."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    json_: Schema | Text | None = Field(None, alias="json")
    json_object: Bool | None = None
    regex: Text | None = None
    choice: Choices | None = None
    grammar: Text | None = None


class StructuredFields(OpenAIModel):
    """The fields that constrain the output, shared by completions and chat (at most one
    of them per request; see ``sampling.structured_output``)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older names of structured_outputs' fields.
    guided_json: Schema | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Choices | None = None
    guided_grammar: Text | None = None


class SamplingRequest(OpenAIModel):
    """Fields shared by completions and chat completions."""

    model: Text | None = None
    max_tokens: Int | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: Int | None = None
    min_p: Float | None = None
    n: Int = 1
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[Int], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    seed: Int | None = None
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    repetition_penalty: Float | None = None
    ignore_eos: Bool = False
    min_tokens: Int = 0
    skip_special_tokens: Bool = True
    include_stop_str_in_output: Bool = False
    logit_bias: dict[str, Float] | None = None
    user: Text | None = None
    # A session's KV stays pinned for session_ttl seconds after the turn (default: the
    # engine's); requests with different cache_salt values never share KV.
    session_id: Text | None = None
    session_ttl: Float | None = None
    cache_salt: Text | None = None
    # Scheduling (docs/scheduling.md): priority under --scheduling-policy priority, the
    # tenant the fair policy balances (default: ``user``), latency targets in ms.
    priority: Int | None = None
    tenant: Text | None = None
    ttft_slo_ms: Float | None = None
    tpot_slo_ms: Float | None = None
    # What the request keeps in its KV (docs/attention_sinks.md): "full" (the default) or
    # "sinks": the first num_sink_tokens (default 4) and the last kv_window tokens.
    kv_policy: Literal["full", "sinks"] | None = None
    num_sink_tokens: StrictInt | None = None  # strict: "32" or 32.0 is a 400, not a window
    kv_window: StrictInt | None = None
    # Speculative decoding for this request (docs/speculative_decoding.md): "ngram",
    # "suffix", "draft" (needs the server's --speculative-draft-model) or "off", and the most tokens drafted per step; None keeps the server's.
    speculative_method: Text | None = None
    num_speculative_tokens: Int | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(StructuredFields, SamplingRequest):
    """``POST /v1/completions``."""

    prompt: Prompt
    echo: Bool = False
    logprobs: Int | None = None
    suffix: Text | None = None
    best_of: Int | None = None


class TextContentPart(OpenAIModel):
    """One part of a message's content; only text is served."""

    type: Literal["text"]
    text: Text


class FunctionCallText(OpenAIModel):
    """The function of a tool call in the history: its name and arguments (JSON text)."""

    name: Text
    arguments: Text


class MessageToolCall(OpenAIModel):
    """One tool call of an assistant message in the history."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCallText


class ChatMessage(OpenAIModel):
    """One message of a conversation: ``tool`` messages answer the call named by
    ``tool_call_id``; assistant messages may carry ``tool_calls`` (content then null)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextContentPart] | None = None
    name: Text | None = None
    tool_calls: Annotated[list[MessageToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None
    tool_call_id: Text | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError(
                "tool_call_id_missing",
                "a tool message needs tool_call_id: the id of the tool call it answers",
            )
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("tool_calls_role", "only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class FunctionDefinition(OpenAIModel):
    """A function the model may call: its name, what it does, its parameters' schema."""

    name: Name
    description: Description | None = None
    parameters: Schema | None = None
    strict: Bool | None = None


class ToolDefinition(OpenAIModel):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    """The function ``tool_choice`` names."""

    name: Text


class NamedToolChoice(OpenAIModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: NamedFunction


def _tool_choice_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "Mode"
    return "NamedToolChoice" if isinstance(value, dict | NamedToolChoice) else None


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("Mode")]
    | Annotated[NamedToolChoice, Tag("NamedToolChoice")],
    Discriminator(
        _tool_choice_tag,
        custom_error_type="tool_choice_type",
        custom_error_message='tool_choice must be "none", "auto", "required" or {"type": "function", '
        '"function": {"name": ...}}',
    ),
]


class ChatCompletionRequest(StructuredFields, SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Int | None = None
    logprobs: Bool = False
    top_logprobs: Int | None = None
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: Bool | None = None


class TokenizeRequest(OpenAIModel):
    """``POST /tokenize``: either ``prompt`` or ``messages`` (chat template applied)."""

    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: Bool = True


class DetokenizeRequest(OpenAIModel):
    """``POST /detokenize``."""

    model: Text | None = None
    tokens: list[Int]


# ----------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    """OpenAI's breakdown of the prompt tokens: those whose KV was reused from the prefix
    cache or a session's pin (not computed again)."""

    cached_tokens: int = 0


class UsageInfo(BaseModel):
    """Token counts of one response."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """Logprobs in the legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One choice of a completion (or its delta in a stream)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or one chunk of a streamed one (same object type in both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    """One alternative token at a position (chat shape)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    """The chosen token at a position with its alternatives (chat shape)."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """``choices[i].logprobs`` of a chat response."""

    content: list[ChatTokenLogprob] | None = None


def _drop_none(data: dict, keys: tuple[str, ...] | None = None) -> dict:
    return {k: v for k, v in data.items() if v is not None or (keys is not None and k not in keys)}


class FunctionCall(BaseModel):
    """The function of a tool call in a response: ``arguments`` is JSON text."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One tool call of a response message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    """The assistant message of a non-streamed chat choice (``content`` is null when the
    message is only tool calls; ``tool_calls`` is left out when there are none)."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict:
        return _drop_none(handler(self), ("tool_calls",))


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    """A whole chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunctionCall(BaseModel):
    """A piece of a streamed tool call's function: its name (first chunk only) and a
    fragment of its arguments."""

    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict:
        return _drop_none(handler(self))


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: ``id`` and ``type`` only in its first chunk."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict:
        return _drop_none(handler(self))


class ChatDelta(BaseModel):
    """What one chunk adds to a message; absent fields are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict:
        return _drop_none(handler(self))


class ChatChunkChoice(BaseModel):
    """One choice of a streamed chat chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "livelm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class SessionDeleted(BaseModel):
    """``DELETE /v1/sessions/{id}``: ``deleted`` is false when nothing was pinned."""

    id: str
    object: Literal["session"] = "session"
    deleted: bool


class TokenizeResponse(BaseModel):
    """``POST /tokenize``."""

    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    """``POST /detokenize``."""

    prompt: str
