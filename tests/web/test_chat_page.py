"""The chat page end to end: headless Chromium (Debian's) against a real server on the tiny
model. What a person does (type, Enter, Stop, Regenerate, Edit, drop a file) and what the
server shows for it (/metrics), with screenshots saved under tests/web/artifacts/."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import pytest
from server_utils import scrape, serve, wait_until
from web_utils import (
    ARTIFACTS,
    DESKTOP,
    GREEDY,
    PHONE,
    current_messages,
    last_turn,
    wait_model,
    wait_reply,
)

COMPUTED = "livelm_computed_tokens_total"
RUNNING = "livelm_num_requests_running"


def plain_reply(url: str, content: str, max_tokens: int, key: str | None = None) -> dict:
    """The greedy reply a plain (non-streamed) chat request gets for one user message."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60, json={
        "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "temperature": 0}).json()
    return body


def type_and_send(page, text: str, delay_ms: float = 0) -> None:  # noqa: ANN001
    page.click("#composer")
    page.keyboard.type(text, delay=delay_ms)
    page.keyboard.press("Enter")


def assert_clean(watch) -> None:  # noqa: ANN001
    assert not watch.errors, watch.errors
    assert not watch.foreign, f"the page fetched from elsewhere: {watch.foreign}"


# ------------------------------------------------------------------------ chat


@contextlib.contextmanager
def paced_steps(engine, seconds: float = 0.01):  # noqa: ANN001, ANN201
    """Steps at a real model's pace: the tiny one can stream a whole reply within one or
    two of the page's frames (or finish 960 tokens before a test can press stop)."""
    inner = engine._engine
    step = inner.step

    def paced_step():  # noqa: ANN202
        time.sleep(seconds)
        return step()

    inner.step = paced_step
    try:
        yield
    finally:
        del inner.step  # the instance attribute: back to the method


def test_message_gets_a_streamed_reply(web, server, engine):
    with paced_steps(engine):
        _streamed_reply(web, server)


def _streamed_reply(web, server) -> None:  # noqa: ANN001
    page, watch = web(server.url, settings={**GREEDY, "max_tokens": 200})
    wait_model(page)
    # Record the reply's length each time it is re-rendered while still being written: a
    # streamed reply shows many partial lengths, a whole one none.
    page.evaluate("""() => { window.__partial = new Set(); new MutationObserver(() => {
        const a = document.querySelector('article[data-role=assistant][data-state=streaming] .body');
        if (a && a.textContent) window.__partial.add(a.textContent.length); })
        .observe(document.getElementById('messages'), {childList: true, subtree: true}); }""")
    type_and_send(page, "Write a haiku about rivers.")
    wait_reply(page)
    messages = current_messages(page)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["state"] == "done" and messages[1]["content"]
    assert page.evaluate("window.__partial.size") >= 3
    turn = last_turn(page)
    assert turn["mode"] == "live" and int(turn["ttftMs"]) >= 0 and turn["finish"] == "length"
    # The reply is the one a plain request gets (greedy), token for token as text.
    assert messages[1]["content"] == plain_reply(server.url, "Write a haiku about rivers.", 200)[
        "choices"][0]["message"]["content"]
    assert page.text_content("#model").startswith("llama")
    assert_clean(watch)


def test_stop_cancels_the_request_on_the_server(web, server, engine):
    with paced_steps(engine):
        _stop_cancels(web, server)


def _stop_cancels(web, server) -> None:  # noqa: ANN001
    page, watch = web(server.url, settings={**GREEDY, "max_tokens": 960})
    wait_model(page)
    type_and_send(page, "Count to a million.")
    page.wait_for_function("""() => { const a = document.querySelector('article[data-role=assistant]');
        return a && a.querySelector('.body').textContent.length > 20; }""")
    assert scrape(server.url)[RUNNING] >= 1
    page.click("#stop")
    wait_reply(page)
    assert wait_until(lambda: scrape(server.url)[RUNNING] == 0, timeout=10)
    reply = current_messages(page)[1]
    assert reply["state"] == "stopped" and reply["info"].startswith("stopped")
    assert last_turn(page)["finish"] == "abort"
    assert_clean(watch)


