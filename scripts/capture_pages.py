"""Screenshots of web pages with headless Chromium over the DevTools protocol (scripts/screenshots.sh uses it).

    python scripts/capture_pages.py OUT_DIR NAME=URL[|ACTION...] [NAME=URL[|ACTION...] ...]

For each page: load it, wait until it has rendered (no loading spinner left, for at most 60 s), close MLflow's
assistant side panel if it opened, do the ACTIONs in order (`click:TEXT` clicks the innermost element showing
exactly TEXT, e.g. a tab, and scrolls it to the top; `scroll:TEXT` only scrolls; `type:PLACEHOLDER=TEXT` types
into the input showing that placeholder, e.g. a search box), and write OUT_DIR/NAME.png
(1280x800). The browser profile is kept across the pages, so a setting clicked once stays. `--screenshot` alone would
catch pages mid-load (charts still spinning, a fading overlay) and cannot close the panel. Needs `websockets`
(Prefect's dependency) and a chromium binary on PATH.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

WIDTH, HEIGHT = 1280, 800
# Rendered when this is true: no spinner or skeleton left, and the document complete.
RENDERED = """(() => document.readyState === 'complete'
  && !document.querySelector('[class*="spinner"], [class*="Spinner"], [class*="skeleton"], [class*="Skeleton"],'
                             + ' [role="progressbar"], .p-loading-icon'))()"""
FIND_TEXT = """(text) => { const all = Array.from(document.querySelectorAll('body *'))
  .filter(e => e.textContent.trim() === text && e.offsetParent !== null);
  return all.find(e => !all.some(o => o !== e && e.contains(o))) || null; }"""
TYPE_INTO = """(placeholder, text) => { const e = document.querySelector(`input[placeholder="${placeholder}"]`);
  if (!e) return false;  // React listens to input events and reads the value through the prototype's setter
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(e, text);
  e.dispatchEvent(new Event('input', {bubbles: true})); return true; }"""
CLOSE_PANELS = """(() => { const b = document.querySelector(
  '[data-component-id="mlflow.assistant.chat_panel.close"], button[aria-label="Close assistant"]');
  if (b) { b.click(); return true; } return false; })()"""


class Page:
    """One browser tab, driven over its DevTools websocket."""

    def __init__(self, websocket_url: str) -> None:
        self.socket, self.next_id = connect(websocket_url, max_size=64 * 2 ** 20), 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True).get("result", {}).get("value")

    def capture(self, url: str, target: Path, actions: list[str]) -> None:
        self.call("Page.navigate", url=url)
        self.wait_rendered()
        if self.evaluate(CLOSE_PANELS):
            time.sleep(1)
        for action in actions:
            kind, _, text = action.partition(":")
            if kind == "type":
                placeholder, _, value = text.partition("=")
                found = self.evaluate(f"({TYPE_INTO})({json.dumps(placeholder)}, {json.dumps(value)})")
            else:
                found = self.evaluate(f"(() => {{ const e = ({FIND_TEXT})({json.dumps(text)}); if (!e) return false;"
                                      f" {'e.click();' if kind == 'click' else ''}"
                                      f" e.scrollIntoView({{block: 'start'}}); return true; }})()")
            if not found:
                raise RuntimeError(f"no element shows {text!r} on {url}")
            self.wait_rendered()
        time.sleep(1)  # transitions
        shot = self.call("Page.captureScreenshot", format="png")
        target.write_bytes(base64.b64decode(shot["data"]))

    def wait_rendered(self, timeout: float = 60) -> None:
        time.sleep(2)
        deadline, stable = time.monotonic() + timeout, 0
        while time.monotonic() < deadline and stable < 3:  # rendered at three checks in a row
            stable = stable + 1 if self.evaluate(RENDERED) else 0
            time.sleep(0.5)


def main(out_dir: str, *pages: str) -> None:
    chromium = next(p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # chromium's helper processes can still write into the profile for a moment after the browser exits: the
    # whole process group is stopped, and a file they leave behind does not fail the capture.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--remote-debugging-port={port}", f"--window-size={WIDTH},{HEIGHT}", "--force-device-scale-factor=1",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            page = Page(_page_websocket(port))
            page.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
            for spec in pages:
                name, url = spec.split("=", 1)
                url, *actions = url.split("|")
                print(f"capturing {name}: {url}", flush=True)
                page.capture(url, Path(out_dir) / f"{name}.png", actions)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGTERM)  # the browser and its renderer / GPU / crashpad helpers
            browser.wait(timeout=30)


def _page_websocket(port: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                targets = [t for t in json.load(response) if t.get("type") == "page"]
            if targets:
                return targets[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"chromium's DevTools endpoint on port {port} did not answer")
        time.sleep(0.2)


if __name__ == "__main__":
    main(*sys.argv[1:])
