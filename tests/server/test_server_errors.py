"""What the server refuses and how: 400 for each class of invalid parameter (OpenAI error
body naming the parameter), 404 for an unknown model, 401 without the key, 413 for a huge
body, 503 + Retry-After past the waiting bound, CORS only when configured, and an engine
failure mid-stream reported in-band."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server_utils import (
    FailingEngine,
    scrape,
    serve,
    sse_events,
    start_engine,
    stop_engine,
    wait_until,
)

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def engine(llama_dir):
    engine = start_engine(llama_dir, max_num_seqs=1, max_model_len=1024)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def server(engine):
    """The engine behind a key, a 64 KiB body limit and room for one waiting sequence."""
    with serve(engine, api_key=KEY, max_body_bytes=65536, max_running=1, max_waiting=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _post(server, path: str, body, auth: dict) -> httpx.Response:  # noqa: ANN001
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}{path}",
        content=content,
        headers={**auth, "Content-Type": "application/json"},
        timeout=30,
    )


def _assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]

INVALID = [
    # (route, body, param): one of each kind of mistake.
    (C, {"prompt": "x", "temperature": -0.5}, "temperature"),
    (C, {"prompt": "x", "top_p": 0}, "top_p"),
    (C, {"prompt": "x", "top_p": 1.5}, "top_p"),
    (C, {"prompt": "x", "top_k": -3}, "top_k"),
    (C, {"prompt": "x", "min_p": 1.5}, "min_p"),
    (C, {"prompt": "x", "n": 0}, "n"),
    (C, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    (C, {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    (C, {"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
    (C, {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    (C, {"prompt": "x", "logprobs": 50}, "logprobs"),
    (C, {"prompt": "x", "stop": [""]}, "stop"),
    (C, {"prompt": "x", "stop": 5}, "stop"),
    (C, {"prompt": "x", "seed": "abc"}, "seed"),
    (C, {"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
    (C, {"prompt": "x", "stream": "sometimes"}, "stream"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (C, {"prompt": []}, "prompt"),
    (C, {"prompt": ""}, None),
    (C, {"prompt": [1, 2, 100000]}, "prompt"),
    (C, {"max_tokens": 3}, "prompt"),
    (C, {"prompt": {"text": "x"}}, "prompt"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    (
        CHAT,
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        None,
    ),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": MSG, "max_completion_tokens": -1}, "max_completion_tokens"),
    # Tools are served since issue 15; a malformed one is still a 400.
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools.0.function.name"),
    (CHAT, {"messages": MSG, "temperature": "hot"}, "temperature"),
    ("/tokenize", {"prompt": "x", "messages": MSG}, "prompt"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
]


@pytest.mark.parametrize(
    ("route", "body", "param"), INVALID, ids=[f"{r}-{p}-{i}" for i, (r, _, p) in enumerate(INVALID)]
)
def test_invalid_parameters_are_400(server, auth, route, body, param):
    error = _assert_openai_error(_post(server, route, body, auth), 400, param)
    assert error["type"] == "invalid_request_error"


def test_malformed_json_is_400(server, auth):
    for raw in (b"{not json", b"", b"[1, 2]", b'{"prompt": "x",}'):
        _assert_openai_error(_post(server, C, raw, auth), 400)


def test_prompt_too_long_is_400_with_numbers(server, auth, engine):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 100
    r = _post(server, C, {"prompt": long_prompt, "max_tokens": 5}, auth)
    error = _assert_openai_error(r, 400)
    assert str(engine.max_model_len) in error["message"]
    assert any(ch.isdigit() for ch in error["message"].replace(str(engine.max_model_len), ""))
    # Within the context alone, but not with max_tokens on top.
    r = _post(server, C, {"prompt": "Hello", "max_tokens": engine.max_model_len}, auth)
    assert str(engine.max_model_len) in _assert_openai_error(r, 400)["message"]
    r = _post(server, CHAT, {"messages": [{"role": "user", "content": long_prompt}]}, auth)
    error = _assert_openai_error(r, 400, "messages")
    assert str(engine.max_model_len) in error["message"]


def test_openai_client_sees_bad_request(server, engine):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=engine.model_name, prompt="x", temperature=-1)
    assert info.value.body["param"] == "temperature" and "temperature" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=engine.model_name, messages=MSG, n=0, stream=True)
    assert info.value.body["param"] == "n"


def test_unknown_model_is_404(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MSG, max_tokens=2)


def test_api_key(server, engine):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", C),
            ("POST", CHAT),
            ("POST", "/tokenize"),
        ):
            r = httpx.request(method, f"{server.url}{path}", headers=headers, json={"prompt": "x"})
            error = _assert_openai_error(r, 401)
            assert r.headers["www-authenticate"] == "Bearer" and error["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=engine.model_name, prompt="x", max_tokens=2).choices
    assert scrape(server.url)['livelm_requests_rejected_total{reason="unauthorized"}'] >= 12


def test_body_too_large_is_413(server, auth):
    r = _post(server, C, {"prompt": "x" * 70000}, auth)
    assert _assert_openai_error(r, 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(70):
            yield b" " * 1000

    r = httpx.post(
        f"{server.url}{C}", content=chunks(), headers={**auth, "Content-Type": "application/json"}
    )
    _assert_openai_error(r, 413)


def test_queue_full_is_503_with_retry_after(server, auth, engine):
    """One sequence runs and one may wait; a third concurrent one is refused."""
    body = {
        "model": engine.model_name,
        "prompt": "Hello",
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(headers=auth, timeout=30) as http:
        with (
            http.stream("POST", f"{server.url}{C}", json=body) as first,
            http.stream("POST", f"{server.url}{C}", json=body) as second,
        ):
            assert first.status_code == second.status_code == 200
            first_lines = first.iter_lines()  # keep it: a dropped iterator closes the response
            next(first_lines)
            r = http.post(f"{server.url}{C}", json={**body, "stream": False, "max_tokens": 2})
            error = _assert_openai_error(r, 503)
            assert error["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
            # Sequences are counted (prompts times n), so a request for several is refused as
            # well (n=2 would be a 400 here: more than the engine's max_num_seqs of 1).
            r = http.post(f"{server.url}{C}", json={"prompt": ["a", "b"], "max_tokens": 2})
            _assert_openai_error(r, 503)
        # Leaving early aborts both; once the server has noticed, requests fit again.
        assert wait_until(lambda: scrape(server.url)["livelm_server_sequences_in_flight"] == 0)
        r = http.post(f"{server.url}{C}", json={**body, "stream": False, "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert scrape(server.url)['livelm_requests_rejected_total{reason="queue_full"}'] == 2


def test_cors_off_by_default_and_on_when_configured(engine):
    origin = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with serve(engine) as srv:
        r = httpx.options(f"{srv.url}{C}", headers=origin)
        assert "access-control-allow-origin" not in r.headers
    with serve(engine, cors_origins=("https://app.example",), api_key=KEY) as srv:
        r = httpx.options(
            f"{srv.url}{C}", headers={**origin, "Access-Control-Request-Headers": "authorization"}
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.get(f"{srv.url}/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_engine_failure_mid_stream_is_reported_in_band(engine):
    """After the first bytes, an error can only travel as an SSE event; the stream still ends."""
    with serve(FailingEngine(engine, fail_after=2)) as srv:
        body = {"prompt": "Hi", "max_tokens": 8, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{srv.url}{C}", json=body) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "engine step failed" in error["message"]
        r = httpx.post(f"{srv.url}{C}", json={**body, "stream": False})
        assert _assert_openai_error(r, 500)["type"] == "server_error"
        assert scrape(srv.url)["livelm_server_sequences_in_flight"] == 0
