"""Structured output over the OpenAI API (issue 15): ``response_format`` (json_object and
json_schema) on chat and completions, vLLM's ``structured_outputs`` (json, json_object,
regex, choice, grammar) and its legacy ``guided_*`` names, streamed and whole, on the tiny
model under temperature > 0; the official client's ``chat.completions.parse`` on the
default model; ``finish_reason="length"`` when max_tokens cuts a structure; and a 400 for
every bad constraint before any compute."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field
from server_utils import serve, sse_events, stop_engine

C, CHAT = "/v1/completions", "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


class Street(BaseModel):
    model_config = {"extra": "forbid"}  # no other keys: the output stays bounded
    name: str = Field(max_length=12)
    lanes: int = Field(ge=1, le=8)


class City(BaseModel):
    """Nested objects, an array and enums: the kind of schema apps send."""

    model_config = {"extra": "forbid"}
    name: str = Field(max_length=16)
    country: Literal["France", "Italy", "Norway"]
    capital: bool
    streets: list[Street] = Field(min_length=1, max_length=2)


CITY_SCHEMA = City.model_json_schema()


def post(server, path: str, body: dict) -> httpx.Response:  # noqa: ANN001
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def texts(server, path: str, body: dict) -> tuple[list[str], list[str]]:  # noqa: ANN001
    """The choices' texts and finish reasons of a whole reply."""
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    key = (lambda c: c["message"]["content"]) if path == CHAT else (lambda c: c["text"])
    return [key(c) for c in choices], [c["finish_reason"] for c in choices]


def streamed_text(server, path: str, body: dict) -> tuple[str, str | None]:  # noqa: ANN001
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    text, reason = "", None
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, chunk
        for c in chunk["choices"]:
            text += (c["delta"].get("content") or "") if path == CHAT else c["text"]
            reason = c["finish_reason"] or reason
    return text, reason


SAMPLED = {"temperature": 1.0, "max_tokens": 300}
CITY_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
KINDS = [
    # (extra fields, check of one output)
    ({"response_format": CITY_FORMAT}, lambda t: City.model_validate_json(t)),
    ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict) or 1 / 0),
    ({"structured_outputs": {"json": CITY_SCHEMA}}, lambda t: City.model_validate_json(t)),
    ({"structured_outputs": {"json": json.dumps(CITY_SCHEMA)}}, lambda t: City.model_validate_json(t)),
    ({"structured_outputs": {"json_object": True}}, lambda t: isinstance(json.loads(t), dict) or 1 / 0),
    ({"structured_outputs": {"regex": r"[a-c]{2,5}-\d{3}"}},
     lambda t: re.fullmatch(r"[a-c]{2,5}-\d{3}", t) or 1 / 0),
    ({"structured_outputs": {"choice": ["yes", "no", "maybe"]}}, lambda t: t in ("yes", "no", "maybe") or 1 / 0),
    ({"structured_outputs": {"grammar": 'start: "(" item ("," item)* ")"\nitem: "a" | "bb"'}},
     lambda t: re.fullmatch(r"\((a|bb)(,(a|bb))*\)", t) or 1 / 0),
    ({"guided_json": CITY_SCHEMA}, lambda t: City.model_validate_json(t)),
    ({"guided_regex": "(ab|cd)+x"}, lambda t: re.fullmatch("(ab|cd)+x", t) or 1 / 0),
    ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green") or 1 / 0),
    ({"guided_grammar": 'start: "x"+ "y"'}, lambda t: re.fullmatch("x+y", t) or 1 / 0),
]


@pytest.mark.parametrize(("fields", "check"), KINDS, ids=[next(iter(k[0])) + f"-{i}" for i, k in enumerate(KINDS)])
def test_every_kind_holds_under_sampling_on_both_apis(server, fields, check):
    for path, prompt in ((CHAT, {"messages": MESSAGES}), (C, {"prompt": "A city:"})):
        outputs, reasons = texts(server, path, {**prompt, **SAMPLED, **fields, "n": 3, "seed": 7})
        for text, reason in zip(outputs, reasons, strict=True):
            if "json_object" in json.dumps(fields) and reason == "length":
                # Any JSON object may be as long as a random model makes it: a reply cut
                # by max_tokens is the start of one.
                assert text.startswith("{"), text
                continue
            assert reason == "stop", (text, reason)
            check(text)
        # The same request streamed: the same text for the same seed (n=1).
        body = {**prompt, **SAMPLED, **fields, "seed": 3}
        (whole,), _ = texts(server, path, body)
        streamed, reason = streamed_text(server, path, body)
        assert streamed == whole
        if reason == "stop":
            check(streamed)


