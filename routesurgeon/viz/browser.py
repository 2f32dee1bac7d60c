"""Open a report in headless Chromium over the DevTools protocol: DOM checks and screenshots.

Used by the tests (the report must render with no console errors and no network requests) and
for making screenshots of a report for documentation. Needs a ``chromium`` binary (Debian:
``scripts/install_browser.sh``) and the ``websocket-client`` package.

    with HeadlessChromium() as browser:
        page = browser.open("report.html")
        n = browser.evaluate("document.querySelectorAll('#graph-canvas .blk').length")
        browser.screenshot("report.png")
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["HeadlessChromium", "PageLoad", "find_chromium"]

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium() -> str:
    """Path of the Chromium binary (``$CHROMIUM`` or ``chromium`` / ``chromium-browser``)."""
    for cand in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if cand and (path := shutil.which(cand)):
            return path
    raise FileNotFoundError(
        "no chromium binary found (tried $CHROMIUM, chromium, chromium-browser, google-chrome); "
        "install Debian's chromium with `bash scripts/install_browser.sh`"
    )


@dataclass
class PageLoad:
    """What happened while a page loaded: errors, requests leaving the file, timings (ms)."""

    url: str
    errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    load_ms: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)


class HeadlessChromium:
    """A headless Chromium with one page, driven over the Chrome DevTools protocol."""

    def __init__(
        self, width: int = 1400, height: int = 900, timeout: float = 60.0, binary: str | None = None
    ) -> None:
        self.binary = binary or find_chromium()
        self.width, self.height, self.timeout = width, height, timeout
        self._proc: subprocess.Popen[str] | None = None
        self._ws: Any = None
        self._id = 0
        self._events: list[dict[str, Any]] = []
        self._tmp: str | None = None

    # -- life cycle ------------------------------------------------------------------------------
    def __enter__(self) -> HeadlessChromium:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        import websocket  # websocket-client

        self._tmp = tempfile.mkdtemp(prefix="rs-chromium-")
        cmd = [
            self.binary,
            *_FLAGS,
            f"--user-data-dir={self._tmp}",
            f"--window-size={self.width},{self.height}",
            "--remote-debugging-port=0",
            "about:blank",
        ]
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        port = self._wait_port()
        pages = self._json(f"http://127.0.0.1:{port}/json/list")
        page = next((p for p in pages if p.get("type") == "page"), None)
        if page is None:
            raise RuntimeError(f"chromium opened no page target (targets: {pages})")
        self._ws = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=self.timeout, suppress_origin=True
        )
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            self.send(method)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _wait_port(self) -> int:
        assert self._proc is not None and self._proc.stderr is not None
        lines: queue.Queue[str] = queue.Queue()
        stderr = self._proc.stderr

        def pump() -> None:
            for line in stderr:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if self._proc.poll() is not None:
                    break
                continue
            seen.append(line.rstrip())
            if "DevTools listening on ws://" in line:
                return int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        self.close()
        raise RuntimeError(
            "chromium did not start its DevTools server; its output:\n" + "\n".join(seen[-20:])
        )

    @staticmethod
    def _json(url: str) -> Any:
        with urllib.request.urlopen(url, timeout=10) as resp:  # local DevTools endpoint
            return json.loads(resp.read().decode())

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            finally:
                self._ws = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- protocol ------------------------------------------------------------------------------
    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events seen meanwhile are kept)."""
        if self._ws is None:
            raise RuntimeError("the browser is not started (use it as a context manager)")
        self._id += 1
        mid = self._id
        self._ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method} failed: {msg['error']}")
                return dict(msg.get("result") or {})
            if "method" in msg:
                self._events.append(msg)

    def _wait_event(self, method: str) -> dict[str, Any]:
        for i, ev in enumerate(self._events):
            if ev["method"] == method:
                return self._events.pop(i)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            msg = json.loads(self._ws.recv())
            if msg.get("method") == method:
                return msg
            if "method" in msg:
                self._events.append(msg)
        raise TimeoutError(f"no {method} event within {self.timeout} s")

    def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression in the page (JSON-serialisable results)."""
        res = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"JavaScript error in {expression!r}: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    # -- pages ---------------------------------------------------------------------------------
    def open(self, path: str | Path) -> PageLoad:
        """Load a local file and wait for its load event; report errors and outside requests."""
        url = Path(path).resolve().as_uri()
        self._events.clear()
        t0 = time.perf_counter()
        self.send("Page.navigate", url=url)
        self._wait_event("Page.loadEventFired")
        load = PageLoad(url=url, load_ms=1000 * (time.perf_counter() - t0))
        # settle: one more round trip lets late console messages arrive
        self.evaluate("new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)))")
        for ev in self._events:
            m, p = ev["method"], ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                load.errors.append(str(d.get("exception", {}).get("description") or d))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                load.errors.append(
                    " ".join(
                        str(a.get("value", a.get("description", ""))) for a in p.get("args", [])
                    )
                )
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                load.errors.append(str(p["entry"].get("text")))
            elif m == "Network.requestWillBeSent":
                req = p.get("request", {}).get("url", "")
                if not req.startswith(("file:", "data:", "about:")):
                    load.external_requests.append(req)
        load.timing = dict(
            self.evaluate(
                "(() => { const n = performance.getEntriesByType('navigation')[0] || {};"
                " const p = {}; performance.getEntriesByType('paint').forEach("
                " e => { p[e.name] = e.startTime; });"
                " return {domInteractive: n.domInteractive || 0,"
                " domContentLoaded: n.domContentLoadedEventEnd || 0, load: n.loadEventEnd || 0,"
                " firstPaint: p['first-paint'] || 0,"
                " firstContentfulPaint: p['first-contentful-paint'] || 0}; })()"
            )
            or {}
        )
        return load

    def screenshot(
        self,
        path: str | Path | None = None,
        full_page: bool = False,
        max_height: int = 4000,
        selector: str | None = None,
    ) -> bytes:
        """PNG of the viewport, of the whole page (up to ``max_height`` px) or of one element.

        ``selector``: a CSS selector; the shot is clipped to that element's box (in page
        coordinates, so elements below the fold are captured too).
        """
        params: dict[str, Any] = {"format": "png"}
        if selector is not None:
            box = self.evaluate(
                f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                " if (!e) return null; const r = e.getBoundingClientRect();"
                " return {x: r.left + scrollX, y: r.top + scrollY, width: r.width,"
                " height: r.height}; })()"
            )
            if not box or box["width"] < 1 or box["height"] < 1:
                raise RuntimeError(f"no visible element matches {selector!r}")
            params["clip"] = {**box, "height": min(box["height"], max_height), "scale": 1}
            params["captureBeyondViewport"] = True
        elif full_page:
            h = int(self.evaluate("document.documentElement.scrollHeight") or self.height)
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": self.width,
                "height": min(h, max_height),
                "scale": 1,
            }
            params["captureBeyondViewport"] = True
        data = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        if path is not None:
            Path(path).write_bytes(data)
        return data
