"""What the Python APIs refuse before a request reaches a step (issue 23): every numeric
field finite and within what the engine can honour, booleans that are booleans, bounded stop
strings, seeds the generator takes, session TTLs a wait can represent, ``n`` within the
engine's limits and stop token ids inside the vocabulary. Each refusal is a ValueError that
names the field and says what to fix; nothing is left queued."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from livelm import SamplingParams
from livelm.config import EngineConfig
from livelm.core.request_options import MAX_SESSION_TTL_S, RequestOptions
from livelm.engine.async_engine import AsyncEngine
from livelm.engine.llm import LLM
from livelm.sampling_params import (
    MAX_SEED,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
)

NAN, INF = math.nan, math.inf

BAD_PARAMS = [
    ({"temperature": NAN}, r"temperature must be a finite number"),
    ({"temperature": INF}, r"temperature must be a finite number"),
    ({"temperature": 1e10}, r"temperature must be in \[0, 100\]"),
    ({"temperature": -0.1}, r"temperature must be in \[0, 100\]"),
    ({"temperature": "hot"}, r"temperature must be a number"),
    ({"temperature": True}, r"temperature must be a number"),
    ({"top_p": NAN}, r"top_p must be a finite number"),
    ({"min_p": INF}, r"min_p must be a finite number"),
    ({"repetition_penalty": NAN}, r"repetition_penalty must be a finite number"),
    ({"repetition_penalty": INF}, r"repetition_penalty must be a finite number"),
    ({"repetition_penalty": 1e-300}, r"repetition_penalty must be in \[0.01, 100\]"),
    ({"repetition_penalty": 1e3}, r"repetition_penalty must be in \[0.01, 100\]"),
    ({"presence_penalty": NAN}, r"presence_penalty must be a finite number"),
    ({"frequency_penalty": -INF}, r"frequency_penalty must be a finite number"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63 - 1\].*non-negative"),
    ({"seed": 2**63}, r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
    ({"seed": 1180591620717411303424}, r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
    ({"seed": 1.5}, r"seed must be an integer or None"),
    ({"seed": True}, r"seed must be an integer or None"),
    ({"n": True}, r"n must be an integer"),
    ({"n": 2.0}, r"n must be an integer"),
    ({"top_k": False}, r"top_k must be an integer"),
    ({"max_tokens": True}, r"max_tokens must be an integer"),
    ({"min_tokens": 1.0}, r"min_tokens must be an integer"),
    ({"logprobs": True}, r"logprobs must be an integer"),
    ({"ignore_eos": "yes"}, r"ignore_eos must be a boolean"),
    ({"ignore_eos": 1}, r"ignore_eos must be a boolean"),
    ({"skip_special_tokens": None}, r"skip_special_tokens must be a boolean"),
    ({"include_stop_str_in_output": "false"}, r"include_stop_str_in_output must be a boolean"),
    ({"stop": "x" * 100_000}, r"stop strings must be at most 256 characters"),
    ({"stop": ["s"] * 17}, r"stop may hold at most 16 strings"),
    ({"stop": ["ok", "\ud800"]}, r"stop strings must be valid Unicode"),
    ({"stop": 5}, r"stop must be a string or a list of strings"),
    ({"stop": [5]}, r"stop strings must be non-empty strings"),
    ({"stop_token_ids": [1] * 257}, r"stop_token_ids may hold at most 256 ids"),
    ({"stop_token_ids": [-1]}, r"stop_token_ids must be non-negative integers"),
    ({"stop_token_ids": [True]}, r"stop_token_ids must be non-negative integers"),
    ({"stop_token_ids": 7}, r"stop_token_ids must be a list of token ids"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_PARAMS, ids=[str(i) for i in range(len(BAD_PARAMS))])
def test_bad_sampling_params_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_the_limits_themselves_are_accepted():
    assert MAX_TEMPERATURE == 100 and MAX_SEED == 2**63 - 1
    SamplingParams(temperature=MAX_TEMPERATURE, repetition_penalty=0.01, seed=0)
    SamplingParams(repetition_penalty=100, seed=MAX_SEED, presence_penalty=-2, frequency_penalty=2)
    SamplingParams(stop=["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS,
                   stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)))
    # numpy numbers are numbers; integers become plain ints.
    params = SamplingParams(temperature=np.float32(0.5), seed=np.int64(3), n=np.int32(2))
    assert type(params.seed) is int and type(params.n) is int and params.seed == 3
    assert SamplingParams(top_k=10**30).top_k == 10**30  # >= the vocabulary: no filter


@pytest.mark.parametrize("ttl", [1e10, NAN, INF, -INF, -1, MAX_SESSION_TTL_S + 1, 10**400, True, "10"])
def test_session_ttl_finite_and_capped(ttl):
    with pytest.raises(ValueError, match=r"session_ttl must be a number of seconds >= 0 and <= 604800"):
        RequestOptions(session_ttl=ttl)
    with pytest.raises(ValueError, match="session_ttl"):
        RequestOptions.from_extra({"session_ttl": ttl})
    assert RequestOptions(session_ttl=MAX_SESSION_TTL_S).session_ttl == MAX_SESSION_TTL_S


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_n": 0}, "max_n must be an integer >= 1"),
        ({"max_n": True}, "max_n must be an integer >= 1"),
        ({"session_ttl_s": NAN}, r"session_ttl_s must be in \[0, 604800\]"),
        ({"session_ttl_s": 1e10}, r"session_ttl_s must be in \[0, 604800\]"),
    ],
)
def test_engine_config_limits(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)
    assert EngineConfig().max_n == 16


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), max_model_len=256, kv_cache_gib=0.1, max_num_seqs=8, max_n=6)


def test_engine_limits_are_value_errors_and_leave_nothing_queued(llm):
    vocab = max(llm.engine.model_config.vocab_size, len(llm.engine.tokenizer))
    cases = [
        (SamplingParams(n=7, max_tokens=2), r"n must be at most 6 \(the engine's max_n\)"),
        (SamplingParams(n=1000, max_tokens=2), r"n must be at most 6"),
        (SamplingParams(stop_token_ids=[vocab], max_tokens=2),
         rf"stop_token_ids: token id {vocab} is outside the vocabulary \[0, {vocab}\)"),
        (SamplingParams(stop_token_ids=[2**64], max_tokens=2), r"stop_token_ids: token id"),
        (SamplingParams(max_tokens=None, min_tokens=10**30), r"min_tokens .* exceeds the context length"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate([[5, 6, 7]], params, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    # What is within the limits runs, including the largest seed with n > 1.
    out = llm.generate([[5, 6, 7]], SamplingParams(n=6, temperature=1.0, seed=2**63 - 1, max_tokens=2,
                                                   stop_token_ids=[vocab - 1]), use_tqdm=False)
    assert len(out[0].outputs) == 6


def test_n_above_max_num_seqs_is_refused(llama_dir):
    small = LLM(str(llama_dir), max_model_len=128, kv_cache_gib=0.05, max_num_seqs=2)
    with pytest.raises(ValueError, match=r"n must be at most 2, the sequences the engine runs at once"):
        small.generate([[5, 6]], SamplingParams(n=3, max_tokens=2), use_tqdm=False)
    assert len(small.generate([[5, 6]], SamplingParams(n=2, max_tokens=2), use_tqdm=False)[0].outputs) == 2


def test_async_engine_refuses_before_anything_is_yielded(llama_dir):
    async def main() -> None:
        engine = AsyncEngine(str(llama_dir), max_model_len=128, kv_cache_gib=0.05, max_num_seqs=4)
        try:
            bad = [
                (SamplingParams(max_tokens=2), {"session_id": "s", "session_ttl": 1e10}, "session_ttl"),
                (SamplingParams(max_tokens=2), {"session_id": "s", "session_ttl": NAN}, "session_ttl"),
                (SamplingParams(n=5, max_tokens=2), {}, "n must be at most 4"),
                (SamplingParams(stop_token_ids=[10**9], max_tokens=2), {}, "stop_token_ids"),
            ]
            for params, kwargs, message in bad:
                with pytest.raises(ValueError, match=message):
                    async for _ in engine.generate([5, 6], params, **kwargs):
                        raise AssertionError("nothing may be yielded")
            outs = [o async for o in engine.generate([5, 6], SamplingParams(max_tokens=2, temperature=0))]
            assert outs[-1].finished
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_serve_flag_max_n_reaches_the_engine():
    from livelm.entrypoints.cli import build_parser
    from livelm.entrypoints.openai.api_server import engine_kwargs_from_args

    args = build_parser().parse_args(["serve", "--max-n", "4"])
    assert engine_kwargs_from_args(args) == {"max_n": 4}
    assert EngineConfig(**engine_kwargs_from_args(args)).max_n == 4
