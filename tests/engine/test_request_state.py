"""RequestState alone: sequence updates in, RequestOutput deltas out (no model)."""

from __future__ import annotations

import pytest

from livelm.core.request import FinishReason
from livelm.core.scheduler_output import SampledToken, SequenceUpdate
from livelm.engine.request_state import RequestState
from livelm.engine.tokenizer import load_tokenizer
from livelm.sampling_params import SamplingParams

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def tok(llama_dir):
    return load_tokenizer(llama_dir)


def _state(tok, params: SamplingParams, rid: str = "r") -> RequestState:
    prompt_ids = tok("Paris is").input_ids
    return RequestState(rid, "Paris is", prompt_ids, params, tok, arrival_time=1.0)


def _update(token_ids, index: int = 0, finish: FinishReason | None = None, stop_reason=None,
            logprobs=None) -> SequenceUpdate:
    rid = "r" if index == 0 else f"r#{index}"
    return SequenceUpdate(rid, "r", index, list(token_ids), logprobs, None, finish, stop_reason)


def test_deltas_add_up_to_the_final_output(tok):
    ids = tok(TEXT, add_special_tokens=False).input_ids
    state = _state(tok, SamplingParams(max_tokens=len(ids)))
    texts = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        result = state.process(_update([t], finish=FinishReason.LENGTH if last else None))
        assert result.stop_matched is None and result.delta.token_ids == [t]
        assert result.delta.finish_reason == ("length" if last else None)
        texts.append(result.delta.text)
        assert state.finished == last
    assert "".join(texts) == TEXT
    final = state.final_output()
    assert final.finished and final.request_id == "r" and final.prompt == "Paris is"
    assert final.outputs[0].text == TEXT and final.outputs[0].token_ids == ids
    assert final.metrics["arrival_time"] == 1.0 and final.metrics["num_generated_tokens"] == len(ids)
    assert final.metrics["first_token_time"] <= final.metrics["last_token_time"]


def test_delta_output_holds_only_what_changed(tok):
    state = _state(tok, SamplingParams(max_tokens=4))
    ids = tok(" fox jumps", add_special_tokens=False).input_ids
    delta = state.process(_update(ids)).delta
    out = state.delta_output([delta])
    assert not out.finished and out.outputs == [delta]
    assert out.prompt_token_ids == tok("Paris is").input_ids
    assert "first_token_time" in out.metrics


def test_a_stop_string_ends_the_sequence_and_asks_the_scheduler_to_stop(tok):
    state = _state(tok, SamplingParams(stop=["lazy"], max_tokens=50))
    pieces, matched_at = [], None
    for i, t in enumerate(tok(TEXT, add_special_tokens=False).input_ids):
        result = state.process(_update([t]))
        if result.delta is not None:
            pieces.append(result.delta.text)
        if result.stop_matched is not None:
            matched_at = i
            assert result.stop_matched == "r"  # the sequence id the scheduler must finish
            assert result.delta.finish_reason == "stop" and result.delta.stop_reason == "lazy"
            break
    assert matched_at is not None and state.finished
    assert "".join(pieces) == TEXT[: TEXT.index("lazy")]
    # Tokens the scheduler computed before it heard of the stop are dropped.
    assert state.process(_update([5], finish=FinishReason.LENGTH)).delta is None
    assert state.final_output().outputs[0].text == TEXT[: TEXT.index("lazy")]


def test_text_held_back_for_a_stop_string_is_released_at_the_end(tok):
    state = _state(tok, SamplingParams(stop=["fox!"], max_tokens=50))
    ids = tok(" brown fox", add_special_tokens=False).input_ids
    text = "".join(state.process(_update([t])).delta.text for t in ids[:-1])
    last = state.process(_update(ids[-1:], finish=FinishReason.STOP)).delta
    assert text + last.text == " brown fox" and last.finish_reason == "stop"
    assert last.stop_reason is None  # eos, not the stop string


def test_n_sequences_are_tracked_apart_and_reported_by_index(tok):
    state = _state(tok, SamplingParams(n=3, max_tokens=2))
    a, b = tok(" a", add_special_tokens=False).input_ids, tok(" b", add_special_tokens=False).input_ids
    # Updates arrive in any sequence order; each delta carries its own index.
    assert state.process(_update(b, index=2)).delta.index == 2
    assert state.process(_update(a, index=0, finish=FinishReason.LENGTH)).delta.index == 0
    assert not state.finished
    state.process(_update(a, index=1, finish=FinishReason.STOP))
    assert not state.finished
    state.process(_update(b, index=2, finish=FinishReason.LENGTH))
    assert state.finished
    outs = state.final_output().outputs
    assert [o.index for o in outs] == [0, 1, 2]  # the final output is in index order
    assert [o.token_ids for o in outs] == [a, a, b + b]
    assert [o.finish_reason for o in outs] == ["length", "stop", "length"]


def test_abort_finishes_only_unfinished_sequences(tok):
    state = _state(tok, SamplingParams(n=2, max_tokens=5))
    state.process(_update([5], index=0, finish=FinishReason.LENGTH))
    state.process(_update([6], index=1))
    deltas = state.abort()
    assert [(d.index, d.finish_reason, d.text, d.token_ids) for d in deltas] == [(1, "abort", "", [])]
    assert state.finished and state.delta_output(deltas).finished
    assert [o.finish_reason for o in state.final_output().outputs] == ["length", "abort"]
    assert state.abort() == []  # nothing left to abort


def test_logprobs_are_collected_and_summed(tok):
    state = _state(tok, SamplingParams(logprobs=1, max_tokens=2))
    first = SampledToken(7, logprob=-0.5, rank=1, top_ids=[7], top_logprobs=[-0.5])
    second = SampledToken(9, logprob=-2.0, rank=3, top_ids=[4], top_logprobs=[-0.1])
    d1 = state.process(_update([7], logprobs=[first])).delta
    d2 = state.process(_update([9], finish=FinishReason.LENGTH, logprobs=[second])).delta
    assert d1.cumulative_logprob == pytest.approx(-0.5) and d2.cumulative_logprob == pytest.approx(-2.5)
    assert d2.logprobs[0][9].rank == 3 and d2.logprobs[0][4].rank == 1  # sampled + top-1
    assert len(state.final_output().outputs[0].logprobs) == 2
