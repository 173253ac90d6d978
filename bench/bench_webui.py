"""The web UI's two speed targets, in Debian's headless Chromium against `svcreg serve`. Figures for the notes.

    .venv/bin/python bench/bench_webui.py [--runs 3] [--timeout 60] [--max-seconds 1200] [--json]

Each run starts its own `svcreg init` + `svcreg serve` (a subprocess on 127.0.0.1, the durable embedded
store: exactly what users run), fills it through the asyncio client, and opens a fresh headless Chromium
(/usr/bin/chromium via /usr/bin/chromedriver, Selenium) for each figure:

  * render N: N services registered, the page loaded; the time from clicking "Sign in" to the table
    showing "N of N instances" plus the next animation frame, so style and layout count (authenticate,
    subscribe, list, render the first page). N = 5,000 is the target (< 1 s); 1,000 and 10,000 are for scale.
  * burst: on the 5,000-service page (two pages of rows on screen, as after a scroll), 1,000 more services
    registered in one batch through the Python client (1,000 concurrent register_service requests on one
    connection, which the server coalesces into commits of up to 512): the time from the first request sent
    until every answer is back and until the table shows "6000 of 6000 instances" plus a frame, and the
    longest gap between animation frames meanwhile (the target: none over 1 s, "does not freeze").

With --runs N every figure is the median of N runs, min and max beside it. PASS/FAIL: the render target
is judged on the median, "no frame over 1 s" on the worst frame of all runs (it is a worst case).
Chromium trusts the server by the SPKI pin of its certificate (no blanket --ignore-certificate-errors),
and its traffic is held to 127.0.0.1: a proxy that refuses everything else, no DNS, no background fetches.
The exit status is 1 if a target fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from registry.client import ConnectionSettings, WsClient
from registry.tls import TlsClientConfig

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCALE = (1000, 5000, 10000)
BASE = 5000  # the size of the target figure, and what the burst lands on
BURST = 1000
RENDER_TARGET_MS = 1000.0
FRAME_TARGET_MS = 1000.0
LONG_FRAME_MS = 50.0  # Chromium's own "long task" threshold
LOAD_ATTEMPTS = 3
REGISTER_CHUNK = 1000  # concurrent requests while filling the registry

# The test's figure: click, then poll once a frame until the count shows, then one more frame.
RENDER_JS = """
const expected = arguments[0], done = arguments[arguments.length - 1];
const started = performance.now();
document.querySelector('#signin-form button').click();
(function poll() {
  const count = document.getElementById('service-count');
  if (count && count.textContent === expected) {
    requestAnimationFrame(() => done(performance.now() - started));
  } else requestAnimationFrame(poll);
})();
"""

# Every frame's gap until the count shows, then one more frame; the time is on the system clock (epoch ms),
# comparable with time.time() in this process.
WATCH_JS = """
const expected = arguments[0], gaps = [];
let last = performance.now();
window.benchBurst = new Promise((resolve) => {
  (function frame(now) {
    gaps.push(now - last);
    last = now;
    if (document.getElementById('service-count').textContent === expected) {
      requestAnimationFrame((next) => {
        gaps.push(next - last);
        resolve({shown_at: performance.timeOrigin + performance.now(), gaps});
      });
    } else requestAnimationFrame(frame);
  })(last);
});
"""

TOKEN_SHOWN_JS = "const token = document.getElementById('token'); return token !== null && token.offsetParent !== null"
AWAIT_BURST_JS = "window.benchBurst.then(arguments[arguments.length - 1]);"

PAGE_STATE_JS = """
return Object.fromEntries(['service-count', 'notice', 'connection', 'signin-error'].map(
  (id) => [id, document.getElementById(id) ? document.getElementById(id).textContent : null]));
"""


class BenchTimeout(Exception):
    """The whole bench ran past --max-seconds."""


@dataclass
class Notes:
    """What looked wrong along the way: console errors, notices on the page, server warnings."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        if line not in self.lines:
            self.lines.append(line)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def entry(prefix: str, index: int) -> dict[str, Any]:
    """The test's bulk entry (50 services a host), on the loopback network `svcreg init` configures."""
    return {
        "service_name": f"{prefix}-{index % 50}",
        "host_id": f"host-{index // 50}",
        "location": "local",
        "network_info": {"ip": f"127.0.{index // 250 % 256}.{index % 250 + 2}"},
        "endpoints": [{"name": "http", "port": 8080}],
        "tags": ["bulk"],
    }


# --- the server ------------------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[str]
    port: int
    home: Path
    token: str
    lines: list[str]

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def settings(self, timeout: float) -> ConnectionSettings:
        tls = TlsClientConfig(ca_file=str(self.home / "tls" / "ca.crt"))
        return ConnectionSettings(f"wss://127.0.0.1:{self.port}/", tls, self.token, timeout=timeout)

    def spki_pin(self) -> str:
        certificate = x509.load_pem_x509_certificate((self.home / "tls" / "server.crt").read_bytes())
        spki = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@contextlib.contextmanager
