"""Property-based fuzzing of the request bodies (issue 23): Hypothesis builds bodies for
``/v1/completions``, ``/v1/chat/completions``, ``/tokenize``, ``/detokenize`` and the
``/v1/sessions`` REST routes that mix valid fields with NaN, ±Infinity, huge integers,
negative numbers, lone surrogates, 200-deep nesting, strings of up to 200 KB and wrong types,
and sends them as raw JSON text to one real server. Every answer must be a 2xx with a valid
body or a 4xx with an OpenAI-style error body: never a 5xx, never a hang, never an error in
the middle of a stream that started with 200; and after each case a greedy victim request
still answers exactly as it did before.

The run is bounded and reproducible for CI (``derandomize=True``); set
``LIVELM_FUZZ_EXAMPLES`` to raise the number of examples per endpoint locally.
"""

from __future__ import annotations

import json
import math
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_utils import serve, start_engine, stop_engine

EXAMPLES = int(os.environ.get("LIVELM_FUZZ_EXAMPLES", "40"))
# LIVELM_FUZZ_RANDOM=1 explores new examples on each run instead of CI's fixed ones.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("LIVELM_FUZZ_RANDOM", "") in ("", "0"),
                suppress_health_check=list(HealthCheck))
TIMEOUT = httpx.Timeout(30.0)
VICTIM = {"prompt": "Once upon a time", "temperature": 0, "max_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(llama_dir):
    engine = start_engine(llama_dir, max_model_len=256, max_num_seqs=8)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine, max_waiting=64) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        yield http


@pytest.fixture(scope="module")
def victim(client):
    """Check that the victim answers as it did when the module started."""
    first = client.post("/v1/completions", json=VICTIM)
    assert first.status_code == 200, first.text
    expected = first.json()["choices"][0]["text"]

    def check() -> None:
        r = client.post("/v1/completions", json=VICTIM)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected

    return check


# ------------------------------------------------------------------------ strategies


def _nest(value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value]
    return value


HUGE_TEXT = st.builds(lambda ch, k: ch * k, st.sampled_from(["a", "é", "🙂", " x", "\n"]),
                      st.integers(1_000, 200_000))
ODD_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud800", "", "\x00", "</s>", "é🙂"])
# Values that are wrong for (nearly) every field.
POISON = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 2**64, 2**63, 10**30, -(10**30), -1, 0,
                     1e308, -1e308, 1e-300, True, False, None, "", "x", "\ud800", [], {},
                     [None], {"a": math.nan}, "yes", 2.5]),
    st.integers(-(2**70), 2**70),
    st.integers(1, 200).map(lambda d: _nest(1, d)),
    st.just(_nest([], 200)),
    ODD_TEXT,
    HUGE_TEXT,
)


def _floats(lo: float, hi: float) -> st.SearchStrategy:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


TEXT = st.text(max_size=24)
WORDS = st.text(min_size=1, max_size=24)
TOKENS = st.lists(st.integers(0, 400), min_size=1, max_size=12)
# Valid values of each field: bodies are built from these, then some fields are poisoned.
SAMPLING = {
    "temperature": st.one_of(st.just(0.0), _floats(0, 2)),
    "top_p": _floats(0.05, 1),
    "top_k": st.integers(-1, 50),
    "min_p": _floats(0, 0.5),
    "n": st.integers(1, 3),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.one_of(WORDS, st.lists(WORDS, max_size=4)),
    "stop_token_ids": st.lists(st.integers(0, 400), max_size=4),
    "presence_penalty": _floats(-2, 2),
    "frequency_penalty": _floats(-2, 2),
    "repetition_penalty": _floats(0.5, 2),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 1),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "user": TEXT,
    "session_id": st.sampled_from(["fuzz-a", "fuzz-b"]),
    "session_ttl": _floats(0, 5),
    "cache_salt": TEXT,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "model": st.sampled_from(["gpt-fuzz", ""]),
    "unknown_field": TEXT,
}
MAX_TOKENS = st.integers(1, 4)
PROMPT = st.one_of(WORDS, TOKENS, st.lists(WORDS, min_size=1, max_size=3),
                   st.lists(TOKENS, min_size=1, max_size=3))
