"""Workloads of ``livelm bench``: prompt lengths, shared prefixes, conversations, BurstGPT
CSV traces (the shipped synthetic one and malformed ones) and the JSONL format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from livelm.bench.arrivals import ArrivalProcess
from livelm.bench.lengths import LengthDist
from livelm.bench.prompts import PromptMaker
from livelm.bench.synthetic import multi_turn_workload, random_workload, shared_prefix_workload
from livelm.bench.traces import (
    BURSTGPT_COLUMNS,
    burstgpt_workload,
    jsonl_workload,
    read_burstgpt_rows,
    write_synthetic_burstgpt,
)
from livelm.bench.workload import chat_prompt_ids, render_plain_chat

SHIPPED_TRACE = Path(__file__).resolve().parents[2] / "benchmarks" / "traces" / "burstgpt_synthetic.csv"


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    from livelm.engine.tokenizer import load_tokenizer

    return load_tokenizer(llama_dir)


@pytest.fixture
def maker(tokenizer) -> PromptMaker:
    return PromptMaker(tokenizer, seed=0)


def test_prompt_ids_are_exact_and_text_is_close(maker, tokenizer):
    for n in (1, 7, 64, 300):
        text, ids = maker.text(n)
        assert len(ids) == n
        assert abs(maker.count(text) - n) <= 2  # only the cut word may re-tokenize differently
    assert maker.ids(0) == []


def test_random_workload_lengths_follow_the_distributions(maker):
    wl = random_workload(maker, 20, LengthDist.parse("uniform:5:9"), LengthDist.parse("3"), seed=1)
    assert wl.num_requests == 20 and not wl.is_chat and not wl.has_timestamps
    assert all(5 <= len(s.turns[0].ids) <= 9 and s.turns[0].output_len == 3 for s in wl.sessions)
    texts = {s.turns[0].text for s in wl.sessions}
    assert len(texts) == 20  # distinct prompts: no accidental prefix-cache hits
    again = random_workload(PromptMaker(maker.tokenizer, 0), 20, LengthDist.parse("uniform:5:9"),
                            LengthDist.parse("3"), seed=1)
    assert [s.turns[0].ids for s in again.sessions] == [s.turns[0].ids for s in wl.sessions]


def test_shared_prefix_groups_share_exact_prefixes(maker):
    wl = shared_prefix_workload(maker, 12, 3, 40, LengthDist.parse("5"), LengthDist.parse("2"), seed=0)
    prefixes = {tuple(s.turns[0].ids[:40]) for s in wl.sessions}
    assert len(prefixes) == 3
    assert all(len(s.turns[0].ids) == 45 for s in wl.sessions)
    counts = [sum(tuple(s.turns[0].ids[:40]) == p for s in wl.sessions) for p in prefixes]
    assert sorted(counts) == [4, 4, 4]


def test_multi_turn_resends_history_with_replies(maker, tokenizer):
    wl = multi_turn_workload(maker, 2, LengthDist.parse("3"), LengthDist.parse("6"), LengthDist.parse("4"),
                             LengthDist.parse("0.5", minimum=0), system_len=5, seed=0)
    s = wl.sessions[0]
    assert s.chat and len(s.turns) == 3 and wl.num_requests == 6
    assert s.turns[0].think_time_s == 0 and s.turns[1].think_time_s == 0.5
    msgs = s.messages(2, ["first reply", "second reply"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == "first reply" and msgs[-1]["content"] == s.turns[2].text
    # The tiny model has a ChatML template; the plain rendering is the fallback.
    assert "<|im_start|>assistant" in tokenizer.decode(chat_prompt_ids(tokenizer, msgs))
    assert render_plain_chat(msgs[:2]).endswith("\nassistant:")


def test_shipped_trace_is_burstgpt_format_and_replays_with_its_timestamps(maker):
    header = SHIPPED_TRACE.read_text().splitlines()[0]
    assert tuple(header.split(",")) == BURSTGPT_COLUMNS
    rows = read_burstgpt_rows(SHIPPED_TRACE)
    assert len(rows) == 200 and any(r["output"] == 0 for r in rows)
    wl = burstgpt_workload(SHIPPED_TRACE, maker, num_requests=10)
    assert wl.has_timestamps and wl.num_requests == 10
    kept = [r for r in rows if r["output"] > 0][:10]
    assert [s.arrival_s for s in wl.sessions] == [r["timestamp"] - kept[0]["timestamp"] for r in kept]
    assert [len(s.turns[0].ids) for s in wl.sessions] == [r["input"] for r in kept]
    assert [s.turns[0].output_len for s in wl.sessions] == [r["output"] for r in kept]
    starts = ArrivalProcess(use_timestamps=True, time_scale=0.5).start_times(wl)
    assert starts == [s.arrival_s * 0.5 for s in wl.sessions]


def test_burstgpt_filters_clips_and_rejects_bad_files(maker, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    "10,ChatGPT,500,40,540,Conversation log\n"
                    "5,GPT-4,30,0,30,Conversation log\n"        # failed: skipped
                    "12.5,GPT-4,20,900,920,API log\n"
                    "14,ChatGPT,25,5,30,API log\n")
    wl = burstgpt_workload(path, maker, max_input_len=64, max_output_len=100)
    assert [s.arrival_s for s in wl.sessions] == [0.0, 2.5, 4.0]  # sorted, relative to the first kept
    assert [len(s.turns[0].ids) for s in wl.sessions] == [64, 20, 25]
    assert [s.turns[0].output_len for s in wl.sessions] == [40, 100, 5]
    only = burstgpt_workload(path, maker, model="ChatGPT", start_s=11)
    assert only.num_requests == 1 and only.sessions[0].turns[0].output_len == 5
    (tmp_path / "bad.csv").write_text("time,prompt\n1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        burstgpt_workload(tmp_path / "bad.csv", maker)
    (tmp_path / "nan.csv").write_text("Timestamp,Request tokens,Response tokens\nx,1,2\n")
    with pytest.raises(ValueError, match="nan.csv:2"):
        read_burstgpt_rows(tmp_path / "nan.csv")


def test_synthetic_trace_generator_is_deterministic(tmp_path):
    write_synthetic_burstgpt(tmp_path / "a.csv", 200, seed=0)
    assert (tmp_path / "a.csv").read_text() == SHIPPED_TRACE.read_text()


def test_jsonl_requests_chats_conversations_and_errors(maker, tmp_path):
    lines = [
        {"prompt": "Tell me a story.", "output_tokens": 6, "arrival_s": 1.0},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "arrival_s": 1.5},
        {"input_tokens": 20, "output_tokens": 4, "arrival_s": 3.0},
        {"conversation": "c", "prompt": "Hello", "output_tokens": 4, "arrival_s": 2.0},
        {"conversation": "c", "prompt": "And then?", "output_tokens": 5, "think_time_s": 2},
    ]
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    wl = jsonl_workload(path, maker, LengthDist.parse("7"))
    assert wl.has_timestamps and wl.num_requests == 5 and len(wl.sessions) == 4
    assert [s.arrival_s for s in wl.sessions] == [0.0, 0.5, 1.0, 2.0]
    chat = wl.sessions[1]
    assert chat.chat and chat.turns[0].output_len == 7
    assert chat.messages(0, []) == lines[1]["messages"]
    conv = wl.sessions[2]
    assert conv.chat and [t.text for t in conv.turns] == ["Hello", "And then?"]
    assert conv.turns[1].think_time_s == 2
    assert len(wl.sessions[3].turns[0].ids) == 20
    for bad, match in [({"output_tokens": 3}, "exactly one"),
                       ({"prompt": "a", "input_tokens": 3}, "exactly one"),
                       ({"messages": [{"role": "assistant", "content": "x"}]}, "user message"),
                       ({"prompt": "a", "output_tokens": 0}, "output_tokens")]:
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=match):
            jsonl_workload(path, maker, LengthDist.parse("7"))
    path.write_text('{"prompt": "a", "arrival_s": 1}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match="arrival_s"):
        jsonl_workload(path, maker, LengthDist.parse("7"))
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=":1"):
        jsonl_workload(path, maker, LengthDist.parse("7"))
