"""The HTML pages render in a real headless Chromium: bench.html, the performance report and
the live dashboard. Each must show at least one painted bokeh canvas (shadow roots included)
and log no JavaScript error. Screenshots are saved under the test's tmp dir.

Chromium is driven over the DevTools protocol (tornado's websocket client); it may resolve
no host name but 127.0.0.1, so nothing here reaches the internet and a page that needs a
CDN fails loudly. Needs Debian's ``chromium``: run ``.ci/install-chromium``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import SLOW_RUN, free_port, start_flow, subprocess_environment, wait_for_dashboard
from tornado.websocket import WebSocketClientConnection, websocket_connect

WINDOW = (1280, 900)
REQUIRE_BROWSER = "IMGTASKS_REQUIRE_BROWSER"  # "1": a missing chromium fails, not skips
START_TIMEOUT = 30.0  # chromium up and DevTools answering
COMMAND_TIMEOUT = 30.0  # one DevTools command
RENDER_TIMEOUT = 30.0  # page loaded and a painted canvas seen
SETTLE_S = 1.5  # after the first painted canvas, let late errors arrive
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--no-proxy-server",
    # no name resolves: a page that needs the internet (a CDN) fails instead of hanging
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]

# Walks the document and every (open) shadow root; bokeh 3 draws inside shadow DOM.
PAGE_PROBE = r"""
(() => {
  const canvases = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.tagName === 'CANVAS') canvases.push(el);
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  let sized = 0, painted = 0;
  for (const c of canvases) {
    if (!c.width || !c.height) continue;
    sized++;
    try {
      const ctx = c.getContext('2d');
      if (!ctx) continue;
      const d = ctx.getImageData(0, 0, c.width, c.height).data;
      for (let i = 3; i < d.length; i += 4) { if (d[i]) { painted++; break; } }
    } catch (e) {}
  }
  const B = window.Bokeh;
  return JSON.stringify({
    canvases: canvases.length, sized, painted,
    bokeh: B ? B.version : null,
    documents: B && B.documents ? B.documents.length : 0,
    title: document.title, ready: document.readyState,
  });
})()
"""


# Clicks the bokeh tab whose label is TEXT (tabs live in shadow roots too); true if found.
CLICK_TAB = r"""
((text) => {
  const walk = (root) => {
    for (const el of root.querySelectorAll('.bk-tab')) {
      if (el.textContent.trim() === text) { el.click(); return true; }
    }
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot && walk(el.shadowRoot)) return true;
    }
    return false;
  };
  return JSON.stringify({clicked: walk(document)});
})
"""


def chromium_binary() -> str:
    """The chromium on PATH. Without one the browser tests skip, so the README's test
    command passes on a machine with only Python; CI sets IMGTASKS_REQUIRE_BROWSER=1 after
    installing chromium, and there a missing browser fails instead of passing unseen."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if browser_required(os.environ):
        pytest.fail(
            f"chromium not found and {REQUIRE_BROWSER}=1: run .ci/install-chromium "
            "(installs Debian's chromium package) before the browser tests",
            pytrace=False,
        )
    pytest.skip("chromium not found; run .ci/install-chromium")


def browser_required(environ: Mapping[str, str]) -> bool:
    return environ.get(REQUIRE_BROWSER) == "1"


# --- a minimal DevTools protocol client --------------------------------------------------


@dataclass
class PageResult:
    url: str
    probe: dict[str, Any]
    errors: list[str]
    screenshot: Path
    events: int = 0

    def describe(self) -> str:
        return f"{self.url}: {self.probe} errors={self.errors} screenshot={self.screenshot}"