def svcreg_server(home: Path, timeout: float) -> Iterator[Server]:
    env = {**os.environ, "SVCREG_HOME": str(home)}
    subprocess.run(
        [sys.executable, "-m", "registry.cli", "init", str(home)],
        env=env,
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    config = home / "svcreg.yaml"
    config.write_text(config.read_text().replace("127.0.0.1:9443", f"127.0.0.1:{free_port()}"))
    process = subprocess.Popen(
        [sys.executable, "-m", "registry.cli", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    arrived: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # for as long as it runs: a full pipe would stall the server mid-measurement
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            arrived.put(line)
        arrived.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = arrived.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"svcreg serve did not start within {timeout:.0f} s:\n{''.join(lines)}") from None
            if line is None:
                raise SystemExit(f"svcreg serve exited before serving:\n{''.join(lines)}")
            if "serving wss://" in line:
                break
        port = int(line.split("wss://")[1].split("/")[0].rsplit(":", 1)[1])
        yield Server(process, port, home, (home / "admin.token").read_text().strip(), lines)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


async def register(settings: ConnectionSettings, entries: list[dict[str, Any]]) -> tuple[float, float]:
    """All ``entries`` at once on one connection: (epoch seconds when sending began, seconds until all answered)."""
    client = await WsClient.connect(settings)
    try:
        began = time.time()
        started = time.perf_counter()
        await asyncio.gather(*(client.register_service(one) for one in entries))
        return began, time.perf_counter() - started
    finally:
        await client.close()


def fill(server: Server, prefix: str, first: int, last: int, timeout: float) -> None:
    for start in range(first, last, REGISTER_CHUNK):
        chunk = [entry(prefix, index) for index in range(start, min(last, start + REGISTER_CHUNK))]
        asyncio.run(register(server.settings(timeout), chunk))


# --- the browser -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def chromium(server: Server, timeout: float, notes: Notes) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--window-size=1280,800",
        # Trust exactly this server's key, nothing else.
        f"--ignore-certificate-errors-spki-list={server.spki_pin()}",
        # Nowhere but 127.0.0.1: everything else goes to a proxy port that refuses, and no name resolves.
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-sync",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(timeout)
        driver.set_script_timeout(timeout)
        yield driver
        console(driver, notes)
    finally:
        try:
            driver.quit()
        finally:
            if service.process is not None and service.process.poll() is None:
                service.process.kill()  # quit failed: chromedriver takes its Chromium with it


def wait_until(driver: webdriver.Chrome, script: str, timeout: float, waiting_for: str) -> None:
    waiting = WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,))
    try:
        waiting.until(lambda d: d.execute_script(script))
    except TimeoutException:
        raise SystemExit(f"no {waiting_for} within {timeout:.0f} s: {page_state(driver)}") from None


def browser_log(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]  # selenium's own
    return entries


def console(driver: webdriver.Chrome, notes: Notes) -> list[str]:
    """The page's console errors since the last call, also kept in ``notes``."""
    errors = [log["message"] for log in browser_log(driver) if log["level"] == "SEVERE"]
    for message in errors:
        notes.add(f"console error: {message}")
    return errors


def page_state(driver: webdriver.Chrome) -> dict[str, Any]:
    """What the page shows, for an error message."""
    state: dict[str, Any] = {"url": driver.current_url, "title": driver.title}
    with contextlib.suppress(WebDriverException):
        state.update(driver.execute_script(PAGE_STATE_JS))
    state["console"] = [log["message"] for log in browser_log(driver) if log["level"] in ("SEVERE", "WARNING")]
    return state


def load_page(driver: webdriver.Chrome, server: Server, timeout: float, notes: Notes) -> None:
    """The sign-in page, loaded again if a file of it failed to load.

    Chromium aborts the requests in flight when the machine's network interfaces change
    (net::ERR_NETWORK_CHANGED: containers coming and going), and a page whose app.js failed stays blank.
    """
    for attempt in range(LOAD_ATTEMPTS):
        driver.get(f"{server.origin}/ui/")
        try:
            wait_until(driver, TOKEN_SHOWN_JS, min(timeout, 15.0), "sign-in form")
            return
        except SystemExit as failed:
            if attempt == LOAD_ATTEMPTS - 1:
                raise
            notes.add(f"page load retried: {failed}")


def render(driver: webdriver.Chrome, server: Server, count: int, timeout: float, notes: Notes) -> float:
    """Milliseconds from clicking "Sign in" to ``count`` services in the table, plus a frame."""
    load_page(driver, server, timeout, notes)
    console(driver, notes)
    driver.find_element(By.ID, "token").send_keys(server.token)
    try:
        elapsed: float = driver.execute_async_script(RENDER_JS, f"{count} of {count} instances")
    except WebDriverException as exc:
        raise SystemExit(f"{count} services did not render within {timeout:.0f} s: {page_state(driver)}") from exc
    if console(driver, notes):
        notes.add(f"the render of {count} services above had console errors: the figure may include a reconnect")
    return elapsed