CONTENT = st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                                   min_size=1, max_size=3))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                 "content": CONTENT}, optional={"name": WORDS})
TOOL_CALL = st.fixed_dictionaries({
    "id": st.sampled_from(["call_1", "call_2"]), "type": st.just("function"),
    "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g"]),
                                       "arguments": st.sampled_from(["{}", '{"x": 1}', "not json"])})})
TOOL_MESSAGES = st.one_of(
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(),
                           "tool_calls": st.lists(TOOL_CALL, min_size=1, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": st.sampled_from(["call_1", "x"]),
                           "content": TEXT}),
)
MESSAGES = st.lists(st.one_of(MESSAGE, MESSAGE, TOOL_MESSAGES), min_size=1, max_size=4)
# Output constraints (issue 15): small, bounded ones, so a constrained tiny model ends soon.
SMALL_SCHEMA = st.sampled_from([
    {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
     "additionalProperties": False},
    {"type": "string", "enum": ["x", "y"]},
    {"type": "integer", "minimum": 0, "maximum": 9},
])
RESPONSE_FORMAT = st.one_of(
    st.just({"type": "text"}), st.just({"type": "json_object"}),
    st.builds(lambda schema: {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
              SMALL_SCHEMA),
)
STRUCTURED = {
    "response_format": RESPONSE_FORMAT,
    "structured_outputs": st.one_of(
        st.builds(lambda c: {"choice": c}, st.lists(WORDS, min_size=1, max_size=3)),
        st.just({"regex": "[ab]{1,3}"}), st.just({"grammar": 'start: "x" | "yz"'}),
        st.builds(lambda schema: {"json": schema}, SMALL_SCHEMA)),
    "guided_choice": st.lists(WORDS, min_size=1, max_size=3),
    "guided_regex": st.sampled_from(["[0-9]{1,2}", "(a|b)c", "("]),
    "guided_json": SMALL_SCHEMA,
    "guided_grammar": st.just('start: "q"'),
}
TOOL = st.builds(
    lambda name, params, description: {"type": "function", "function": {
        "name": name, **({"parameters": params} if params is not None else {}),
        **({"description": description} if description else {})}},
    st.sampled_from(["f", "g", "get_weather"]),
    st.one_of(st.none(), SMALL_SCHEMA.filter(lambda s: s.get("type") == "object")),
    TEXT,
)
TOOL_CHOICE = st.one_of(
    st.sampled_from(["none", "auto", "required"]),
    st.builds(lambda n: {"type": "function", "function": {"name": n}}, st.sampled_from(["f", "g", "h"])),
)


@st.composite
def bodies(draw, required: dict, optional: dict) -> object:  # noqa: ANN001
    """A valid body (required fields, some optional ones), then: kept clean, one field
    poisoned, several poisoned, or another JSON value altogether."""
    obj = {key: draw(strategy) for key, strategy in required.items()}
    if optional:
        for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=8)):
            obj[key] = draw(optional[key])
    mode = draw(st.sampled_from(["clean", "clean", "one", "one", "one", "many", "other"]))
    keys = sorted({**required, **optional})
    if mode == "one":
        obj[draw(st.sampled_from(keys))] = draw(POISON)
    elif mode == "many":
        for key in draw(st.lists(st.sampled_from(keys), min_size=2, max_size=6)):
            obj[key] = draw(POISON)
    elif mode == "other":
        return draw(POISON)
    return obj


COMPLETION = bodies({"prompt": PROMPT, "max_tokens": MAX_TOKENS}, {
    **SAMPLING, **STRUCTURED, "echo": st.booleans(), "logprobs": st.integers(0, 3), "suffix": st.just(""),
    "best_of": st.just(1),
})
CHAT = bodies({"messages": MESSAGES, "max_tokens": MAX_TOKENS}, {
    **SAMPLING, "max_completion_tokens": MAX_TOKENS, "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 3), **STRUCTURED,
    "tools": st.lists(TOOL, max_size=3), "tool_choice": TOOL_CHOICE,
    "parallel_tool_calls": st.booleans(),
})
TOKENIZE = st.one_of(bodies({"prompt": TEXT}, {"add_special_tokens": st.booleans()}),
                     bodies({"messages": MESSAGES}, {"add_special_tokens": st.booleans()}))
DETOKENIZE = bodies({"tokens": st.lists(st.integers(0, 400), max_size=12)}, {})
SESSION_OPEN = bodies({}, {"session_id": st.text("abc-_.:", min_size=1, max_size=12),
                           "cache_salt": TEXT})
