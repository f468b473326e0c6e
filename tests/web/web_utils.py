"""Helpers of the chat page tests: opening the page in a fresh context, and reading what
the page shows and keeps (its readout, its localStorage)."""

from __future__ import annotations

import json
import os
from pathlib import Path

CHROMIUM = Path(os.environ.get("LIVELM_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


class PageWatch:
    """What a page did that a test must not let pass: script errors, requests that left
    the server's origin."""

    def __init__(self, page, origin: str) -> None:  # noqa: ANN001
        self.errors: list[str] = []
        self.foreign: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

        def on_request(request) -> None:  # noqa: ANN001
            url = request.url
            if not (url.startswith(origin) or url.startswith(origin.replace("http", "ws", 1))
                    or url.startswith("data:")):
                self.foreign.append(url)

        page.on("request", on_request)
        page.on("websocket", lambda ws: on_request(ws))


def open_page(browser, url: str, viewport: dict | None = None, settings: dict | None = None,  # noqa: ANN001
              api_key: str | None = None, color_scheme: str = "light"):  # noqa: ANN201
    """A fresh browser context (empty storage) on the page; returns (page, watch)."""
    context = browser.new_context(viewport=viewport or DESKTOP, color_scheme=color_scheme)
    init = {}
    if settings is not None:
        init["livelm.settings"] = json.dumps(settings)
    if api_key is not None:
        init["livelm.apiKey"] = api_key
    if init:
        # Seed localStorage before the page's script reads it (once: a reload keeps it).
        context.add_init_script(
            "if (!sessionStorage.getItem('seeded')) { sessionStorage.setItem('seeded', '1'); "
            f"for (const [k, v] of Object.entries({json.dumps(init)})) localStorage.setItem(k, v); }}")
    page = context.new_page()
    watch = PageWatch(page, url)
    page.goto(url + "/")
    return page, watch


GREEDY = {"system": "", "temperature": 0, "top_p": 1, "max_tokens": 24, "seed": "", "live": True}


def conversations(page) -> list[dict]:  # noqa: ANN001
    """The conversations the page keeps in localStorage."""
    return json.loads(page.evaluate("localStorage.getItem('livelm.conversations') || '[]'"))


def current_messages(page) -> list[dict]:  # noqa: ANN001
    """The messages of the page's current conversation, as stored."""
    current = page.evaluate("localStorage.getItem('livelm.current')")
    return next(c for c in conversations(page) if c["id"] == current)["messages"]


def wait_model(page) -> None:  # noqa: ANN001
    """Until the page has read the model from /v1/models."""
    page.wait_for_function("() => document.getElementById('model').textContent.includes('tokens')",
                           timeout=20000)


def wait_reply(page, count: int = 1, timeout: float = 60000) -> None:  # noqa: ANN001
    """Until the ``count``-th assistant message is no longer being written."""
    page.wait_for_function(
        f"""() => {{ const a = document.querySelectorAll('article[data-role=assistant]');
             return a.length >= {count} && a[{count - 1}].dataset.state !== 'streaming'; }}""",
        timeout=timeout)


def last_turn(page) -> dict:  # noqa: ANN001
    """The data attributes of the readout of the last reply (mode, ttftMs, prefilled, ...)."""
    return page.eval_on_selector("#last-turn", "e => ({...e.dataset})")
