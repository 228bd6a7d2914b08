"""A real headless Chromium, driven over the DevTools protocol: open a page, record its console messages, its
exceptions and every network request it makes, and take a full-page screenshot."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@dataclass
class PageVisit:
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, the page's own first
    console: list[tuple[str, str]] = field(default_factory=list)  # (level, text)
    exceptions: list[str] = field(default_factory=list)
    loaded: bool = False


def visit(url: str, screenshot: Path, width: int = 1280, timeout: float = 60.0) -> PageVisit:
    """Open ``url`` in a fresh headless Chromium profile; the screenshot goes to ``screenshot`` (PNG)."""
    profile = tempfile.mkdtemp(prefix="segpipe-chromium-")
    args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0"]
    proc = subprocess.Popen([*args, f"--user-data-dir={profile}", "about:blank"], stderr=subprocess.PIPE, text=True)
    try:
        port = _devtools_port(proc, timeout)
        page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout) as ws:
            return _Session(ws, timeout).visit(url, screenshot, width)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


class _Session:
    def __init__(self, ws, timeout: float) -> None:
        self.ws, self.timeout, self.next_id = ws, timeout, 0
        self.seen = PageVisit()

    def visit(self, url: str, screenshot: Path, width: int) -> PageVisit:
        for domain in ("Network", "Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + self.timeout
        while not self.seen.loaded and time.monotonic() < deadline:
            self._event(self.ws.recv(timeout=self.timeout))
        self._drain(0.5)  # late console messages or requests
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1}
        shot = self.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return self.seen

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=self.timeout))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(json.dumps(message))

    def _drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                self._event(self.ws.recv(timeout=left))
            except TimeoutError:
                return

    def _event(self, raw: str) -> None:
        message = json.loads(raw)
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.seen.requests.append(params["request"]["url"])
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.seen.console.append((params["type"], text))
        elif method == "Log.entryAdded":
            self.seen.console.append((params["entry"]["level"], params["entry"]["text"]))
        elif method == "Runtime.exceptionThrown":
            self.seen.exceptions.append(params["exceptionDetails"].get("text", ""))
        elif method == "Page.loadEventFired":
            self.seen.loaded = True


def _devtools_port(proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if match := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
            # Keep reading its log, or a full pipe would block the browser.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return int(match.group(1))
        if not line and proc.poll() is not None:
            break
    raise RuntimeError("chromium did not start its DevTools endpoint")