def test_stop_cancels_plain_chat_too(web, server, engine):
    with paced_steps(engine):
        _stop_cancels_plain(web, server)


def _stop_cancels_plain(web, server) -> None:  # noqa: ANN001
    page, watch = web(server.url, settings={**GREEDY, "max_tokens": 960, "live": False})
    wait_model(page)
    type_and_send(page, "Count to a million.")
    page.wait_for_function("""() => { const a = document.querySelector('article[data-role=assistant]');
        return a && a.querySelector('.body').textContent.length > 20; }""")
    page.keyboard.press("Escape")  # the keyboard way to stop
    wait_reply(page)
    assert wait_until(lambda: scrape(server.url)[RUNNING] == 0, timeout=10)
    assert current_messages(page)[1]["state"] == "stopped"
    assert last_turn(page)["mode"] == "plain"
    assert_clean(watch)


def test_typing_prefills_the_draft_before_enter(web, server):
    text = "Tell me what a river delta is, and why the Nile has one."
    page, watch = web(server.url, settings={**GREEDY, "max_tokens": 32})
    wait_model(page)
    before = scrape(server.url)[COMPUTED]
    page.click("#composer")
    page.keyboard.type(text, delay=40)  # ~25 characters a second
    # While the person is still looking at the draft (no Enter yet) the server has
    # computed its KV: the count rises and the page says how many tokens are in.
    assert wait_until(lambda: scrape(server.url)[COMPUTED] - before >= 20, timeout=10)
    page.wait_for_function("() => Number(document.getElementById('prefill-now').dataset.prefilled) >= 20")
    assert scrape(server.url)[RUNNING] == 0  # nothing is generating yet
    time.sleep(0.5)  # the person reads the draft over before pressing Enter
    # The draft's tokens as the session holds them: the template's text up to the draft.
    rendered = httpx.post(server.url + "/v1/chat/template",
                          json={"messages": [{"role": "user", "content": text}]}).json()["prompt"]
    draft = rendered[: rendered.index(text) + len(text)]
    draft_tokens = httpx.post(server.url + "/tokenize", json={
        "prompt": draft, "add_special_tokens": False}).json()["count"]
    page.keyboard.press("Enter")
    wait_reply(page)
    turn = last_turn(page)
    prompt_tokens = int(turn["promptTokens"])
    # The whole draft but a tail that could still merge with what follows (held back by
    # the incremental tokenizer) was in before Enter; Enter added the assistant header.
    assert draft_tokens - 4 <= int(turn["prefilled"]) <= draft_tokens < prompt_tokens, (turn, draft_tokens)
    assert turn["mode"] == "live" and turn["ttftMs"] != ""
    expected = plain_reply(server.url, text, 32)
    assert expected["usage"]["prompt_tokens"] == prompt_tokens
    assert current_messages(page)[1]["content"] == expected["choices"][0]["message"]["content"]
    assert_clean(watch)


def test_second_turn_prefills_only_what_it_adds(web, server):
    first = "Here is a long first message so that the history is clearly longer than a block. " * 8
    page, watch = web(server.url, settings={**GREEDY, "max_tokens": 16})
    wait_model(page)
    type_and_send(page, first)
    wait_reply(page)
    prompt1 = int(last_turn(page)["promptTokens"])
    # After the reply the page prefills it (and the next user header) at once; wait until
    # the server is idle so the count below is the second turn's alone.
    wait_until(lambda: scrape(server.url)[COMPUTED] == (time.sleep(0.3) or scrape(server.url)[COMPUTED]))
    before = scrape(server.url)[COMPUTED]
    type_and_send(page, "And a short second one.", delay_ms=10)
    wait_reply(page, count=2)
    turn = last_turn(page)
    prompt2 = int(turn["promptTokens"])
    computed = scrape(server.url)[COMPUTED] - before
    completion2 = int(current_messages(page)[3]["info"].split(" tokens")[0])
    # The second prompt holds the whole first turn; the server computed only what the
    # second turn added (the first reply, its message, the generated tokens), never the
    # history again. Slack: the reply recomputes the head of the session's last partial
    # KV block (< 16) and the assistant header the session also prefills (< 16).
    assert prompt2 > prompt1 + 16
    slack = 2 * 16
    assert computed <= (prompt2 - prompt1) + completion2 + slack, (computed, prompt1, prompt2)
    assert prompt1 > (prompt2 - prompt1) + completion2 + slack  # recomputing it would fail above
    assert [m["role"] for m in current_messages(page)] == ["user", "assistant"] * 2
    assert_clean(watch)