@dataclass
class Devtools:
    """One websocket to the browser; page sessions are multiplexed on it (flatten mode)."""

    ws: WebSocketClientConnection
    pending: dict[int, asyncio.Future] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    next_id: int = 0
    reader: asyncio.Task | None = None

    @classmethod
    async def connect(cls, url: str) -> Devtools:
        ws = await asyncio.wait_for(
            websocket_connect(url, max_message_size=256 * 1024 * 1024), COMMAND_TIMEOUT
        )
        client = cls(ws)
        client.reader = asyncio.create_task(client._read())
        return client

    async def _read(self) -> None:
        while True:
            message = await self.ws.read_message()
            if message is None:
                for future in self.pending.values():
                    if not future.done():
                        future.set_exception(ConnectionError("DevTools connection closed"))
                return
            data = json.loads(message)
            future = self.pending.pop(data.get("id", -1), None)
            if future is None:
                self.events.append(data)
            elif not future.done():
                if "error" in data:
                    future.set_exception(RuntimeError(f"DevTools error: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))

    async def send(
        self, method: str, params: dict | None = None, session: str | None = None
    ) -> dict:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.write_message(json.dumps(message))
        return await asyncio.wait_for(future, COMMAND_TIMEOUT)

    def session_events(self, session: str, method: str) -> list[dict]:
        return [
            e.get("params", {})
            for e in self.events
            if e.get("sessionId") == session and e.get("method") == method
        ]

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self.ws.close()


def page_errors(devtools: Devtools, session: str, starting: str = "") -> list[str]:
    """JavaScript errors: uncaught exceptions, console.error/assert, error log entries.
    ``starting``: a URL that may first answer 503 (a dashboard page loaded before the
    dashboard is: the page saying so reloads itself)."""
    errors = []
    for e in devtools.session_events(session, "Runtime.exceptionThrown"):
        details = e.get("exceptionDetails", {})
        text = details.get("exception", {}).get("description") or details.get("text", "")
        errors.append(f"exception: {text}")
    for e in devtools.session_events(session, "Runtime.consoleAPICalled"):
        if e.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in e["args"])
            errors.append(f"console.{e['type']}: {args}")
    for e in devtools.session_events(session, "Log.entryAdded"):
        entry = e.get("entry", {})
        if entry.get("level") != "error":
            continue
        if entry.get("source") == "network" and entry.get("url", "").endswith("favicon.ico"):
            continue  # Dask's report links its favicon on docs.dask.org: cosmetic
        if starting and entry.get("url") == starting and "503" in entry.get("text", ""):
            continue
        errors.append(f"log {entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")
    return errors


async def render(
    devtools: Devtools, url: str, screenshot: Path, tab: str | None = None
) -> PageResult:
    """Open ``url`` in a new tab; wait for a painted canvas (or time out); screenshot it.

    ``tab``: first click the bokeh tab with this label, so the screenshot shows a plot.
    """
    target = (await devtools.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
    session = (await devtools.send("Target.attachToTarget", {"targetId": target, "flatten": True}))[
        "sessionId"
    ]
    try:
        for domain in ("Runtime", "Log", "Page"):
            await devtools.send(f"{domain}.enable", session=session)
        await devtools.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        navigation = await devtools.send("Page.navigate", {"url": url}, session)
        assert "errorText" not in navigation, f"{url}: {navigation['errorText']}"
        probe: dict[str, Any] = {}
        deadline = time.monotonic() + RENDER_TIMEOUT
        while time.monotonic() < deadline:
            probe = await evaluate(devtools, session, PAGE_PROBE)
            if probe.get("painted", 0) > 0 and probe.get("ready") == "complete":
                break
            await asyncio.sleep(0.25)
        if tab is not None:
            clicked = await evaluate(devtools, session, f"{CLICK_TAB}({json.dumps(tab)})")
            assert clicked.get("clicked"), f"{url}: no bokeh tab labelled {tab!r}"
        await asyncio.sleep(SETTLE_S)
        probe = await evaluate(devtools, session, PAGE_PROBE)
        shot = await devtools.send("Page.captureScreenshot", {"format": "png"}, session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return PageResult(url, probe, page_errors(devtools, session), screenshot)
    finally:
        with contextlib.suppress(Exception):
            await devtools.send("Target.closeTarget", {"targetId": target})


async def evaluate(devtools: Devtools, session: str, script: str) -> dict[str, Any]:
    result = await devtools.send(
        "Runtime.evaluate", {"expression": script, "returnByValue": True}, session
    )
    value = result.get("result", {}).get("value")
    return json.loads(value) if isinstance(value, str) else {}


class Chromium:
    """A headless Chromium process with a fresh profile, killed (whole group) on close."""

    def __init__(self, profile: Path, log: Path) -> None:
        self.profile = profile
        self.log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=subprocess_environment(),
        )

    def websocket_url(self) -> str:
        """From ``DevToolsActivePort`` in the profile: the port, then the browser's path."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}; see its log")
            with contextlib.suppress(OSError, ValueError):
                port, path = marker.read_text().split()[:2]
                return f"ws://127.0.0.1:{int(port)}{path}"
            time.sleep(0.1)
        raise TimeoutError(f"chromium wrote no {marker} within {START_TIMEOUT} s")

    def render(self, url: str, screenshot: Path, tab: str | None = None) -> PageResult:
        async def go() -> PageResult:
            devtools = await Devtools.connect(self.websocket_url())
            try:
                return await asyncio.wait_for(
                    render(devtools, url, screenshot, tab), RENDER_TIMEOUT + 4 * COMMAND_TIMEOUT
                )
            finally:
                devtools.close()

        return asyncio.run(go())

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        self.log_file.close()


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    chromium_binary()
    base = tmp_path_factory.mktemp("chromium")
    browser = Chromium(base / "profile", base / "chromium.log")
    try:
        browser.websocket_url()
        yield browser
    finally:
        browser.close()


def assert_rendered(result: PageResult) -> None:
    probe = result.probe
    assert probe.get("bokeh"), f"BokehJS did not load: {result.describe()}"
    assert probe.get("painted", 0) >= 1, f"no painted canvas: {result.describe()}"
    assert not result.errors, f"JavaScript errors: {result.describe()}"
    assert result.screenshot.stat().st_size > 10_000, f"blank screenshot? {result.describe()}"


# --- no browser: skip, or fail where one is required ---------------------------------------


@pytest.fixture
def no_chromium_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory
    return monkeypatch


def test_missing_chromium_skips(no_chromium_on_path: pytest.MonkeyPatch) -> None:
    no_chromium_on_path.delenv(REQUIRE_BROWSER, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"chromium not found; run \.ci/install-"):
        chromium_binary()


def test_missing_chromium_fails_when_required(no_chromium_on_path: pytest.MonkeyPatch) -> None:
    no_chromium_on_path.setenv(REQUIRE_BROWSER, "1")
    with pytest.raises(pytest.fail.Exception, match=r"run \.ci/install-chromium"):
        chromium_binary()


def test_only_1_requires_the_browser() -> None:
    assert browser_required({REQUIRE_BROWSER: "1"})
    assert not any(
        browser_required(env) for env in ({}, {REQUIRE_BROWSER: ""}, {REQUIRE_BROWSER: "0"})
    )


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs a chromium on PATH")
def test_chromium_on_path_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_BROWSER, raising=False)
    assert chromium_binary() == shutil.which("chromium")


# --- the pages -----------------------------------------------------------------------------


def start_small_flow(*args: str) -> subprocess.Popen:
    return start_flow(["--cpu-workers", "1", *args])


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C the flow (it exits cleanly), then kill whatever is left of its group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=20)


@pytest.mark.timeout(120)
def test_bench_chart_renders(chromium: Chromium, tmp_path: Path) -> None:
    import bench  # benchmarks/bench.py (on sys.path: conftest)

    html = tmp_path / "bench.html"
    cfg = bench.parse_config(["--count", "100", "--latency", "0.1", "--html", str(html)])
    rows = [
        bench.Row("John serial download", "download", 30.5, 100, 100),
        bench.Row("threads(16)", "download", 2.4, 100, 100),
        bench.Row("John serial resize", "resize", 6.1, 100, 100),
        bench.Row("Pool(2)", "resize", 3.2, 100, 100),
        bench.Row("dask hybrid", "total", 4.0, 100, 100),
        bench.Row("img2dataset", "total", 9.0, 97, 100),  # INVALID: grey bar
    ]
    bench.write_chart(rows, cfg)
    result = chromium.render(html.as_uri(), tmp_path / "bench.png")
    assert_rendered(result)


@pytest.mark.timeout(180)
def test_performance_report_renders_offline(chromium: Chromium, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    proc = start_small_flow(
        "--count",
        "30",
        "--latency",
        "0",
        "--report",
        str(report),
        "--out",
        str(tmp_path / "out"),
        "--dashboard-address",
        "127.0.0.1:0",
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-3000:]
    assert report.exists(), out
    result = chromium.render(report.as_uri(), tmp_path / "report.png", tab="Task Stream")
    assert "cdn.bokeh.org" not in report.read_text(), (
        "the performance report loads BokehJS from a CDN, so it is blank offline; "
        'flows/run.py must pass performance_report(..., mode="inline"). '
        f"{result.describe()}"
    )
    assert_rendered(result)


@pytest.mark.timeout(180)
def test_live_dashboard_renders(chromium: Chromium, tmp_path: Path) -> None:
    port = free_port()
    proc = start_flow(
        [*SLOW_RUN, "--out", str(tmp_path / "out"), "--dashboard-address", f"127.0.0.1:{port}"]
    )
    try:
        url = f"http://127.0.0.1:{port}/status"
        status = wait_for_dashboard(proc, port)
        assert status == 200, f"dashboard never answered (flow exit code {proc.poll()})"
        time.sleep(2)  # a few batches in: the task stream has something to draw
        result = chromium.render(url, tmp_path / "dashboard.png")
        assert proc.poll() is None, "the run ended while the dashboard was being checked"
    finally:
        stop(proc)
    assert_rendered(result)
