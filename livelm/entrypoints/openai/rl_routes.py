"""The RL serving API (docs/rl.md): weight updates, pause/resume, abort-all, the weight
version, rollouts with per-token versions and sampling log-probabilities, fork/join.

Off unless ``livelm serve --enable-rl-api``: these routes change what every client gets
(new weights, aborted requests), so they are for the trainer that owns the server. Behind
the API key like every ``/v1`` route. Every field is checked strictly (pydantic: finite
numbers, ints that are not booleans, bounded lists); an engine ValueError becomes a 400
with an OpenAI error body, and the engine keeps serving the others.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import FastAPI
from pydantic import Field

from livelm.engine.fork import MAX_FORK_BRANCHES, Branch
from livelm.entrypoints.openai.errors import OpenAIError
from livelm.entrypoints.openai.protocol import Bool, Float, Int, OpenAIModel, Text, random_id
from livelm.entrypoints.openai.state import ServerState
from livelm.outputs import RequestOutput
from livelm.sampling_params import MAX_STOP_STRINGS, SamplingParams

RequestId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._:#@/-]+$")]
TokenIds = Annotated[list[Int], Field(max_length=1 << 20)]
Piece = Text | TokenIds  # text or token ids
Mode = Literal["continue", "wait", "abort"]


class RolloutSampling(OpenAIModel):
    """Sampling fields of a rollout or a branch (SamplingParams checks their ranges)."""

    max_tokens: Int | None = 16
    temperature: Float = 1.0
    top_p: Float = 1.0
    top_k: Int = 0
    min_p: Float = 0.0
    seed: Int | None = None
    stop: Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    ignore_eos: Bool = False
    sampling_logprobs: Bool = True

    def params(self) -> SamplingParams:
        """The SamplingParams (ValueError for values out of range)."""
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, stop=tuple(self.stop or ()), ignore_eos=self.ignore_eos,
            sampling_logprobs=self.sampling_logprobs,
        )


class UpdateWeightsRequest(OpenAIModel):
    """``path``: a model directory, ``.safetensors`` or ``.gguf`` file on the server."""

    path: Annotated[Text, Field(min_length=1, max_length=4096)]
    mode: Mode = "continue"


class RolloutRequest(RolloutSampling):
    """A rollout: ``prompt`` as text or token ids; ``request_id`` names it for fork/join."""

    prompt: Annotated[Text, Field(min_length=1)] | Annotated[TokenIds, Field(min_length=1)]
    request_id: RequestId | None = None


class BranchRequest(RolloutSampling):
    """One branch: its suffix prompt (text or token ids) and sampling fields."""

    suffix: Piece = ""


class ForkRequest(OpenAIModel):
    """Fork ``request_id`` into ``branches``; the answer comes when all branches finished."""

    request_id: RequestId
    branches: Annotated[list[BranchRequest], Field(min_length=1, max_length=MAX_FORK_BRANCHES)]


class JoinRequest(OpenAIModel):
    """Join the branches of ``request_id`` back into it (see ``AsyncEngine.join``)."""

    request_id: RequestId
    branch_ids: Annotated[list[RequestId], Field(max_length=MAX_FORK_BRANCHES)] | None = None
    separator: Piece = ""
    prefix: Piece = ""
    suffix: Piece = ""
    include_branch_prompts: Bool = True


def _bad(e: ValueError, param: str | None = None) -> OpenAIError:
    return OpenAIError(str(e), 400, param=param)


def _params(req: RolloutSampling, param: str | None = None) -> SamplingParams:
    try:
        return req.params()
    except ValueError as e:
        raise _bad(e, param) from None


async def _collect(outputs) -> dict:
    """A request's deltas folded into one rollout record."""
    record = {"token_ids": [], "text": "", "weight_versions": [], "sampling_logprobs": [],
              "finish_reason": None, "stop_reason": None, "prompt_token_ids": None}
    async for out in outputs:
        _fold(record, out)
    return record


