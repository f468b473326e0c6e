"""The page's HTTP side without a browser: ``GET /`` and its files, ``--no-web-ui``, and
``POST /v1/chat/template`` (the text a streamed draft is built from)."""

from __future__ import annotations

import httpx
import pytest
from server_utils import serve

from livelm.entrypoints.openai.api_server import server_config_from_args
from livelm.entrypoints.serve_cli import add_serve_args


def test_page_and_its_files_are_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    # Every file the page names is served from the package, none from elsewhere.
    for path in ("/ui/app.js", "/ui/app.css", "/ui/vendor/marked.umd.js",
                 "/ui/vendor/purify.min.js", "/ui/vendor/highlight.min.js",
                 "/ui/vendor/hljs-a11y-light.min.css", "/ui/vendor/hljs-a11y-dark.min.css"):
        assert path in page.text
        assert httpx.get(server.url + path).status_code == 200, path
    assert "http://" not in page.text and "https://" not in page.text


def test_no_web_ui_flag_turns_the_page_off(engine):
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    assert server_config_from_args(parser.parse_args([])).web_ui is True
    config = server_config_from_args(parser.parse_args(["--no-web-ui"]))
    assert config.web_ui is False
    with serve(engine, web_ui=False) as srv:
        assert httpx.get(srv.url + "/").status_code == 404
        assert httpx.get(srv.url + "/ui/app.js").status_code == 404
        assert httpx.get(srv.url + "/v1/models").status_code == 200  # the API stays


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me more."}]


def test_chat_template_text_tokenizes_to_the_chat_prompt(server, engine):
    body = httpx.post(server.url + "/v1/chat/template", json={"messages": MESSAGES}).json()
    expected = engine.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert body["prompt"] == expected
    # The text, tokenized as streamed input is, is exactly the prompt of a chat request.
    chat_ids = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    text_ids = httpx.post(server.url + "/tokenize",
                          json={"prompt": body["prompt"], "add_special_tokens": False}).json()["tokens"]
    assert text_ids == chat_ids and body["num_tokens"] == len(chat_ids)
    no_gen = httpx.post(server.url + "/v1/chat/template",
                        json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert expected.startswith(no_gen["prompt"]) and no_gen["prompt"] != expected


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": MESSAGES, "add_generation_prompt": "yes"}, "add_generation_prompt"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
])
def test_chat_template_refuses_bad_bodies(server, body, param):
    resp = httpx.post(server.url + "/v1/chat/template", json=body)
    assert resp.status_code == 400, resp.text
    assert param in (resp.json()["error"]["param"] or "") + resp.json()["error"]["message"]


def test_chat_template_needs_the_key_and_the_model(engine):
    with serve(engine, api_key="k1") as srv:
        assert httpx.get(srv.url + "/").status_code == 200  # the page itself holds no data
        url = srv.url + "/v1/chat/template"
        assert httpx.post(url, json={"messages": MESSAGES}).status_code == 401
        ok = httpx.post(url, json={"messages": MESSAGES}, headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200
        wrong = httpx.post(url, json={"messages": MESSAGES, "model": "nope"},
                           headers={"Authorization": "Bearer k1"})
        assert wrong.status_code == 404
