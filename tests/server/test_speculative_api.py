"""Speculative decoding over HTTP: the per-request fields, their 400s, the /metrics
counters, and `livelm serve`'s flags."""

from __future__ import annotations

import argparse

import httpx
import pytest
from server_utils import scrape, serve, start_engine, stop_engine

from livelm import SamplingParams
from livelm.engine.llm import LLM
from livelm.entrypoints.openai.api_server import engine_kwargs_from_args
from livelm.entrypoints.serve_cli import add_serve_args

# A prompt that repeats itself, so drafts find matches; greedy, so outputs must equal
# plain decoding's.
PROMPT = [int(t) for t in "11 12 13 14 15 16 17 18 11 12 13 14 15 16 17 18 11 12 13".split()]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(llama_dir):
    engine = start_engine(llama_dir, speculative_method="suffix")
    with serve(engine) as srv:
        srv.engine = engine
        yield srv
    stop_engine(engine)


@pytest.fixture(scope="module")
def plain_text(llama_dir) -> str:
    llm = LLM(str(llama_dir), max_model_len=256, kv_cache_gib=0.25)
    return llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text


def _complete(server, **fields) -> httpx.Response:
    body = {"model": server.engine.model_name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "logprobs": 1, **fields}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


@pytest.mark.parametrize("fields", [{}, {"speculative_method": "ngram", "num_speculative_tokens": 3},
                                    {"speculative_method": "off"}, {"num_speculative_tokens": 1}])
def test_requests_with_speculation_fields_give_plain_decodings_text(server, plain_text, fields):
    r = _complete(server, **fields)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == MAX_TOKENS
    assert r.json()["choices"][0]["text"] == plain_text


@pytest.mark.parametrize("fields, param", [
    ({"speculative_method": "medusa"}, "speculative_method"),
    ({"speculative_method": 5}, "speculative_method"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 1000}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 2.5}, "num_speculative_tokens"),
    ({"num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"num_speculative_tokens": [3]}, "num_speculative_tokens"),
    # This server has no draft model (--speculative-draft-model).
    ({"speculative_method": "draft"}, "speculative_method"),
    ({"speculative_method": "draft", "stream": True}, "speculative_method"),
])
def test_bad_speculation_fields_are_a_400_naming_the_field(server, fields, param):
    r = _complete(server, **fields)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
    # The server is fine afterwards.
    assert _complete(server).status_code == 200


def test_bad_speculation_fields_in_chat_are_a_400(server):
    body = {"model": server.engine.model_name, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, "speculative_method": "draft_model"}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "speculative_method"


def test_metrics_count_drafts(server):
    _complete(server)
    m = scrape(server.url)
    assert m["livelm_spec_decode_draft_tokens_total"] >= m["livelm_spec_decode_accepted_tokens_total"] > 0
    assert m["livelm_spec_decode_drafts_total"] > 0
    assert 0 < m["livelm_spec_decode_acceptance_rate"] <= 1
    assert m["livelm_spec_decode_mean_accepted_length"] > 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser


def test_serve_flags_reach_the_engine():
    args = build_parser().parse_args(["--speculative-method", "ngram", "--num-speculative-tokens", "7",
                                      "--no-speculative-adaptive"])
    kw = engine_kwargs_from_args(args)
    assert (kw["speculative_method"], kw["num_speculative_tokens"], kw["speculative_adaptive"]) == ("ngram", 7, False)
    assert "speculative_method" not in engine_kwargs_from_args(build_parser().parse_args([]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--speculative-method", "eagle"])
    args = build_parser().parse_args(["--speculative-method", "draft", "--speculative-draft-model", "/m/small"])
    kw = engine_kwargs_from_args(args)
    assert (kw["speculative_method"], kw["speculative_draft_model"]) == ("draft", "/m/small")


def test_a_server_with_a_draft_model_drafts_per_request(llama_dir, plain_text):
    # The tiny model drafting for itself: a request asking for "draft" gets plain
    # decoding's text, and /metrics counts the draft model's time.
    engine = start_engine(llama_dir, speculative_draft_model=str(llama_dir))
    try:
        with serve(engine) as srv:
            srv.engine = engine
            for stream in (False, True):
                body = {"model": engine.model_name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                        "ignore_eos": True, "speculative_method": "draft", "stream": stream}
                r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
                assert r.status_code == 200, r.text
                if not stream:
                    assert r.json()["choices"][0]["text"] == plain_text
            m = scrape(srv.url)
            assert m["livelm_spec_decode_accepted_tokens_total"] > 0
            assert m["livelm_spec_decode_draft_model_seconds_total"] > 0
    finally:
        stop_engine(engine)
