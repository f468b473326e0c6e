"""Fixtures of the chat page tests: Debian's Chromium driven by Playwright, against a real
server on the tiny model, and helpers that read what the page and the server show.

The browser is ``/usr/bin/chromium`` (installed by ``.ci/run``), never a Playwright browser
download. Without it (or without the ``playwright`` package) the browser tests skip and
say why.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
from server_utils import serve, start_engine, stop_engine, wait_until
from web_utils import CHROMIUM, CHROMIUM_ARGS, open_page


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """One headless Chromium for the whole run."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; "
                    ".ci/run does) to run the browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install -e '.[test]'")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def engine(llama_dir):
    """The tiny Llama: its whole 1024-token context."""
    engine = start_engine(llama_dir, max_model_len=1024, kv_cache_gib=0.25)
    yield engine
    # Playwright's sync API keeps an event loop running in this thread, so asyncio.run
    # (stop_engine) must run in another one.
    stopper = threading.Thread(target=stop_engine, args=(engine,))
    stopper.start()
    stopper.join()


@pytest.fixture(scope="module")
def server(engine):
    """``livelm serve``'s app (the page included) on the tiny engine."""
    with serve(engine) as srv:
        yield srv


@pytest.fixture
def web(browser, engine) -> Iterator[Callable]:
    """``web(url, ...)`` opens the page in a fresh context (see ``open_page``); every
    context is closed after the test, which closes its WebSocket and so its input session,
    before the no-leak check looks at the engine."""
    contexts = []

    def opener(url: str, **kwargs):  # noqa: ANN202, ANN003
        page, watch = open_page(browser, url, **kwargs)
        contexts.append(page.context)
        return page, watch

    yield opener
    for context in contexts:
        # Plain chat pinned each conversation's KV under its id (session_id): release it
        # now rather than at the end of its TTL.
        for page in context.pages:
            try:
                ids = page.evaluate("JSON.parse(localStorage.getItem('livelm.conversations') || '[]')"
                                    ".map((c) => c.id)")
                key = page.evaluate("localStorage.getItem('livelm.apiKey')")
            except Exception:  # noqa: BLE001 - a page that is gone has nothing to release
                continue
            origin = page.url.rstrip("/").rsplit("/", 1)[0] if page.url.count("/") > 3 else page.url
            for conv_id in ids:
                try:
                    httpx.delete(f"{origin.rstrip('/')}/v1/sessions/{conv_id}", timeout=5,
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
                except httpx.HTTPError:
                    pass  # the server of this page is already stopped
        context.close()
    wait_until(lambda: engine.num_input_streams == 0, timeout=10)
