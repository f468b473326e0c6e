"""The README's two screenshots of the chat page (desktop and phone), on the default model.

Not a test (pytest does not collect it): ``python tests/web/readme_screenshots.py`` starts
``livelm serve`` (embedded model), has a short real conversation in Debian's Chromium and
writes ``docs/images/chat-desktop.png`` and ``docs/images/chat-phone.png``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright
from web_utils import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"system": "", "temperature": 0, "top_p": 1, "max_tokens": 160, "seed": "", "live": True}


def main() -> None:
    port = 8765
    server = subprocess.Popen([sys.executable, "-m", "livelm.entrypoints.serve_cli", "--port",
                               str(port), "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
                context = browser.new_context(viewport=viewport, device_scale_factor=1)
                context.add_init_script(
                    f"localStorage.setItem('livelm.settings', {json.dumps(json.dumps(SETTINGS))})")
                page = context.new_page()
                page.goto(url + "/")
                page.wait_for_function("() => document.getElementById('model').textContent.includes('tokens')")
                page.click("#composer")
                page.keyboard.type("Write a Python function that reverses a string.", delay=30)
                page.keyboard.press("Enter")
                page.wait_for_function("""() => { const a = document.querySelector('article[data-role=assistant]');
                    return a && a.dataset.state !== 'streaming'; }""", timeout=120000)
                page.click("#composer")
                page.keyboard.type("Now explain how slicing works", delay=30)
                time.sleep(1)
                out = ROOT / "docs" / "images" / f"chat-{name}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out))
                print("wrote", out)
                context.close()
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