SESSION_INPUT = st.one_of(
    bodies({"text": WORDS}, {"mode": st.sampled_from(["append", "replace"]), "close": st.booleans()}),
    bodies({"bytes": st.sampled_from(["aGk=", "w6k=", "IA=="])}, {"close": st.booleans()}),
    bodies({"close": st.just(True)}, {}),
)
SESSION_GENERATE = bodies({"max_tokens": MAX_TOKENS}, {
    **{k: v for k, v in SAMPLING.items() if k not in ("session_id", "session_ttl", "cache_salt")},
    "suffix": st.one_of(TEXT, TOKENS), "logprobs": st.integers(0, 3), "echo": st.just(False),
})


# ------------------------------------------------------------------------ checks


def raw_json(value: object) -> bytes:
    """JSON text as a client may write it: NaN/Infinity literals, \\ud800 escapes."""
    return json.dumps(value, allow_nan=True).encode()


def post(client: httpx.Client, path: str, value: object) -> httpx.Response:
    return client.post(path, content=raw_json(value), headers={"Content-Type": "application/json"})


def check_answer(r: httpx.Response, kind: str) -> dict | None:
    """2xx with a valid body, or 4xx with an OpenAI error body; the JSON of a 2xx."""
    assert r.status_code < 500, r.text[:2000]
    if os.environ.get("LIVELM_FUZZ_LOG"):
        with open(os.environ["LIVELM_FUZZ_LOG"], "a") as log:
            log.write(f"{kind} {r.status_code} {r.text[:160]!r}\n")
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        return None
    assert r.status_code == 200, r.text[:2000]
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-500:]
        for event in events[:-1]:
            chunk = json.loads(event)
            assert "error" not in chunk, chunk  # a stream must not fail after its 200
            assert chunk["object"] in ("text_completion", "chat.completion.chunk")
        return None
    data = r.json()
    if kind == "completion":
        assert data["object"] == "text_completion" and data["choices"]
        assert all(isinstance(c["text"], str) for c in data["choices"])
    elif kind == "chat":
        assert data["object"] == "chat.completion" and data["choices"]
    elif kind == "tokenize":
        assert data["count"] == len(data["tokens"])
    elif kind == "detokenize":
        assert isinstance(data["prompt"], str)
    return data


def _release_sessions(client: httpx.Client) -> None:
    for sid in ("fuzz-a", "fuzz-b"):  # pinned KV of accepted session turns
        client.delete(f"/v1/sessions/{sid}")


# ------------------------------------------------------------------------ the properties


@FUZZ
@given(value=COMPLETION)
def test_fuzz_completions(client, victim, value):
    check_answer(post(client, "/v1/completions", value), "completion")
    _release_sessions(client)
    victim()


@FUZZ
@given(value=CHAT)
def test_fuzz_chat_completions(client, victim, value):
    check_answer(post(client, "/v1/chat/completions", value), "chat")
    _release_sessions(client)
    victim()


@FUZZ
@given(tokenize=TOKENIZE, detokenize=DETOKENIZE)
def test_fuzz_tokenize_and_detokenize(client, victim, tokenize, detokenize):
    check_answer(post(client, "/tokenize", tokenize), "tokenize")
    check_answer(post(client, "/detokenize", detokenize), "detokenize")
    victim()


@FUZZ
@given(opening=SESSION_OPEN, feed=st.lists(SESSION_INPUT, min_size=1, max_size=3),
       generate=SESSION_GENERATE)
def test_fuzz_input_sessions(client, victim, opening, feed, generate):
    r = post(client, "/v1/sessions", opening)
    state = check_answer(r, "session")
    if state is None:
        return victim()
    sid = state["session_id"]
    try:
        for piece in feed:
            check_answer(post(client, f"/v1/sessions/{sid}/input", piece), "session")
        check_answer(post(client, f"/v1/sessions/{sid}/generate", generate), "completion")
        check_answer(client.get(f"/v1/sessions/{sid}"), "session")
    finally:
        assert client.delete(f"/v1/sessions/{sid}").status_code == 200
    victim()


def test_fuzzing_left_nothing_behind(server, client, victim):
    victim()
    state = server.app.state.livelm
    assert state.admission.in_flight == 0
    assert state.engine.num_input_streams == 0
