"""``POST /v1/chat/completions``: chat template (tools included), then generation, streamed
or whole; a reply read for tool calls goes through ``tool_stream.ToolCallStream``."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import Response

from livelm.engine.tokenizer import chat_prompt_ids as render_chat
from livelm.entrypoints.openai.choices import ResponseState
from livelm.entrypoints.openai.errors import OpenAIError
from livelm.entrypoints.openai.generation import open_streams
from livelm.entrypoints.openai.logprobs import chat_logprobs
from livelm.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    PromptTokensDetails,
    UsageInfo,
    random_id,
)
from livelm.entrypoints.openai.request_tracker import RequestTracker
from livelm.entrypoints.openai.respond import respond
from livelm.entrypoints.openai.sampling import chat_sampling_params, constraint_param
from livelm.entrypoints.openai.sse import sse_event
from livelm.entrypoints.openai.state import ServerState, off_loop_if_large
from livelm.entrypoints.openai.tool_prompt import (
    fallback_messages,
    native_messages,
    uses_tool_template,
)
from livelm.entrypoints.openai.tool_stream import ToolCallStream
from livelm.entrypoints.openai.tools import NO_TOOLS, ToolPlan, tool_plan
from livelm.outputs import RequestOutput
from livelm.sampling_params import SamplingParams


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates expect them (``developer`` is OpenAI's new ``system``)."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in messages
    ]


def chat_prompt_ids(state: ServerState, messages: list[ChatMessage],
                    plan: ToolPlan = NO_TOOLS) -> list[int]:
    """The prompt token ids of a conversation, with the assistant's turn opened; tools and
    tool messages in the template's own format, or the fallback (tool_prompt.py)."""
    try:
        if not uses_tool_template(messages, plan):
            return list(state.engine.apply_chat_template(template_messages(messages)))
        if state.native_tools:
            tools = list(plan.tools) if plan.offered else None
            return list(render_chat(state.tokenizer, native_messages(messages), tools=tools))
        return list(render_chat(state.tokenizer, fallback_messages(messages, plan)))
    except Exception as exc:  # a template may reject a conversation (e.g. role order)
        raise OpenAIError(f"chat template failed: {exc}", 400, param="messages") from exc


