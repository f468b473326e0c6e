"""``POST /v1/completions``: text completion, streamed or whole, with echo and logprobs."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from livelm.entrypoints.openai.choices import ResponseState
from livelm.entrypoints.openai.errors import OpenAIError
from livelm.entrypoints.openai.generation import EngineStream, open_streams
from livelm.entrypoints.openai.logprobs import append_completion_logprobs
from livelm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    UsageInfo,
    random_id,
)
from livelm.entrypoints.openai.request_tracker import RequestTracker
from livelm.entrypoints.openai.respond import respond
from livelm.entrypoints.openai.sampling import completion_sampling_params, constraint_param
from livelm.entrypoints.openai.sse import sse_event
from livelm.entrypoints.openai.state import ServerState, off_loop_if_large
from livelm.outputs import RequestOutput
from livelm.sampling_params import SamplingParams


def _prompts(state: ServerState, prompt: str | list) -> list[str | list[int]]:
    """Normalise the four accepted prompt shapes to a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIError("prompt must not be empty", 400, param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompts: list = [list(prompt)]
    else:
        prompts = list(prompt)
    for p in prompts:
        if isinstance(p, list):
            if not p:
                raise OpenAIError("prompt must not be empty", 400, param="prompt")
            state.check_token_ids(p, "prompt")
    return prompts


class _CompletionStream:
    """Turns engine outputs into completion choices (chunks or a whole response)."""

    def __init__(self, state: ServerState, req: CompletionRequest, params: SamplingParams,
                 prompts: list[str | list[int]], num_prompts: int, response_id: str) -> None:
        self.state = state
        self.req = req
        self.params = params
        self.prompts = prompts
        self.response_id = response_id
        self.resp = ResponseState(num_prompts, params.n)
        self.want_logprobs = req.logprobs is not None
        self.logprobs = [CompletionLogprobs() for _ in self.resp.choices]
        self.text_offset = [0] * len(self.resp.choices)

    def chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        return sse_event(
            CompletionResponse(id=self.response_id, model=self.state.model_name,
                               choices=choices, usage=usage),
            self.req.include_usage,
        )

    def opening(self) -> list[CompletionChoice]:
        return []

    def start(self, prompt_index: int, out: RequestOutput) -> list[CompletionChoice]:
        """The echoed prompt's choices on its first output when ``req.echo``."""
        if self.resp.first_sight(prompt_index, out) and self.req.echo:
            return self.echo(prompt_index, out)
        return []

    def _prompt_text(self, prompt_index: int, out: RequestOutput) -> str:
        prompt = self.prompts[prompt_index]
        if isinstance(prompt, str):
            return prompt
        return out.prompt if out.prompt is not None else self.state.tokenizer.decode(prompt)

    def echo(self, prompt_index: int, out: RequestOutput) -> list[CompletionChoice]:
        """The prompt (and its logprobs) as the start of each of its choices."""
        text = self._prompt_text(prompt_index, out)
        choices = []
        for j in range(self.params.n):
            idx = prompt_index * self.params.n + j
            logprobs = None
            if self.want_logprobs:
                positions = list(out.prompt_logprobs or [None] * len(out.prompt_token_ids))
                logprobs = CompletionLogprobs()
                append_completion_logprobs(
                    logprobs, list(out.prompt_token_ids), positions, self.req.logprobs or 0,
                    self.state.token_text, 0,
                )
                _extend(self.logprobs[idx], logprobs)
            # Generated text starts where the echoed prompt ends (token texts need not add
            # up to it exactly: a token may be part of a UTF-8 character).
            self.text_offset[idx] = len(text)
            self.resp.choices[idx].text_parts.append(text)
            choices.append(CompletionChoice(index=idx, text=text, logprobs=logprobs))
        return choices

    def deltas(self, prompt_index: int, out: RequestOutput) -> list[CompletionChoice]:
        """One choice per sequence that produced something (text, tokens or its end)."""
        choices = []
        for delta in out.outputs:
            idx = self.resp.choice_index(prompt_index, delta)
            self.resp.choices[idx].add(delta)
            logprobs = None
            if self.want_logprobs and delta.token_ids:
                logprobs = CompletionLogprobs()
                self.text_offset[idx] = append_completion_logprobs(
                    logprobs, delta.token_ids, list(delta.logprobs or []), self.req.logprobs or 0,
                    self.state.token_text, self.text_offset[idx],
                )
                _extend(self.logprobs[idx], logprobs)
            if delta.text or delta.finish_reason or logprobs is not None:
                choices.append(CompletionChoice(index=idx, text=delta.text, logprobs=logprobs,
                                                finish_reason=delta.finish_reason))
        return choices

    def usage(self) -> UsageInfo:
        prompt = sum(self.resp.prompt_tokens)
        completion = self.resp.completion_tokens
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                         total_tokens=prompt + completion,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.resp.cached_tokens)))

    def whole(self) -> CompletionResponse:
        """The non-streamed response."""
        choices = [
            CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason,
                             logprobs=self.logprobs[c.index] if self.want_logprobs else None)
            for c in self.resp.choices
        ]
        return CompletionResponse(id=self.response_id, model=self.state.model_name,
                                  choices=choices, usage=self.usage())


def _extend(dest: CompletionLogprobs, src: CompletionLogprobs) -> None:
    dest.tokens += src.tokens
    dest.token_logprobs += src.token_logprobs
    dest.top_logprobs += src.top_logprobs
    dest.text_offset += src.text_offset


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request) -> Response:
    """Serve one completions request (see the module docstring)."""
    state.check_model(req.model)
    params = completion_sampling_params(req)
    state.check_params(params)
    await state.check_structured(params, constraint_param(req))
    prompts = _prompts(state, req.prompt)
    # Tokenize here, not in the engine, so a prompt that cannot fit is a 400 before a
    # stream starts (a streamed response has sent its 200 by the time the engine sees it).
    prompt_ids = await off_loop_if_large(sum(len(p) for p in prompts),
                                         lambda: [state.prompt_ids(p) for p in prompts])
    for ids in prompt_ids:
        state.check_context(len(ids), params.max_tokens, "prompt", rolling=req.kv_policy == "sinks")
    response_id = random_id("cmpl")
    ticket = state.admission.admit(params.n * len(prompts))
    tracker = RequestTracker(state.metrics, response_id, "/v1/completions", state.model_name,
                             req.stream, params.n)
    streams = open_streams(state.engine, prompt_ids, params, response_id)
    return await respond_completion(state, req, raw, params, prompts, streams, ticket, tracker,
                                    response_id)


async def respond_completion(state: ServerState, req: CompletionRequest, raw: Request,
                             params: SamplingParams, prompts: list[str | list[int]],
                             streams: list[EngineStream], ticket: Any, tracker: RequestTracker,
                             response_id: str) -> Response:
    """Answer from engine streams already opened (one per prompt): SSE chunks when
    ``req.stream``, else one response. Replies to streamed input use it too (``req`` is then
    any request with ``stream``, ``include_usage``, ``logprobs`` and ``echo``)."""
    builder = _CompletionStream(state, req, params, prompts, len(prompts), response_id)
    return await respond(raw, builder, streams, ticket, tracker, "prompt")