def _fold(record: dict, out: RequestOutput) -> None:
    record["prompt_token_ids"] = out.prompt_token_ids
    for c in out.outputs:
        record["token_ids"] += c.token_ids
        record["text"] += c.text
        record["weight_versions"] += c.weight_versions
        record["sampling_logprobs"] += c.sampling_logprobs or []
        if c.finish_reason is not None:
            record["finish_reason"], record["stop_reason"] = c.finish_reason, c.stop_reason


def add_rl_routes(app: FastAPI, state: ServerState) -> None:
    """The ``/v1/rl/*`` routes (see the module docstring)."""
    engine = state.engine
    active: set[str] = set()  # rollout ids in flight (a client-chosen id must be unique)

    @app.get("/v1/rl/weight_version")
    async def weight_version() -> dict:
        """The version of the weights in use (0 as loaded, one more per update)."""
        return {"weight_version": engine.weight_version}

    @app.post("/v1/rl/update_weights")
    async def update_weights(req: UpdateWeightsRequest) -> dict:
        """Load new weights from a path on the server; ``mode`` says what happens to the
        requests in flight. A malformed update is a 400 and changes nothing."""
        try:
            version = await engine.update_weights(req.path, mode=req.mode)
        except ValueError as e:
            raise _bad(e, "path") from None
        return {"weight_version": version}

    @app.post("/v1/rl/pause")
    async def pause() -> dict:
        """Pause generation (requests stay; no step runs until resume)."""
        await engine.pause()
        return {"paused": True}

    @app.post("/v1/rl/resume")
    async def resume() -> dict:
        """Resume generation."""
        await engine.resume()
        return {"paused": False}

    @app.post("/v1/rl/abort_all")
    async def abort_all() -> dict:
        """Abort every request in flight."""
        return {"aborted": await engine.abort_all()}

    @app.post("/v1/rl/generate")
    async def generate(req: RolloutRequest) -> dict:
        """One rollout to its end: token ids, text, the weight version of every token and
        its sampling log-probability (docs/rl.md)."""
        params = _params(req)
        rid = req.request_id or random_id("rollout")
        if rid in active:
            raise OpenAIError(f"request_id {rid!r} is already in use", 400, param="request_id")
        ticket = state.admission.admit(1)  # the server's bound on queued work (503 when full)
        active.add(rid)
        try:
            record = await _collect(engine.generate(req.prompt, params, request_id=rid))
        except ValueError as e:
            raise _bad(e, "prompt") from None
        finally:
            active.discard(rid)
            ticket.release()
        return {"request_id": rid, **record}

    @app.post("/v1/rl/fork")
    async def fork(req: ForkRequest) -> dict:
        """Fork a running rollout into branches at its current position (nothing of its
        context is recomputed); answers once every branch finished, with their outputs.
        The parent waits for ``/v1/rl/join``."""
        branches = [Branch(b.suffix, _params(b, f"branches.{i}")) for i, b in enumerate(req.branches)]
        ticket = state.admission.admit(len(branches))
        try:
            try:
                result, streams = await engine.fork(req.request_id, branches)
            except ValueError as e:
                raise _bad(e, "request_id") from None
            records = await asyncio.gather(*(_collect(s) for s in streams))
        finally:
            ticket.release()
        return {
            "request_id": req.request_id,
            "token_ids": result.token_ids,
            "branches": [{"id": bid, **r} for bid, r in zip(result.branch_ids, records, strict=True)],
        }

    @app.post("/v1/rl/join")
    async def join(req: JoinRequest) -> dict:
        """Append the branches' tokens to the parent's context and resume it."""
        try:
            appended = await engine.join(
                req.request_id, req.branch_ids, separator=req.separator, prefix=req.prefix,
                suffix=req.suffix, include_branch_prompts=req.include_branch_prompts,
            )
        except ValueError as e:
            raise _bad(e, "request_id") from None
        return {"request_id": req.request_id, "appended_token_ids": appended}