def test_plain_chat_fallback_streams_and_reuses_the_session(web, server):
    page, watch = web(server.url, settings={**GREEDY, "max_tokens": 16})
    # The WebSocket is refused (a proxy that does not pass it, say): the page falls back.
    page.route_web_socket("**/v1/stream", lambda ws: ws.close())
    wait_model(page)
    first = "A first question that is long enough to fill a few KV blocks of the cache. " * 3
    type_and_send(page, first)
    wait_reply(page)
    assert last_turn(page)["mode"] == "plain"
    assert "plain chat" in page.text_content("#transport")
    hits = scrape(server.url)["livelm_prefix_cache_hit_tokens_total"]
    type_and_send(page, "And a second one.")
    wait_reply(page, count=2)
    reused = scrape(server.url)["livelm_prefix_cache_hit_tokens_total"] - hits
    # The conversation's session_id kept the first turn's KV: the second reused it.
    assert reused >= 48, reused
    assert current_messages(page)[1]["content"] == plain_reply(server.url, first.strip(), 16)[
        "choices"][0]["message"]["content"]
    assert_clean(watch)


def test_regenerate_edit_and_conversations(web, server):
    page, watch = web(server.url, settings={**GREEDY, "max_tokens": 12})
    wait_model(page)
    type_and_send(page, "First question")
    wait_reply(page)
    reply = current_messages(page)[1]["content"]
    page.fill("#composer", "a draft in progress")
    first_reply = page.query_selector("article[data-role=assistant]")
    page.get_by_role("button", name="Regenerate the last reply").click()
    # The old reply (done) must be gone first: until it is, it satisfies the waits below.
    first_reply.wait_for_element_state("hidden")
    page.wait_for_function("() => document.querySelectorAll('article[data-role=assistant]').length === 1")
    wait_reply(page)
    messages = current_messages(page)
    assert len(messages) == 2 and messages[1]["content"] == reply  # greedy: the same again
    assert page.input_value("#composer") == "a draft in progress"  # Regenerate keeps it
    page.fill("#composer", "")
    page.get_by_role("button", name="Edit and resend message 1").click()
    assert page.input_value("#composer") == "First question"
    assert current_messages(page) == []
    page.fill("#composer", "An edited question")
    page.keyboard.press("Enter")
    wait_reply(page)
    messages = current_messages(page)
    assert messages[0]["content"] == "An edited question"
    assert messages[1]["content"] == plain_reply(server.url, "An edited question", 12)[
        "choices"][0]["message"]["content"]
    # A second conversation, then back to the first; both survive a reload.
    page.click("#new-chat")
    type_and_send(page, "Another topic")
    wait_reply(page)
    page.reload()
    wait_model(page)
    titles = page.locator("#conversations .open-conv").all_text_contents()
    assert titles == ["Another topic", "An edited question"]
    page.locator("#conversations .open-conv", has_text="An edited question").click()
    page.wait_for_function("() => document.querySelector('article[data-role=user]')?.textContent.includes('An edited question')")
    assert len(current_messages(page)) == 2
    assert_clean(watch)


def test_settings_dialog_sets_the_system_prompt_and_sampling(web, server):
    page, watch = web(server.url)
    wait_model(page)
    page.click("#open-settings")
    page.get_by_label("System prompt").fill("You are terse.")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("8")
    page.get_by_label("Live prefill while typing (WebSocket)").uncheck()
    page.click("#settings-save")
    type_and_send(page, "Hello")
    wait_reply(page)
    assert last_turn(page)["mode"] == "plain"
    body = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}],
        "max_tokens": 8, "temperature": 0}).json()
    assert current_messages(page)[1]["content"] == body["choices"][0]["message"]["content"]
    assert "8 tokens" in current_messages(page)[1]["info"]
    assert_clean(watch)


# ------------------------------------------------------------------------ a dropped file


