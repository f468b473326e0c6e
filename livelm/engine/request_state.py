"""The engine's record of one request until it finishes: text, stop strings, outputs.

:class:`RequestState` folds the scheduler's per-sequence :class:`SequenceUpdate` (token
ids) into text (incremental detokenization, stop strings) and builds the public
:class:`~livelm.outputs.RequestOutput` deltas and final outputs. It is the caller-facing
state of a request, as :class:`~livelm.core.request.Request` is the scheduler's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from livelm.core.scheduler_output import PromptLogprobs, SampledToken, SequenceUpdate
from livelm.engine.detokenizer import IncrementalDetokenizer, detokenize_token
from livelm.engine.stop_strings import StopStringMatcher
from livelm.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from livelm.sampling_params import SamplingParams

if TYPE_CHECKING:  # a type only: importing transformers costs ~0.7 s of start-up
    from transformers import PreTrainedTokenizerBase


@dataclass
class SequenceState:
    """Text and tokens of one of a request's ``n`` sequences."""

    index: int
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    weight_versions: list[int] = field(default_factory=list)
    sampling_logprobs: list[float] | None = None


@dataclass
class StepResult:
    """What one sequence update means for the caller.

    ``delta`` is the new part of one sequence; ``stop_matched`` names a sequence whose stop
    string appeared, so the scheduler must stop computing it.
    """

    delta: CompletionOutput | None
    stop_matched: str | None = None


