"""The RL API over HTTP (/v1/rl/*, docs/rl.md) on a real uvicorn server: off by default,
behind the API key, weight updates from a path, rollouts with weight versions and
sampling logprobs, pause/resume/abort-all, fork/join equal to plain rollouts, and every
malformed field a 4xx with an OpenAI error body while the engine keeps serving."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from server_utils import serve, start_engine, stop_engine, wait_until
from tiny_models import build_tiny_model

KEY = "sk-rl-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl-api")
    return build_tiny_model(root / "a", "llama", seed=0), build_tiny_model(root / "b", "llama", seed=1)


@pytest.fixture(scope="module")
def engine(models):
    engine = start_engine(models[0], max_model_len=1024, kv_cache_gib=0.05)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine, api_key=KEY, enable_rl_api=True) as srv:
        yield srv


def _post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={**AUTH, "Content-Type": "application/json"}, **kw)


def _rollout(server, prompt, max_tokens: int, **fields) -> dict:
    r = _post(server, "/v1/rl/generate", {"prompt": prompt, "max_tokens": max_tokens, **GREEDY, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_off_by_default_and_behind_the_key(engine, server):
    with serve(engine, api_key=KEY) as plain:
        assert httpx.get(f"{plain.url}/v1/rl/weight_version", headers=AUTH).status_code == 404
    assert httpx.get(f"{server.url}/v1/rl/weight_version").status_code == 401
    r = httpx.get(f"{server.url}/v1/rl/weight_version", headers=AUTH)
    assert r.status_code == 200 and isinstance(r.json()["weight_version"], int)


def test_rollout_carries_versions_and_sampling_logprobs(server):
    out = _rollout(server, "The quick brown fox", 8, temperature=0.8, seed=1)
    assert len(out["token_ids"]) == 8
    assert len(out["weight_versions"]) == 8 and len(out["sampling_logprobs"]) == 8
    assert all(lp <= 0.0 for lp in out["sampling_logprobs"])


def test_update_weights_from_path(engine, server, models):
    a, b = models
    before = _rollout(server, "Paris is the capital of", 10)
    version = httpx.get(f"{server.url}/v1/rl/weight_version", headers=AUTH).json()["weight_version"]
    r = _post(server, "/v1/rl/update_weights", {"path": str(b), "mode": "continue"})
    assert r.status_code == 200, r.text
    assert r.json()["weight_version"] == version + 1
    after = _rollout(server, "Paris is the capital of", 10)
    assert after["token_ids"] != before["token_ids"]
    assert set(after["weight_versions"]) == {version + 1}
    r = _post(server, "/v1/rl/update_weights", {"path": str(a), "mode": "wait"})
    assert r.status_code == 200
    assert _rollout(server, "Paris is the capital of", 10)["token_ids"] == before["token_ids"]


def test_malformed_update_is_a_400_and_changes_nothing(server, tmp_path):
    before = _rollout(server, "Paris is the capital of", 6)
    version = httpx.get(f"{server.url}/v1/rl/weight_version", headers=AUTH).json()["weight_version"]
    other = build_tiny_model(tmp_path / "qwen", "qwen3")  # another architecture: shapes differ
    for body in [{"path": str(other)}, {"path": str(tmp_path / "missing")}, {"path": ""},
                 {"path": 3}, {"path": str(other), "mode": "sometimes"}, {}]:
        r = _post(server, "/v1/rl/update_weights", body)
        assert r.status_code == 400, (body, r.text)
        assert "message" in r.json()["error"]
    assert httpx.get(f"{server.url}/v1/rl/weight_version", headers=AUTH).json()["weight_version"] == version
    assert _rollout(server, "Paris is the capital of", 6)["token_ids"] == before["token_ids"]


def test_pause_resume_abort_all(engine, server):
    results = {}

    def run():
        results["out"] = _rollout(server, "The quick brown fox", 900)

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_until(lambda: engine.stats().num_running == 1)
    assert _post(server, "/v1/rl/pause", {}).json() == {"paused": True}
    computed = engine._engine.scheduler.num_computed_tokens
    time.sleep(0.2)
    assert engine._engine.scheduler.num_computed_tokens == computed
    assert _post(server, "/v1/rl/resume", {}).json() == {"paused": False}
    assert wait_until(lambda: engine._engine.scheduler.num_computed_tokens > computed)
    assert _post(server, "/v1/rl/abort_all", {}).json()["aborted"] == 1
    thread.join(30)
    assert results["out"]["finish_reason"] == "abort" and len(results["out"]["token_ids"]) < 900


def test_fork_join_over_http_equals_plain_rollouts(engine, server):
    prompt = "The quick brown fox jumps over the lazy dog."
    prompt_ids = engine.encode(prompt)
    results = {}

    def run():
        results["parent"] = _rollout(server, prompt, 400, request_id="parent-1")

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_until(lambda: engine.stats().num_running == 1)
    branches = [{"suffix": " A:", "max_tokens": 5, **GREEDY}, {"suffix": [5, 6, 7], "max_tokens": 3, **GREEDY}]
    r = _post(server, "/v1/rl/fork", {"request_id": "parent-1", "branches": branches})
    assert r.status_code == 200, r.text
    fork = r.json()
    context = fork["token_ids"]
    assert context[: len(prompt_ids)] == prompt_ids
    suffix_ids = [engine.encode(" A:"), [5, 6, 7]]
    for branch, spec, suffix in zip(fork["branches"], branches, suffix_ids, strict=True):
        plain = _rollout(server, context + suffix, spec["max_tokens"])
        assert branch["token_ids"] == plain["token_ids"]
    r = _post(server, "/v1/rl/join", {"request_id": "parent-1", "separator": "\n"})
    assert r.status_code == 200, r.text
    appended = r.json()["appended_token_ids"]
    thread.join(60)
    parent = results["parent"]
    done_before = len(context) - len(prompt_ids)
    after = parent["token_ids"][done_before:]
    assert after == _rollout(server, context + appended, 400 - done_before)["token_ids"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/rl/generate", '{"prompt": "x", "temperature": NaN}', None),
    ("/v1/rl/generate", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/rl/generate", {"prompt": "x", "max_tokens": 10**30}, None),
    ("/v1/rl/generate", {"prompt": "x", "top_p": 7}, None),
    ("/v1/rl/generate", {"prompt": "x", "sampling_logprobs": 1}, "sampling_logprobs"),
    ("/v1/rl/generate", {"prompt": [10**9]}, None),
    ("/v1/rl/generate", {"prompt": ""}, "prompt"),
    ("/v1/rl/generate", {"prompt": "x", "request_id": "bad id!"}, "request_id"),
    ("/v1/rl/fork", {"request_id": "nobody", "branches": [{}]}, "request_id"),
    ("/v1/rl/fork", {"request_id": "nobody", "branches": []}, "branches"),
    ("/v1/rl/fork", {"request_id": "nobody", "branches": [{}] * 65}, "branches"),
    ("/v1/rl/fork", {"request_id": "nobody", "branches": "two"}, "branches"),
    ("/v1/rl/fork", {"request_id": "nobody", "branches": [{"temperature": 1e308 * 10}]}, None),
    ("/v1/rl/join", {"request_id": "nobody"}, "request_id"),
    ("/v1/rl/join", {"request_id": "nobody", "separator": 5}, "separator"),
    ("/v1/rl/join", {"request_id": "nobody", "include_branch_prompts": "yes"}, "include_branch_prompts"),
])
def test_malformed_fields_are_400s(server, path, body, param):
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert (err["param"] or "").startswith(param), err
    assert len(_rollout(server, "still serving", 3)["token_ids"]) == 3


def test_fork_of_a_finished_rollout_is_a_400(server):
    _rollout(server, "done soon", 2, request_id="finished-1")
    r = _post(server, "/v1/rl/fork", {"request_id": "finished-1", "branches": [{"max_tokens": 2}]})
    assert r.status_code == 400 and "not running" in r.json()["error"]["message"]
