"""``POST /v1/chat/completions``: chat template, then generation, streamed or whole."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

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
    UsageInfo,
    random_id,
)
from livelm.entrypoints.openai.request_tracker import RequestTracker
from livelm.entrypoints.openai.respond import respond
from livelm.entrypoints.openai.sampling import chat_sampling_params
from livelm.entrypoints.openai.sse import sse_event
from livelm.entrypoints.openai.state import ServerState, off_loop_if_large
from livelm.outputs import RequestOutput
from livelm.sampling_params import SamplingParams


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates expect them (``developer`` is OpenAI's new ``system``)."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in messages
    ]


def chat_prompt_ids(state: ServerState, messages: list[ChatMessage]) -> list[int]:
    """The prompt token ids of a conversation, with the assistant's turn opened."""
    try:
        return list(state.engine.apply_chat_template(template_messages(messages)))
    except Exception as exc:  # a template may reject a conversation (e.g. role order)
        raise OpenAIError(f"chat template failed: {exc}", 400, param="messages") from exc


class _ChatStream:
    """Turns engine outputs into chat choices (chunks or a whole response)."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, params: SamplingParams,
                 response_id: str) -> None:
        self.state = state
        self.req = req
        self.params = params
        self.response_id = response_id
        self.resp = ResponseState(1, params.n)
        self.logprobs: list[list[ChatTokenLogprob]] = [[] for _ in self.resp.choices]

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
            if delta.text or logprobs is not None:
                choices.append(ChatChunkChoice(index=idx, delta=ChatDelta(content=delta.text),
                                               logprobs=logprobs))
            if delta.finish_reason is not None:
                choices.append(ChatChunkChoice(index=idx, delta=ChatDelta(),
                                               finish_reason=delta.finish_reason))
        return choices

    def usage(self) -> UsageInfo:
        prompt = self.resp.prompt_tokens[0]
        completion = self.resp.completion_tokens
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                         total_tokens=prompt + completion)

    def whole(self) -> ChatCompletionResponse:
        """The non-streamed response."""
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=ChatLogprobs(content=self.logprobs[c.index]) if self.req.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for c in self.resp.choices
        ]
        return ChatCompletionResponse(id=self.response_id, model=self.state.model_name,
                                      choices=choices, usage=self.usage())


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest,
                                 raw: Request) -> Response:
    """Serve one chat completions request."""
    state.check_model(req.model)
    # Rendering the template costs about as much per message as tokenizing 100 characters.
    size = sum(len(m.text()) + 100 for m in req.messages)
    prompt_ids = await off_loop_if_large(size, lambda: chat_prompt_ids(state, req.messages))
    state.check_context(len(prompt_ids), None, "messages")
    params = chat_sampling_params(req, state.max_model_len - len(prompt_ids))
    state.check_params(params)
    state.check_context(len(prompt_ids), params.max_tokens, "messages")
    response_id = random_id("chatcmpl")
    ticket = state.admission.admit(params.n)
    tracker = RequestTracker(state.metrics, response_id, "/v1/chat/completions",
                             state.model_name, req.stream, params.n)
    streams = open_streams(state.engine, [prompt_ids], params, response_id)
    builder = _ChatStream(state, req, params, response_id)
    return await respond(raw, builder, streams, ticket, tracker, "messages")