class RequestState:
    """Everything the engine tracks for one request on the caller's side until it finishes."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: PreTrainedTokenizerBase,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        # time.perf_counter() stamps for RequestOutput.metrics (TTFT, decode speed).
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_generated_tokens = 0
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.seqs = [
            SequenceState(
                index=i,
                detokenizer=IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens),
                stop_matcher=(
                    StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
                ),
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
                sampling_logprobs=[] if params.sampling_logprobs else None,
            )
            for i in range(params.n)
        ]
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self.num_cached_tokens = 0  # prompt tokens reused from the cache (the first sequence's)
        self.error: Exception | None = None  # why the request failed (see fail())
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(prompt_token_ids)

    @property
    def finished(self) -> bool:
        """True once every sequence has stopped."""
        return all(s.finish_reason is not None for s in self.seqs)

    def process(self, out: SequenceUpdate, weight_version: int = 0) -> StepResult:
        """Fold one sequence's step update into this request; returns the caller-visible delta.
        ``weight_version`` is the version of the weights that computed it."""
        if out.prompt_logprobs is not None and self.prompt_logprobs is not None:
            self._add_prompt_logprobs(out.prompt_logprobs)
        if out.index == 0:
            self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        seq = self.seqs[out.index]
        if seq.finish_reason is not None:
            return StepResult(None)
        if seq.stop_matcher is not None and len(out.new_token_ids) > 1:
            return self._process_each(out, weight_version)
        if out.new_token_ids:
            now = time.perf_counter()
            if self.first_token_time is None:
                self.first_token_time = now
            self.last_token_time = now
            self.num_generated_tokens += len(out.new_token_ids)
        new_lps = self._position_logprobs(out.new_logprobs) if out.new_logprobs else None
        delta_text = seq.detokenizer.add_tokens(out.new_token_ids)
        stop_matched = None
        if out.finished:
            delta_text += seq.detokenizer.finish()
        if seq.stop_matcher is not None:
            delta_text, matched = seq.stop_matcher.feed(delta_text)
            if matched is not None:
                seq.finish_reason, seq.stop_reason = "stop", matched
                stop_matched = out.request_id
            elif out.finished:
                delta_text += seq.stop_matcher.flush()
        if seq.finish_reason is None and out.finished:
            seq.finish_reason = out.finish_reason.value
            seq.stop_reason = out.stop_reason
        seq.token_ids.extend(out.new_token_ids)
        versions = [weight_version] * len(out.new_token_ids)
        seq.weight_versions.extend(versions)
        slps = out.sampling_logprobs if seq.sampling_logprobs is not None else None
        if slps is not None:
            seq.sampling_logprobs.extend(slps)
        seq.text += delta_text
        if new_lps is not None and seq.logprobs is not None:
            seq.logprobs.extend(new_lps)
            for tok, pos in zip(out.new_token_ids, new_lps, strict=True):
                seq.cumulative_logprob += pos[tok].logprob
        delta = CompletionOutput(
            index=seq.index,
            text=delta_text,
            token_ids=list(out.new_token_ids),
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=new_lps,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            weight_versions=versions,
            sampling_logprobs=None if seq.sampling_logprobs is None else list(slps or []),
        )
        return StepResult(delta, stop_matched)

    def _process_each(self, out: SequenceUpdate, weight_version: int) -> StepResult:
        """Several new tokens (accepted speculative drafts) and stop strings: fold them
        one at a time, so the output ends at the token where a stop string appeared, as
        plain decoding's would; the deltas are merged into one."""
        last = len(out.new_token_ids) - 1
        merged: CompletionOutput | None = None
        result = StepResult(None)
        for i, tok in enumerate(out.new_token_ids):
            one = SequenceUpdate(
                request_id=out.request_id,
                parent_id=out.parent_id,
                index=out.index,
                new_token_ids=[tok],
                new_logprobs=out.new_logprobs[i : i + 1] if out.new_logprobs else None,
                finish_reason=out.finish_reason if i == last else None,
                stop_reason=out.stop_reason if i == last else None,
                sampling_logprobs=out.sampling_logprobs[i : i + 1] if out.sampling_logprobs else None,
            )
            result = self.process(one, weight_version)
            merged = result.delta if merged is None else _merge_deltas(merged, result.delta)
            if result.stop_matched is not None:
                break
        return StepResult(merged, result.stop_matched)

    def add_context(self, token_ids: list[int]) -> None:
        """Tokens a join appended to the context (not output): the detokenizer reads them,
        so the text of the tokens after them decodes as it would after a prompt holding them."""
        self.seqs[0].detokenizer.add_tokens(token_ids)

    def abort(self, stop_reason: str | None = None) -> list[CompletionOutput]:
        """Mark every unfinished sequence aborted; returns their (empty) final deltas.
        ``stop_reason`` says why, when not the caller's own abort (``"weight_update"``)."""
        deltas = []
        for seq in self.seqs:
            if seq.finish_reason is None:
                seq.finish_reason, seq.stop_reason = "abort", stop_reason
                deltas.append(CompletionOutput(seq.index, "", [], seq.cumulative_logprob, None, "abort",
                                               stop_reason))
        return deltas

    def fail(self, error: Exception) -> list[CompletionOutput]:
        """End every unfinished sequence with ``finish_reason="error"``: the request failed
        (``error`` says why; AsyncEngine raises it to the caller). Returns their final deltas."""
        self.error = error
        deltas = []
        for seq in self.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "error"
                deltas.append(CompletionOutput(seq.index, "", [], seq.cumulative_logprob, None, "error"))
        return deltas

    def delta_output(self, deltas: list[CompletionOutput]) -> RequestOutput:
        """A streamed update holding only what changed."""
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=deltas,
            finished=self.finished,
            prompt_logprobs=self.prompt_logprobs,
            metrics=self.metrics(),
            num_cached_tokens=self.num_cached_tokens,
        )

    def metrics(self) -> dict[str, float]:
        """Timing so far (``time.perf_counter()`` seconds): ``arrival_time`` (the request was
        added), ``first_token_time`` and ``last_token_time`` (the engine received the
        first / latest generated token), ``num_generated_tokens`` (over all sequences)."""
        m = {"arrival_time": self.arrival_time, "num_generated_tokens": float(self.num_generated_tokens)}
        if self.first_token_time is not None:
            m["first_token_time"] = self.first_token_time
            m["last_token_time"] = self.last_token_time
        return m

    def final_output(self) -> RequestOutput:
        """The whole result, every sequence complete."""
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=list(s.token_ids),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=s.logprobs,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                weight_versions=list(s.weight_versions),
                sampling_logprobs=None if s.sampling_logprobs is None else list(s.sampling_logprobs),
            )
            for s in self.seqs
        ]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self.finished,
            prompt_logprobs=self.prompt_logprobs,
            metrics=self.metrics(),
            num_cached_tokens=self.num_cached_tokens,
        )

    # ----------------------------------------------------------------- logprobs

    def _position(self, token_id: int, logprob: float, rank: int, top_ids, top_lps) -> PositionLogprobs:
        tok = self.tokenizer
        pos: PositionLogprobs = {}
        for r, (tid, lp) in enumerate(zip(top_ids, top_lps, strict=True), start=1):
            pos[tid] = Logprob(lp, r, detokenize_token(tok, tid))
        if token_id not in pos:
            pos[token_id] = Logprob(logprob, rank, detokenize_token(tok, token_id))
        return pos

    def _position_logprobs(self, sampled: list[SampledToken]) -> list[PositionLogprobs]:
        return [
            self._position(s.token_id, s.logprob, s.rank, s.top_ids or [], s.top_logprobs or [])
            for s in sampled
        ]

    def _add_prompt_logprobs(self, plp: PromptLogprobs) -> None:
        for j, (lp, rank) in enumerate(zip(plp.token_logprobs, plp.ranks, strict=True)):
            idx = plp.start_index + j
            self.prompt_logprobs[idx] = self._position(
                self.prompt_token_ids[idx], lp, rank, plp.top_ids[j], plp.top_logprobs[j]
            )


def _merge_deltas(a: CompletionOutput, b: CompletionOutput) -> CompletionOutput:
    """One delta holding ``a`` then ``b`` (consecutive deltas of one sequence)."""
    return CompletionOutput(
        index=a.index,
        text=a.text + b.text,
        token_ids=a.token_ids + b.token_ids,
        cumulative_logprob=b.cumulative_logprob,
        logprobs=None if a.logprobs is None else a.logprobs + (b.logprobs or []),
        finish_reason=b.finish_reason,
        stop_reason=b.stop_reason,
        weight_versions=a.weight_versions + b.weight_versions,
        sampling_logprobs=None if a.sampling_logprobs is None else a.sampling_logprobs + (b.sampling_logprobs or []),
    )