def test_openai_client_parse_round_trips_on_the_default_model():
    """``client.chat.completions.parse(response_format=PydanticModel)`` on the default model
    (SmolLM2-135M-Instruct): the reply parses into the model class."""
    from livelm.engine.async_engine import AsyncEngine

    engine = AsyncEngine(None, max_model_len=2048, kv_cache_gib=0.25)
    try:
        with serve(engine) as srv:
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
            model = client.models.list().data[0].id
            completion = client.chat.completions.parse(
                model=model, response_format=City, temperature=0, max_tokens=300,
                messages=[{"role": "system", "content": "Reply in JSON."},
                          {"role": "user", "content": "Describe Paris, the capital of France."}],
            )
            message = completion.choices[0].message
            assert completion.choices[0].finish_reason == "stop"
            assert isinstance(message.parsed, City)
            assert message.parsed == City.model_validate_json(message.content)
    finally:
        stop_engine(engine)


def test_max_tokens_cutting_a_structure_finishes_with_length(server):
    for path, prompt in ((CHAT, {"messages": MESSAGES}), (C, {"prompt": "A city:"})):
        (text,), (reason,) = texts(server, path, {**prompt, "response_format": CITY_FORMAT,
                                                  "max_tokens": 3, "temperature": 1.0, "seed": 1})
        assert reason == "length"
        assert text.startswith("{")
        _, reason = streamed_text(server, path, {**prompt, "response_format": CITY_FORMAT,
                                                 "max_tokens": 3, "temperature": 1.0, "seed": 1})
        assert reason == "length"


def test_text_format_is_no_constraint(server):
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 8}
    assert texts(server, CHAT, {**body, "response_format": {"type": "text"}}) == texts(server, CHAT, body)
    body = {"prompt": "A city:", "temperature": 0, "max_tokens": 8}
    assert texts(server, C, {**body, "response_format": {"type": "text"}}) == texts(server, C, body)