def test_dropped_file_streams_in_with_progress(web, server, tmp_path):
    text = "".join(f"Line {i}: the river carries silt to the delta, season after season.\n"
                   for i in range(18))
    assert len(text) > 1000  # more than one piece (FILE_PIECE_CHARS in app.js)
    page, watch = web(server.url, settings={**GREEDY, "max_tokens": 8})
    sent = []  # the JSON events the page sends on its WebSocket
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(payload)))
    wait_model(page)
    before = scrape(server.url)[COMPUTED]
    # A real drop event carrying a File, as the browser makes it when a file is dropped.
    page.evaluate("""(text) => {
        const dt = new DataTransfer();
        dt.items.add(new File([text], 'notes.txt', {type: 'text/plain'}));
        document.getElementById('messages').dispatchEvent(
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", text)
    page.wait_for_selector("#file-status[data-done=true]", timeout=30000)
    assert page.eval_on_selector("#file-progress", "e => e.value === e.max")
    assert "notes.txt" in page.text_content("#attachment-name")
    file_tokens = httpx.post(server.url + "/tokenize", json={"prompt": text.strip(),
                                                             "add_special_tokens": False}).json()["count"]
    assert file_tokens > 300
    # All of it but a tail that could still merge with what follows (held back).
    assert scrape(server.url)[COMPUTED] - before >= file_tokens - 4
    appends = [json.loads(p) for p in sent if isinstance(p, str) and '"append"' in p]
    assert len(appends) >= 2 and "".join(a["text"] for a in appends).endswith(text.strip())
    type_and_send(page, "Summarise the notes.")
    wait_reply(page)
    turn = last_turn(page)
    assert int(turn["promptTokens"]) > file_tokens
    assert int(turn["prefilled"]) >= file_tokens - 4  # the file was in before Enter
    content = current_messages(page)[0]["content"]
    assert content == text.strip() + "\n\nSummarise the notes."
    assert current_messages(page)[1]["content"] == plain_reply(server.url, content, 8)[
        "choices"][0]["message"]["content"]
    assert_clean(watch)


# ------------------------------------------------------------------------ keys and errors


def test_api_key_server_asks_for_the_key(web, engine):
    with serve(engine, api_key="s3cret") as srv:
        page, watch = web(srv.url, settings={**GREEDY, "max_tokens": 8})
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        assert page.get_by_label("API key", exact=True).is_visible()
        page.get_by_label("API key", exact=True).fill("s3cret")
        page.keyboard.press("Enter")
        wait_model(page)
        assert not dialog.is_visible()
        assert page.evaluate("localStorage.getItem('livelm.apiKey')") == "s3cret"
        type_and_send(page, "Hi")
        wait_reply(page)
        assert last_turn(page)["mode"] == "live"  # the WebSocket took the key as ?api_key=
        assert current_messages(page)[1]["content"] == plain_reply(srv.url, "Hi", 8, key="s3cret")[
            "choices"][0]["message"]["content"]
        # A wrong key is refused and asked for again.
        page.evaluate("localStorage.setItem('livelm.apiKey', 'wrong')")
        page.reload()
        dialog.wait_for(state="visible")
        assert "not accepted" in page.text_content("#key-reason")
        watch.errors = [e for e in watch.errors if "401" not in e]  # the refused fetches
        assert_clean(watch)


@pytest.mark.parametrize("live", [True, False], ids=["live", "plain"])
def test_overloaded_and_refused_requests_show_their_messages(web, engine, live):
    with serve(engine, max_running=1, max_waiting=0) as srv:
        page, watch = web(srv.url, settings={**GREEDY, "max_tokens": 8, "live": live})
        wait_model(page)
        # The server's admission bound (1 sequence) is taken: the next request gets 503.
        ticket = srv.app.state.livelm.admission.admit(1)
        try:
            type_and_send(page, "Hello?")
            page.wait_for_selector("#banner:not([hidden])")
            banner = page.text_content("#banner")
            assert "overloaded (503)" in banner and "server is at capacity" in banner, banner
            assert current_messages(page)[1]["state"] == "error"
        finally:
            ticket.release()
        # Far more tokens than the context holds: the server's 400 and its reason.
        page.evaluate("""() => { const s = JSON.parse(localStorage.getItem('livelm.settings'));
            s.max_tokens = 100000; localStorage.setItem('livelm.settings', JSON.stringify(s)); }""")
        page.reload()
        wait_model(page)
        page.get_by_role("button", name="Regenerate the last reply").wait_for(state="attached")
        type_and_send(page, "Hello again")
        page.wait_for_function("() => document.getElementById('banner').textContent.includes('(400)')")
        banner = page.text_content("#banner")
        assert "refused the request (400)" in banner and "1024 tokens" in banner, banner
        watch.errors = [e for e in watch.errors if "503" not in e and "400" not in e]
        assert_clean(watch)


def test_unreachable_server_is_said_plainly(web, engine):
    srv = serve(engine)
    with srv:
        page, watch = web(srv.url, settings={**GREEDY, "max_tokens": 8})
        wait_model(page)
    type_and_send(page, "Anyone there?")  # the server is gone now
    page.wait_for_function("() => document.getElementById('banner').textContent.includes('unreachable')")
    assert "Is livelm serve still running?" in page.text_content("#banner")


# ------------------------------------------------------------------------ a11y, screens


CONTRAST = """(sel) => {
  const lum = (c) => { const [r, g, b] = c.match(/\\d+(\\.\\d+)?/g).slice(0, 3).map(Number).map((v) => {
      v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const bg = (el) => { for (; el; el = el.parentElement) { const c = getComputedStyle(el).backgroundColor;
      if (!c.endsWith(', 0)') && c !== 'transparent') return c; } return 'rgb(255, 255, 255)'; };
  const el = document.querySelector(sel);
  const [a, b] = [lum(getComputedStyle(el).color), lum(bg(el))];
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_accessible_labels_keyboard_and_contrast(web, server, scheme):
    page, watch = web(server.url, color_scheme=scheme, settings={**GREEDY, "max_tokens": 8})
    wait_model(page)
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, select')]
        .filter((e) => e.type !== 'hidden' && !e.labels?.length && !e.getAttribute('aria-label'))
        .map((e) => e.id)""")
    assert unlabeled == []
    nameless = page.evaluate("""() => [...document.querySelectorAll('button')]
        .filter((b) => !(b.textContent.trim() || b.getAttribute('aria-label'))).map((b) => b.outerHTML)""")
    assert nameless == []
    page.click("#composer")
    type_and_send(page, "x")
    wait_reply(page)
    for sel in ("#composer", ".msg.user .body", ".msg.assistant .body", ".msg .who", "#model",
                "#send", "#new-chat", "#readout"):
        ratio = page.evaluate(CONTRAST, sel)
        assert ratio >= 4.5, f"{sel}: contrast {ratio:.2f} in {scheme}"
    # Keyboard only: Tab from the top reaches the message box; Enter sent above.
    page.keyboard.press("Escape")
    page.evaluate("document.activeElement.blur()")
    for _ in range(12):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "composer":
            break
    assert page.evaluate("document.activeElement.id") == "composer"
    assert_clean(watch)


def test_screenshots_and_phone_width(web, server):
    ARTIFACTS.mkdir(exist_ok=True)
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page, watch = web(server.url, viewport=viewport,
                                settings={**GREEDY, "max_tokens": 40})
        wait_model(page)
        type_and_send(page, "Show me some code, please.")
        wait_reply(page)
        page.click("#composer")
        page.keyboard.type("A draft being prefilled", delay=20)
        page.wait_for_function("() => Number(document.getElementById('prefill-now').dataset.prefilled) > 0")
        # What is hidden stays hidden (no drop overlay, no empty file bar).
        assert not page.locator("#drop-hint").is_visible()
        assert not page.locator("#attachment").is_visible()
        # Nothing sticks out sideways, and the composer and Send stay on screen.
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
        for sel in ("#composer", "#send"):
            box = page.locator(sel).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"]
            assert box["y"] + box["height"] <= viewport["height"]
        if name == "phone":  # the list of conversations folds away behind a button
            assert not page.locator("#sidebar").is_visible()
            page.click("#toggle-sidebar")
            assert page.locator("#sidebar").is_visible()
            page.click("#toggle-sidebar")
        path = ARTIFACTS / f"chat-{name}.png"
        page.screenshot(path=str(path))
        assert path.stat().st_size > 5000
        assert_clean(watch)