def burst(driver: webdriver.Chrome, server: Server, timeout: float, notes: Notes) -> dict[str, float]:
    # As in the test: a scroll has put a second page of rows in the table before the burst.
    driver.execute_script("document.getElementById('service-more').scrollIntoView()")
    wait_until(driver, "return document.querySelectorAll('#service-rows tr').length >= 200", timeout, "second page")
    total = BASE + BURST
    driver.execute_script(WATCH_JS, f"{total} of {total} instances")
    began, answered = asyncio.run(register(server.settings(timeout), [entry("burst", i) for i in range(BURST)]))
    try:
        seen: dict[str, Any] = driver.execute_async_script(AWAIT_BURST_JS)
    except WebDriverException as exc:
        raise SystemExit(f"the burst did not reach the table within {timeout:.0f} s: {page_state(driver)}") from exc
    state: dict[str, str | None] = driver.execute_script(PAGE_STATE_JS)
    if console(driver, notes):
        notes.add("the burst above had console errors: its figures may include a reconnect")
    if state["notice"]:
        notes.add(f"notice on the page after the burst: {state['notice']!r} (connection: {state['connection']})")
    gaps: list[float] = seen["gaps"]
    return {
        "burst_answered_ms": answered * 1e3,
        "burst_shown_ms": seen["shown_at"] - began * 1e3,
        "burst_longest_frame_ms": max(gaps),
        "burst_long_frames": float(sum(1 for gap in gaps if gap > LONG_FRAME_MS)),
    }


# --- the runs --------------------------------------------------------------------------------------------


def one_run(options: argparse.Namespace, notes: Notes) -> dict[str, float]:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, svcreg_server(Path(tmp) / "svcreg", options.timeout) as server:
        registered = 0  # "svc" entries; the burst's 1,000 count towards the sizes after it
        for size in SCALE:
            have = registered + (BURST if size > BASE else 0)
            fill(server, "svc", registered, registered + size - have, options.timeout)
            registered += size - have
            with chromium(server, options.timeout, notes) as driver:
                results[f"render_{size}_ms"] = render(driver, server, size, options.timeout, notes)
                if size == BASE:
                    results.update(burst(driver, server, options.timeout, notes))
        for line in server.lines:
            if "WARNING" in line or "ERROR" in line or "Traceback" in line:
                notes.add(f"server: {line.rstrip()}")
    return results


def summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        key: {
            "median": statistics.median(run[key] for run in runs),
            "min": min(run[key] for run in runs),
            "max": max(run[key] for run in runs),
        }
        for key in runs[0]
    }


def verdicts(figures: dict[str, dict[str, float]]) -> dict[str, bool]:
    return {
        f"render_{BASE}_ms": figures[f"render_{BASE}_ms"]["median"] < RENDER_TARGET_MS,
        "burst_longest_frame_ms": figures["burst_longest_frame_ms"]["max"] < FRAME_TARGET_MS,
    }


LABELS = {
    "render_1000_ms": "render 1,000 services (ms)",
    "render_5000_ms": "render 5,000 services (ms)",
    "render_10000_ms": "render 10,000 services (ms)",
    "burst_answered_ms": "burst of 1,000: all answered (ms)",
    "burst_shown_ms": "burst of 1,000: table shows 6000 (ms)",
    "burst_longest_frame_ms": "burst of 1,000: longest frame (ms)",
    "burst_long_frames": f"burst of 1,000: frames > {LONG_FRAME_MS:.0f} ms",
}
TARGETS = {
    f"render_{BASE}_ms": f"median < {RENDER_TARGET_MS:.0f}",
    "burst_longest_frame_ms": f"max < {FRAME_TARGET_MS:.0f}",
}


def report(figures: dict[str, dict[str, float]], passed: dict[str, bool], runs: int, notes: Notes) -> None:
    print(f"({runs} run(s); median, min and max over the runs)")
    print(f"{'figure':40s} {'median':>9s} {'min':>9s} {'max':>9s}  {'target':13s} verdict")
    for key in sorted(figures, key=lambda key: list(LABELS).index(key)):
        figure = figures[key]
        verdict = ("PASS" if passed[key] else "FAIL") if key in passed else ""
        cells = " ".join(f"{figure[stat]:9,.0f}" for stat in ("median", "min", "max"))
        print(f"{LABELS.get(key, key):40s} {cells}  {TARGETS.get(key, ''):13s} {verdict}".rstrip())
    for line in notes.lines:
        print(f"note: {line}")


def on_alarm(signum: int, frame: FrameType | None) -> None:
    raise BenchTimeout("the bench ran past --max-seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="report the median of this many runs")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for any one step")
    parser.add_argument("--max-seconds", type=int, default=1200, help="for the whole bench")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    # Whatever hangs, the finally blocks still stop the server and the browser.
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(options.max_seconds)
    started = time.monotonic()
    notes = Notes()
    runs = [one_run(options, notes) for _ in range(options.runs)]
    signal.alarm(0)
    figures = summary(runs)
    passed = verdicts(figures)
    if options.json:
        print(json.dumps({"figures": figures, "passed": passed, "runs": runs, "notes": notes.lines}, indent=2))
    else:
        report(figures, passed, options.runs, notes)
        print(f"took {time.monotonic() - started:.0f} s")
    sys.exit(0 if all(passed.values()) else 1)


if __name__ == "__main__":
    main()
