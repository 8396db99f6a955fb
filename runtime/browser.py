"""Open an HTML file in headless Chromium and screenshot each chart (the tests of the HTML reports, and
the screenshots in docs/images/).

Drives Chromium over the DevTools protocol with `websocket-client`: navigate to the file, wait until
every plotly chart has drawn, collect console errors and uncaught exceptions, and capture one PNG per
`div.plotly-graph-div`. Chromium is Debian's `chromium` package (`.ci/run` installs it); `find_chromium`
returns None without it, and the tests skip.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0", "--window-size=1280,900")


@dataclass
class Rendered:
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions
    charts: dict[str, bytes] = field(default_factory=dict)  # chart div id -> PNG


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Session:
    def __init__(self, url: str, timeout: float):
        import websocket

        self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 60.0, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)
        raise TimeoutError(f"{method}: no answer in {timeout} s")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists():
            first = marker.read_text().splitlines()[:1]
            if first and first[0].strip().isdigit():
                return int(first[0])
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with status {proc.returncode} before it listened")
        time.sleep(0.1)
    raise TimeoutError(f"chromium did not open its DevTools port in {timeout} s")


def _page_socket(port: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            pages = [t for t in json.load(response) if t.get("type") == "page"]
        if pages:
            return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.1)
    raise TimeoutError("chromium shows no page target")


CHART_BOXES = """JSON.stringify(Array.from(document.querySelectorAll('div.plotly-graph-div')).map(d => {
  const r = d.getBoundingClientRect();
  return {id: d.id, x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height};
}))"""
CHARTS_DRAWN = """Array.from(document.querySelectorAll('div.plotly-graph-div')).every(
  d => d._fullLayout && d.querySelector('svg.main-svg') && d.querySelectorAll('g.trace').length > 0)"""


def render(html_path: str | os.PathLike, *, chromium: str | None = None, timeout: float = 120.0,
           scale: float = 1.0) -> Rendered:
    """Open `html_path`, wait for its charts, return the console errors and a PNG per chart."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    out = Rendered()
    # ignore_cleanup_errors: a chromium helper may still be closing a profile file during the removal
    with tempfile.TemporaryDirectory(prefix="nemoc-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port = _devtools_port(Path(profile), proc, timeout)
            session = _Session(_page_socket(port, timeout), timeout)
            for domain in ("Runtime", "Log", "Page"):
                session.call(f"{domain}.enable")
            session.call("Page.navigate", url=Path(html_path).resolve().as_uri())
            deadline = time.monotonic() + timeout
            while not (session.evaluate("document.readyState") == "complete" and session.evaluate(CHARTS_DRAWN)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{html_path}: the charts did not draw in {timeout} s")
                time.sleep(0.2)
            boxes, previous = session.evaluate(CHART_BOXES), None
            while boxes != previous:  # plotly relayouts (responsive sizing) after its first draw: wait it out
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{html_path}: the charts kept moving for {timeout} s")
                time.sleep(0.5)
                previous, boxes = boxes, session.evaluate(CHART_BOXES)
            for box in json.loads(boxes):
                clip = {"x": box["x"], "y": box["y"], "width": max(1, box["w"]), "height": max(1, box["h"]),
                        "scale": scale}
                shot = session.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
                out.charts[box["id"]] = base64.b64decode(shot["data"])
            session.call("Runtime.evaluate", expression="1")  # drain events logged meanwhile
            out.errors = _errors(session.events)
            session.ws.close()
        finally:
            _stop(proc)
    return out


def _stop(proc: subprocess.Popen) -> None:
    """End the chromium we started and its helpers (its own session: renderer, GPU, zygote)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the helpers leave after the browser; wait for the group to empty
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _errors(events: list[dict]) -> list[str]:
    errors = []
    for e in events:
        params = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif e["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif e["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append(params["entry"].get("text", ""))
    return errors


def png_is_blank(png: bytes) -> bool:
    """True for an image of (nearly) one colour: a chart that drew nothing."""
    import io

    from PIL import Image, ImageStat

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 16)
    return (colors is not None and len(colors) < 8) or max(ImageStat.Stat(image).stddev) < 2.0
