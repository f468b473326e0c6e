"""The Engine that LLM and AsyncEngine share, driven directly: add, step, abort, typed
options, input streams and stats on the tiny model."""

from __future__ import annotations

import pytest

from livelm.core.request_options import RequestOptions
from livelm.engine.engine import Engine, make_engine_config
from livelm.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(llama_dir) -> Engine:
    return Engine(make_engine_config(str(llama_dir), {"max_model_len": 256, "block_size": 4}))


def _run(engine: Engine) -> dict[str, list]:
    """Step until nothing is in flight; the deltas of each request, in order."""
    deltas: dict[str, list] = {}
    while engine.states:
        for state, out in engine.step():
            deltas.setdefault(state.request_id, []).append(out)
    return deltas


def test_make_engine_config_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"unknown engine option\(s\) \['nope'\]"):
        make_engine_config(None, {"nope": 1})


def test_add_and_step_until_finished(engine):
    rid = engine.new_request_id()
    assert engine.new_request_id() != rid
    state = engine.add(rid, [5, 6, 7, 8], GREEDY)
    assert engine.states == {rid: state} and engine.stats().num_waiting == 1
    outs = _run(engine)[rid]
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert sum(len(o.outputs[0].token_ids) for o in outs) == 5
    assert state.final_output().outputs[0].finish_reason == "length"
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_a_text_prompt_is_tokenized_and_reported(engine):
    state = engine.add("text", "Paris is the capital", GREEDY)
    assert state.prompt == "Paris is the capital"
    assert state.prompt_token_ids == engine.prompt_ids("Paris is the capital")
    _run(engine)


def test_n_sequences_run_as_scheduler_requests_and_abort_together(engine):
    engine.add("pair", [5, 6, 7], SamplingParams(n=2, temperature=0, max_tokens=50, ignore_eos=True))
    assert set(engine.scheduler.requests) == {"pair#0", "pair#1"}
    engine.step()
    out = engine.abort("pair")
    assert out.finished and sorted(o.finish_reason for o in out.outputs) == ["abort", "abort"]
    assert engine.abort("pair") is None and not engine.states
    assert not engine.scheduler.has_unfinished()
    engine.step()  # the runner drops the aborted sequences' state
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_invalid_requests_raise_and_queue_nothing(engine):
    engine.add("dup", [5], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add("dup", [6], GREEDY)
    engine.abort("dup")
    vocab = engine.model_config.vocab_size
    cases = [
        ("", GREEDY, RequestOptions(), "the prompt is empty"),
        ([], GREEDY, RequestOptions(), "the prompt is empty"),
        ([5, vocab], GREEDY, RequestOptions(), rf"prompt token id {vocab} is outside the vocabulary"),
        ([5] * 250, SamplingParams(max_tokens=10), RequestOptions(), "exceeds the context length of 256"),
        ([5], SamplingParams(n=2), RequestOptions(session_id="s"), "a session turn must have n == 1"),
    ]
    for prompt, params, options, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.add("bad", prompt, params, options=options)
        assert "bad" not in engine.states and not engine.scheduler.has_unfinished()


def test_max_tokens_none_fills_the_context(engine):
    state = engine.add("fill", [5] * 250, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    assert state.params.max_tokens is None  # the caller's params are kept as given
    assert engine.scheduler.requests["fill"].sampling_params.max_tokens == 6
    outs = _run(engine)["fill"]
    assert sum(len(o.outputs[0].token_ids) for o in outs) == 6


def test_options_pin_a_session_and_extra_is_left_to_the_public_apis(engine):
    ids = [9, 10, 11, 12, 13, 14]
    engine.add("turn", ids, GREEDY, options=RequestOptions(session_id="conv", session_ttl=60))
    _run(engine)
    assert engine.stats().num_sessions == 1
    assert engine.scheduler.close_session("conv") is True
    assert engine.scheduler.close_session("conv") is False
    # Engine.add takes the typed options only: extra is parsed by LLM / AsyncEngine.
    engine.add("raw", ids, SamplingParams(temperature=0, max_tokens=2, extra={"session_id": "other"}))
    _run(engine)
    stats = engine.stats()
    assert stats.num_sessions == 0 and stats.num_session_pins_closed == 1


def test_an_input_stream_is_read_into_kv_and_replied_to(engine):
    engine.open_input_stream("st")
    assert engine.stats().num_input_streams == 1
    engine.update_input_stream("st", 0, list(range(20, 32)))
    while engine.input_stream_progress("st") < 12:
        engine.step()
    assert engine.step() == [] and engine.last_step_was_empty  # caught up: nothing to do
    assert not engine.scheduler.has_pending_work()
    before = engine.stats().num_computed_tokens
    engine.add("reply", list(range(20, 32)) + [40], GREEDY, fork_from="st")
    _run(engine)
    # The reply shares the stream's full blocks (12 tokens) and computes only past them.
    assert engine.stats().num_computed_tokens - before < 12
    # Revising the input keeps the common prefix's KV.
    engine.update_input_stream("st", 6, [50, 51], close=True)
    assert engine.input_stream_progress("st") <= 6
    engine.scheduler.finish_request("st")
    engine.step()
    stats = engine.stats()
    assert stats.num_input_streams == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_stream_input_is_checked(engine):
    vocab = engine.model_config.vocab_size
    with pytest.raises(ValueError, match=rf"input token id {vocab} is outside the vocabulary"):
        engine.check_stream_input([5, vocab])
    with pytest.raises(ValueError, match="exceeds the 255 tokens a stream may hold"):
        engine.check_stream_input([5] * 256)
    with pytest.raises(ValueError, match="no open input stream 'missing'"):
        engine.update_input_stream("missing", 0, [5])
    engine.check_stream_input([5] * 255)
