"""The OpenAI-compatible server driven by the official ``openai`` client: completions and
chat, streamed and whole, n, logprobs, echo, stop, seed, usage, and greedy equality with
the offline ``LLM.generate``."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest
from server_utils import serve, sse_events, start_engine, stop_engine

from livelm import SamplingParams
from livelm.engine.llm import LLM

PROMPTS = [
    "The quick brown fox",
    "Paris is the capital of",
    "def add(a, b):",
    "Numbers 0 1 2 3",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there!"},
]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(llama_dir):
    """One real server on the tiny Llama model for the whole module."""
    engine = start_engine(llama_dir)
    with serve(engine) as srv:
        srv.engine = engine
        yield srv
    stop_engine(engine)


@pytest.fixture(scope="module")
def offline(llama_dir):
    """The offline engine whose greedy outputs the server must reproduce."""
    return LLM(str(llama_dir), max_model_len=256, kv_cache_gib=0.25)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.engine.model_name


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


def test_health_and_models(server, client, model):
    assert httpx.get(f"{server.url}/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [model]


def test_completion_greedy_equals_offline(client, model, offline):
    expected = offline.generate(PROMPTS, greedy(), use_tqdm=False)
    for prompt, ref in zip(PROMPTS, expected, strict=True):
        r = client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        assert r.object == "text_completion"
        assert r.choices[0].text == ref.outputs[0].text
        assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # A list of prompts is one request whose choices follow the prompts' order.
    batch = client.completions.create(
        model=model, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0
    )
    assert [c.index for c in batch.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in batch.choices] == [ref.outputs[0].text for ref in expected]
    assert batch.usage.prompt_tokens == sum(len(ref.prompt_token_ids) for ref in expected)


def test_sampling_fields_reach_the_engine(client, model, offline):
    """Every sampling field maps onto SamplingParams: same settings, same greedy text."""
    fields = dict(presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.3, top_k=5,
                  min_p=0.01, top_p=0.9)
    ref = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **fields),
                           use_tqdm=False)[0]
    plain = offline.generate(PROMPTS[0], greedy(), use_tqdm=False)[0]
    assert ref.outputs[0].text != plain.outputs[0].text  # the penalties do change this output
    extra = {k: fields[k] for k in ("repetition_penalty", "top_k", "min_p")}
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                  presence_penalty=0.5, frequency_penalty=0.7, top_p=0.9,
                                  user="someone", extra_body=extra)
    assert r.choices[0].text == ref.outputs[0].text
    chat_ref = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **fields),
                            use_tqdm=False)[0]
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                       presence_penalty=0.5, frequency_penalty=0.7, top_p=0.9,
                                       extra_body=extra)
    assert r.choices[0].message.content == chat_ref.outputs[0].text


def test_token_id_prompts(client, model, offline):
    ids = [offline.tokenizer(p).input_ids for p in PROMPTS[:2]]
    expected = offline.generate(ids, greedy(), use_tqdm=False)
    single = client.completions.create(
        model=model, prompt=ids[0], max_tokens=MAX_TOKENS, temperature=0
    )
    assert single.choices[0].text == expected[0].outputs[0].text
    both = client.completions.create(model=model, prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in both.choices] == [e.outputs[0].text for e in expected]


def test_chat_greedy_equals_offline(client, model, offline):
    ref = offline.chat(CHAT, greedy(), use_tqdm=False)[0]
    r = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    # Text parts are the same message as a plain string; max_completion_tokens is max_tokens.
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "Hello there!"}]}]
    r2 = client.chat.completions.create(
        model=model, messages=parts, max_completion_tokens=MAX_TOKENS, temperature=0
    )
    assert r2.choices[0].message.content == ref.outputs[0].text


def test_chat_default_max_tokens_fills_context(client, model, server):
    # No limit given: generation may run to the end of the context, as OpenAI chat does.
    r = client.chat.completions.create(
        model=model, messages=CHAT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.total_tokens == server.engine.max_model_len
    assert r.choices[0].finish_reason == "length"


def _joined_stream(stream) -> tuple[dict[int, str], dict[int, str], object]:  # noqa: ANN001
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


@pytest.mark.parametrize("n", [1, 2])
def test_completion_stream_equals_whole_with_seed(client, model, n):
    kwargs = dict(
        model=model, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0.9, seed=1234, n=n
    )
    whole = client.completions.create(**kwargs)
    texts, reasons, usage = _joined_stream(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage.model_dump() == whole.usage.model_dump()
    assert len(whole.choices) == n


@pytest.mark.parametrize("n", [1, 2])
def test_chat_stream_equals_whole_with_seed(client, model, n):
    kwargs = dict(model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0.9, seed=99, n=n)
    whole = client.chat.completions.create(**kwargs)
    texts, reasons, usage = _joined_stream(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage.model_dump() == whole.usage.model_dump()


def test_seed_reproducible_and_n_choices_differ(client, model):
    kwargs = dict(
        model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=1.0, seed=7, n=2
    )
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # two samples, not one copied


def test_stop_string(client, model, offline):
    full = offline.generate(PROMPTS[0], greedy(), use_tqdm=False)[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    r = client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    texts, reasons, _ = _joined_stream(
        client.completions.create(
            model=model,
            prompt=PROMPTS[0],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stop=stop,
            stream=True,
        )
    )
    assert texts == {0: r.choices[0].text} and reasons == {0: "stop"}


def test_usage_and_length(server, client, model):
    r = client.completions.create(
        model=model, prompt=PROMPTS[2], max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    tokenized = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPTS[2]}).json()
    assert r.usage.prompt_tokens == tokenized["count"]
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"


def test_completion_logprobs(client, model):
    r = client.completions.create(
        model=model,
        prompt=PROMPTS[0],
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert (
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    )
    assert all(v <= 0 for v in lp.token_logprobs)
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        # At most 3 (fewer when different tokens decode to the same text, e.g. partial UTF-8).
        assert 1 <= len(top) <= 3
        # Greedy: the chosen token is the most likely one.
        assert max(top.values()) <= value + 1e-4
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # The streamed logprobs are the same, spread over the chunks.
    streamed = {"tokens": [], "token_logprobs": []}
    for chunk in client.completions.create(
        model=model,
        prompt=PROMPTS[0],
        max_tokens=6,
        temperature=0,
        logprobs=3,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        for choice in chunk.choices:
            if choice.logprobs:
                streamed["tokens"] += choice.logprobs.tokens
                streamed["token_logprobs"] += choice.logprobs.token_logprobs
    assert streamed["tokens"] == lp.tokens
    assert streamed["token_logprobs"] == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_completion_echo(client, model):
    r = client.completions.create(
        model=model,
        prompt=PROMPTS[1],
        max_tokens=4,
        temperature=0,
        echo=True,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    plain = client.completions.create(
        model=model, prompt=PROMPTS[1], max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == PROMPTS[1] + plain.choices[0].text
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes it
    assert lp.text_offset[r.usage.prompt_tokens] == len(PROMPTS[1])  # generated text follows the prompt
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    texts, _, _ = _joined_stream(
        client.completions.create(
            model=model,
            prompt=PROMPTS[1],
            max_tokens=4,
            temperature=0,
            echo=True,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert texts == {0: r.choices[0].text}


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=CHAT,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert 1 <= len(entry.top_logprobs) <= 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
    plain = client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_sse_wire_format(server, model):
    """Raw SSE: ``data:`` events only, the chat role first, ``[DONE]`` last."""
    body = {"model": model, "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"][0]["delta"] == {}

    body = {
        "model": model,
        "prompt": "Hi",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_tokenize_detokenize(server, offline):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPTS[3]}).json()
    assert ids["tokens"] == offline.tokenizer(PROMPTS[3]).input_ids
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 256
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids["tokens"]}).json()
    assert text["prompt"] == PROMPTS[3]
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == offline.engine.chat_ids(CHAT)


def test_one_json_log_line_per_request(client, model, caplog):
    with caplog.at_level(logging.INFO, logger="livelm.server.requests"):
        r = client.completions.create(model=model, prompt="Hi", max_tokens=3, temperature=0)
    records = [
        json.loads(rec.getMessage())
        for rec in caplog.records
        if rec.name == "livelm.server.requests"
    ]
    mine = [rec for rec in records if rec["request_id"] == r.id]
    assert len(mine) == 1
    assert mine[0]["status"] == 200 and mine[0]["completion_tokens"] == r.usage.completion_tokens
    assert mine[0]["prompt_tokens"] == r.usage.prompt_tokens and mine[0]["ttft_s"] is not None
