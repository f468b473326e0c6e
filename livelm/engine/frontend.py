"""What LLM and AsyncEngine share: model resolution, tokenizer, request bookkeeping."""

from __future__ import annotations

import itertools
import time
from dataclasses import fields, replace
from pathlib import Path

from livelm.config import EngineConfig
from livelm.core.request import FinishReason
from livelm.engine.engine_core import EngineCore, EngineStats
from livelm.engine.output_processor import RequestState
from livelm.engine.tokenizer import chat_prompt_ids, encode_prompt, load_tokenizer
from livelm.models.resolve import resolve_model_path
from livelm.outputs import RequestOutput
from livelm.sampling_params import SamplingParams

_CONFIG_FIELDS = {f.name for f in fields(EngineConfig)}


def with_session(params: SamplingParams, session_id: str | None, ttl: float | None = None) -> SamplingParams:
    """``params`` naming session ``session_id`` (and its pin time ``ttl``, in seconds)."""
    if session_id is None and ttl is None:
        return params
    extra = dict(params.extra)
    if session_id is not None:
        extra["session_id"] = session_id
    if ttl is not None:
        extra["session_ttl"] = ttl
    return replace(params, extra=extra)


def make_engine_config(model: str | None, kwargs: dict) -> EngineConfig:
    """EngineConfig from user keyword arguments, rejecting unknown ones by name."""
    unknown = set(kwargs) - _CONFIG_FIELDS
    if unknown:
        raise ValueError(f"unknown engine option(s) {sorted(unknown)}; valid: {sorted(_CONFIG_FIELDS)}")
    return EngineConfig(model=model, **kwargs)


class Frontend:
    """Turns prompts into engine requests and engine outputs into RequestOutputs.

    Not thread-safe: LLM calls it from the caller's thread, AsyncEngine from its engine
    thread only.
    """

    def __init__(self, config: EngineConfig, served_name: str | None = None) -> None:
        self.config = config
        self.model_dir: Path = resolve_model_path(config.model)
        self.model_name = served_name or (config.model and Path(config.model).name) or self.model_dir.name
        self.tokenizer = load_tokenizer(self.model_dir)
        self.core = EngineCore(self.model_dir, config)
        self.max_model_len = self.core.max_model_len
        self.states: dict[str, RequestState] = {}
        self._ids = itertools.count()

    def new_request_id(self) -> str:
        """A request id unique within this engine."""
        return f"req-{next(self._ids)}"

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """Token ids for a text or token-id prompt."""
        return encode_prompt(self.tokenizer, prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation rendered through the chat template."""
        return chat_prompt_ids(self.tokenizer, messages)

    def add(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
        fork_from: str | None = None,
    ) -> RequestState:
        """Tokenize (unless ``prompt_token_ids`` are given), validate and queue one request
        (``fork_from``: the input stream it replies to)."""
        arrival = time.perf_counter()
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str) and not prompt:
            raise ValueError("the prompt is empty: give at least one character")
        ids = prompt_token_ids if prompt_token_ids is not None else self.prompt_ids(prompt)
        self.core.add_request(request_id, ids, params, fork_from)
        state = RequestState(request_id, prompt if isinstance(prompt, str) else None, ids, params, self.tokenizer, arrival)
        self.states[request_id] = state
        return state

    def step(self) -> list[tuple[RequestState, RequestOutput]]:
        """Run one engine step; returns (request, delta output) for each request that moved."""
        deltas: dict[str, list] = {}
        for out in self.core.step():
            state = self.states.get(out.parent_id)
            if state is None:
                continue
            result = state.process(out)
            if result.stop_matched is not None:
                seq = state.seqs[out.index]
                self.core.finish_sequence(result.stop_matched, FinishReason.STOP, seq.stop_reason)
            if result.delta is not None:
                deltas.setdefault(out.parent_id, []).append(result.delta)
        moved = []
        for rid, ds in deltas.items():
            state = self.states[rid]
            moved.append((state, state.delta_output(ds)))
            if state.finished:
                del self.states[rid]
        return moved

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV; returns its final (aborted) delta, if it existed."""
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        for seq_id in self.core.sequence_ids(request_id, state.params.n):
            self.core.finish_sequence(seq_id, FinishReason.ABORT)
        return state.delta_output(state.abort())

    def has_unfinished(self) -> bool:
        """True while any request is in flight."""
        return self.core.has_unfinished()

    def has_pending_work(self) -> bool:
        """True while a step would do something (idle input streams need none)."""
        return self.core.has_pending_work()

    def close_session(self, session_id: str) -> bool:
        """Release a session's pinned KV now; False when the session is unknown."""
        return self.core.close_session(session_id)

    def stats(self) -> EngineStats:
        """The engine core's load."""
        return self.core.stats()