BAD = [
    # (route, fields, param, words): refused before any compute, with and without stream
    (CHAT, {"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "at most one"),
    (C, {"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]}, "guided_choice", "at most one"),
    (C, {"response_format": CITY_FORMAT, "structured_outputs": {"json_object": True}},
     "structured_outputs", "at most one"),
    (C, {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    (C, {"structured_outputs": {}}, "structured_outputs", "exactly one"),
    (C, {"structured_outputs": {"json_object": False}}, "structured_outputs", "exactly one"),
    (C, {"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", None),
    (C, {"structured_outputs": "a+"}, "structured_outputs", None),
    (C, {"structured_outputs": {"choice": []}}, "structured_outputs.choice", None),
    (C, {"structured_outputs": {"choice": ["ok", ""]}}, "structured_outputs", "non-empty"),
    (C, {"structured_outputs": {"regex": ""}}, "structured_outputs", "non-empty"),
    (C, {"structured_outputs": {"grammar": "x" * 100_001}}, "structured_outputs", "at most 100000"),
    (C, {"guided_choice": ["a"] * 1025}, "guided_choice", None),
    (C, {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    (C, {"guided_json": "[1, 2]"}, "guided_json", "must be an object"),
    (CHAT, {"response_format": {"type": "bogus"}}, "response_format", None),
    (CHAT, {"response_format": {}}, "response_format", None),
    (CHAT, {"response_format": "json_object"}, "response_format", None),
    (CHAT, {"response_format": {"type": "json_schema"}}, "response_format.json_schema", None),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", None),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}},
     "response_format.json_schema.name", None),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema", None),
    (C, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {},
                                                                    "strict": "yes"}}},
     "response_format.json_schema.strict", None),
]


@pytest.mark.parametrize(("route", "fields", "param", "words"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_constraints_get_a_400(server, route, fields, param, words):
    prompt = {"messages": MESSAGES} if route == CHAT else {"prompt": "hi"}
    for stream in (False, True):
        r = post(server, route, {**prompt, "max_tokens": 2, **fields, "stream": stream})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
        if words:
            assert words in error["message"], error


UNCOMPILABLE = [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"guided_regex": "a{5,2}"}, "guided_regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}}}}, "response_format"),
    ({"structured_outputs": {"json": {"type": "no-such-type"}}}, "structured_outputs"),
]


@pytest.mark.parametrize(("fields", "param"), UNCOMPILABLE, ids=[str(i) for i in range(len(UNCOMPILABLE))])
def test_constraints_that_do_not_compile_get_a_400_before_compute(server, fields, param):
    for route, prompt in ((C, {"prompt": "hi"}), (CHAT, {"messages": MESSAGES})):
        for stream in (False, True):
            r = post(server, route, {**prompt, "max_tokens": 2, **fields, "stream": stream})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == param and error["code"] == "invalid_structured_output", error


STREAM_REPLY_KINDS = [
    ({"response_format": CITY_FORMAT}, lambda t: City.model_validate_json(t)),
    ({"structured_outputs": {"regex": r"[a-c]{2,5}-\d{3}"}},
     lambda t: re.fullmatch(r"[a-c]{2,5}-\d{3}", t) or 1 / 0),
    ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green") or 1 / 0),
]


def test_stream_replies_follow_their_constraints(server):
    """Replies to streamed input (``/v1/sessions/{id}/generate`` and ``/v1/stream``
    generate events) take the same constraint fields: each reply, whole and streamed over
    SSE and over the WebSocket, validates; a constraint that does not compile and tools
    get a 400 naming the field; the session keeps serving afterwards."""
    from websockets.sync.client import connect

    base = f"{server.url}/v1/sessions/structured-reply"
    assert post(server, "/v1/sessions", {"session_id": "structured-reply"}).status_code == 200
    try:
        post(server, "/v1/sessions/structured-reply/input", {"text": "A city, as JSON:"})
        for fields, check in STREAM_REPLY_KINDS:
            body = {**SAMPLED, **fields, "seed": 5}
            r = httpx.post(f"{base}/generate", json=body, timeout=120)
            assert r.status_code == 200, r.text
            (choice,) = r.json()["choices"]
            assert choice["finish_reason"] == "stop", choice
            check(choice["text"])
            with httpx.stream("POST", f"{base}/generate", json={**body, "stream": True},
                              timeout=120) as streamed:
                events = sse_events(streamed)
            text = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
            assert text == choice["text"]
        for fields, param in (({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
                              ({"guided_json": {"type": "nonsense"}}, "guided_json"),
                              ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")):
            r = post(server, "/v1/sessions/structured-reply/generate", {"max_tokens": 2, **fields})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param
        r = post(server, "/v1/sessions/structured-reply/generate", {"max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        httpx.delete(base, timeout=10)

    with connect(server.url.replace("http://", "ws://") + "/v1/stream") as ws:
        ws.send(json.dumps({"type": "append", "text": "A city, as JSON:"}))
        for i, (fields, check) in enumerate(STREAM_REPLY_KINDS):
            ws.send(json.dumps({"type": "generate", "id": f"r{i}", **SAMPLED, **fields, "seed": 5}))
            text, done = "", None
            while done is None:
                event = json.loads(ws.recv(timeout=120))
                assert event["type"] != "error", event
                if event["type"] == "delta":
                    text += event["text"]
                elif event["type"] == "done":
                    done = event
            assert done["finish_reason"] == "stop", done
            check(text)
        ws.send(json.dumps({"type": "generate", "structured_outputs": {"regex": "(unclosed"}}))
        while (event := json.loads(ws.recv(timeout=60)))["type"] != "error":
            pass
        assert event["status"] == 400 and event["param"] == "structured_outputs", event