class _ChatStream:
    """Turns engine outputs into chat choices (chunks or a whole response)."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, params: SamplingParams,
                 response_id: str, plan: ToolPlan = NO_TOOLS) -> None:
        self.state = state
        self.req = req
        self.params = params
        self.response_id = response_id
        self.plan = plan
        self.resp = ResponseState(1, params.n)
        self.logprobs: list[list[ChatTokenLogprob]] = [[] for _ in self.resp.choices]
        # Streamed replies read for tool calls: one reader per choice.
        self.tool_streams = ([ToolCallStream(plan) for _ in self.resp.choices]
                             if plan.reads_calls and req.stream else None)

    def chunk(self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        return sse_event(
            ChatCompletionChunk(id=self.response_id, model=self.state.model_name,
                                choices=choices, usage=usage),
            self.req.include_usage,
        )

    def opening(self) -> list[ChatChunkChoice]:
        """Every choice opens with the role, as OpenAI's first chunk does."""
        return [ChatChunkChoice(index=idx, delta=ChatDelta(role="assistant", content=""))
                for idx in range(self.params.n)]

    def start(self, prompt_index: int, out: RequestOutput) -> list[ChatChunkChoice]:
        self.resp.first_sight(prompt_index, out)
        return []

    def deltas(self, prompt_index: int, out: RequestOutput) -> list[ChatChunkChoice]:
        """Content chunks, then a separate empty-delta chunk carrying finish_reason."""
        choices = []
        for delta in out.outputs:
            idx = self.resp.choice_index(prompt_index, delta)
            self.resp.choices[idx].add(delta)
            logprobs = None
            if self.req.logprobs and delta.token_ids:
                content = chat_logprobs(delta.token_ids, list(delta.logprobs or []),
                                        self.params.logprobs or 0, self.state.token_text)
                self.logprobs[idx] += content
                logprobs = ChatLogprobs(content=content)
            if self.tool_streams is None:
                if delta.text or logprobs is not None:
                    choices.append(ChatChunkChoice(index=idx, delta=ChatDelta(content=delta.text),
                                                   logprobs=logprobs))
                reason = delta.finish_reason
            else:
                choices += self._tool_deltas(idx, delta.text, logprobs, delta.finish_reason)
                reason = self.tool_streams[idx].finish_reason(delta.finish_reason)
            if delta.finish_reason is not None:
                choices.append(ChatChunkChoice(index=idx, delta=ChatDelta(), finish_reason=reason))
        return choices

    def _tool_deltas(self, idx: int, text: str, logprobs: ChatLogprobs | None,
                     finish_reason: str | None) -> list[ChatChunkChoice]:
        """Content and tool-call chunks of a reply read for calls (the delta's logprobs
        ride on its first chunk, or on an empty one when its text is held back)."""
        stream = self.tool_streams[idx]
        deltas = stream.feed(text)
        if finish_reason is not None:
            deltas += stream.finish()
        if not deltas and logprobs is not None:
            deltas = [ChatDelta()]
        return [ChatChunkChoice(index=idx, delta=d, logprobs=logprobs if i == 0 else None)
                for i, d in enumerate(deltas)]

    def _message(self, text: str, finish_reason: str | None) -> tuple[ChatResponseMessage, str | None]:
        """The whole message of one choice, read for tool calls when the plan says so
        (through the same reader a stream uses, fed all at once)."""
        if not self.plan.reads_calls:
            return ChatResponseMessage(content=text), finish_reason
        stream = ToolCallStream(self.plan)
        stream.feed(text)
        stream.finish()
        content, calls = stream.message(finish_reason)
        reason = stream.finish_reason(finish_reason) if calls else finish_reason
        return ChatResponseMessage(content=content, tool_calls=calls), reason

    def usage(self) -> UsageInfo:
        prompt = self.resp.prompt_tokens[0]
        completion = self.resp.completion_tokens
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                         total_tokens=prompt + completion,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=self.resp.cached_tokens[0]))

    def whole(self) -> ChatCompletionResponse:
        """The non-streamed response."""
        choices = []
        for c in self.resp.choices:
            message, reason = self._message(c.text, c.finish_reason)
            choices.append(ChatChoice(
                index=c.index,
                message=message,
                logprobs=ChatLogprobs(content=self.logprobs[c.index]) if self.req.logprobs else None,
                finish_reason=reason,
            ))
        return ChatCompletionResponse(id=self.response_id, model=self.state.model_name,
                                      choices=choices, usage=self.usage())


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest,
                                 raw: Request) -> Response:
    """Serve one chat completions request."""
    state.check_model(req.model)
    plan = tool_plan(req, state.tool_parser)
    # Rendering the template costs about as much per message as tokenizing 100 characters
    # (tools: as their JSON).
    size = sum(len(m.text()) + 100 for m in req.messages)
    if plan.offered:
        size += len(json.dumps(plan.tools))
    prompt_ids = await off_loop_if_large(size, lambda: chat_prompt_ids(state, req.messages, plan))
    rolling = req.kv_policy == "sinks"  # a rolling window: not bounded by the context
    state.check_context(len(prompt_ids), None, "messages", rolling)
    room = state.max_model_len if rolling else state.max_model_len - len(prompt_ids)
    params = chat_sampling_params(req, room, plan)
    state.check_params(params)
    await state.check_structured(params, constraint_param(req, plan))
    state.check_context(len(prompt_ids), params.max_tokens, "messages", rolling)
    response_id = random_id("chatcmpl")
    ticket = state.admission.admit(params.n)
    tracker = RequestTracker(state.metrics, response_id, "/v1/chat/completions",
                             state.model_name, req.stream, params.n)
    streams = open_streams(state.engine, [prompt_ids], params, response_id)
    builder = _ChatStream(state, req, params, response_id, plan)
    return await respond(raw, builder, streams, ticket, tracker, "messages")
