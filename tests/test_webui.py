"""The web UI in a real browser: Debian's headless Chromium driven by Selenium, against a real TLS server.

The server runs on its own event loop in a thread (Selenium blocks); services are written through the
WebSocket API with the blocking client, as any agent would. Screenshots of each view go to
tests/output/ (which ignores itself in git); SVCREG_UPDATE_SCREENSHOTS=1 also refreshes
docs/img/ui-services.png for the README. Chromium trusts the test server by the SPKI pin of its certificate.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import os
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from registry import NetworkConfig, NetworkManager, Registry, ValidationError, webui
from registry.auth import Role, TokenRegistry
from registry.client import BlockingClient, ConnectionSettings
from registry.config import DeployConfig
from registry.jobs import DeployJobs
from registry.model import Location, ServiceEntry
from registry.package import build_package
from registry.server import WsServer
from registry.tls import TlsClientConfig, TlsServerConfig

from .helpers import free_port, make_entry
from .test_jobs import EXAMPLE, HeldDeployer

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = Path(__file__).resolve().parent / "output"
SERVICES_YAML = ROOT / "inventories" / "services.yaml"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
XSS = "<img src=x onerror=alert(1)>"

T = TypeVar("T")


# --- the server, on its own loop --------------------------------------------------------------


class UiServer:
    """A WsServer with the repository's services.yaml, on a loop thread, restartable on the same port."""

    def __init__(self, directory: Path, *, deploys: bool = False) -> None:
        self.directory = directory
        self.deployer: HeldDeployer | None = HeldDeployer() if deploys else None
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        self.cert, self.key, self.ca_file = directory / "server.crt", directory / "server.key", directory / "ca.crt"
        self.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        self.key.write_bytes(leaf.private_key_pem.bytes())
        self.key.chmod(0o600)
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.db = directory / "registry.db"
        self.config = NetworkConfig.from_dict(yaml.safe_load(SERVICES_YAML.read_text()))
        self.token_registry = TokenRegistry([])
        self.tokens = {role.label: self.token_registry.add(role.label, role)[1] for role in Role}
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: WsServer | None = None
        self.registry: Registry | None = None
        self.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, function: Callable[[], T]) -> T:
        async def inline() -> T:
            return function()

        return self.run(inline())

    def start(self) -> None:
        async def start() -> None:
            self.registry = Registry.with_persistence(self.db, networks=self.config)
            jobs = None
            if self.deployer is not None:
                deploy = DeployConfig(
                    packages_dir=self.directory / "packages",
                    work_dir=self.directory / "work",
                    known_hosts=self.directory / "kh",
                )
                self.package = build_package(EXAMPLE, deploy.packages_dir).path.name
                jobs = DeployJobs(self.deployer, deploy, self.config)
            self.server = await WsServer.new_tls(
                ("127.0.0.1", self.port),
                self.registry,
                TlsServerConfig.from_files(self.cert, self.key),
                tokens=self.token_registry,
                networks=NetworkManager(self.config, store=self.registry.store),
                deploys=jobs,
            )

        self.run(start())

    def stop(self) -> None:
        async def stop() -> None:
            assert self.server is not None and self.registry is not None
            await self.server.close(timeout=5)
            self.registry.close()

        self.run(stop())

    def close(self) -> None:
        if self.deployer is not None:
            self.deployer.release.set()
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client(self, role: str = "admin") -> BlockingClient:
        settings = ConnectionSettings(
            f"wss://127.0.0.1:{self.port}/", TlsClientConfig(ca_file=str(self.ca_file)), self.tokens[role]
        )
        return BlockingClient(settings)

    def spki_pin(self) -> str:
        certificate = x509.load_pem_x509_certificate(self.cert.read_bytes())
        spki = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(hashlib.sha256(spki).digest()).decode()

    def https(self, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=10)
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        response.read()
        connection.close()
        return response


@pytest.fixture
def server(tmp_path: Path) -> Iterator[UiServer]:
    running = UiServer(tmp_path)
    yield running
    running.close()


# --- the browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium_paths() -> tuple[str, str]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("the web UI tests need chromium and chromium-driver: run scripts/ensure-system-deps")
    return CHROMIUM, CHROMEDRIVER


def open_browser(server: UiServer, paths: tuple[str, str]) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--window-size=1280,800",
        # Trust exactly this test server's key, nothing else: no blanket --ignore-certificate-errors.
        f"--ignore-certificate-errors-spki-list={server.spki_pin()}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))


@pytest.fixture
def browser(server: UiServer, chromium_paths: tuple[str, str]) -> Iterator[WebDriver]:
    driver = open_browser(server, chromium_paths)
    driver.expected_console_errors = []  # type: ignore[attr-defined]
    try:
        yield driver
        errors = [
            entry["message"]
            for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE"
            and not any(expected in entry["message"] for expected in driver.expected_console_errors)  # type: ignore[attr-defined]
        ]
        assert errors == [], "console errors in the page"
    finally:
        driver.quit()


def wait(driver: WebDriver, condition: Callable[[WebDriver], T], timeout: float = 5.0) -> T:
    # The page replaces elements as data changes: a handle that went stale is just polled again.
    waiting = WebDriverWait(driver, timeout, poll_frequency=0.02, ignored_exceptions=(StaleElementReferenceException,))
    return waiting.until(condition)


def visible(driver: WebDriver, css: str) -> bool:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return bool(found) and found[0].is_displayed()


def sign_in(driver: WebDriver, server: UiServer, role: str = "admin") -> None:
    driver.get(f"{server.origin}/ui/")
    wait(driver, lambda d: visible(d, "#token"))
    driver.find_element(By.ID, "token").send_keys(server.tokens[role])
    driver.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    wait(driver, lambda d: visible(d, "#nav"))


def go(driver: WebDriver, view: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'#nav a[data-view="{view}"]').click()
    wait(driver, lambda d: visible(d, f"#view-{view}"))


def screenshot(driver: WebDriver, name: str) -> None:
    """A test artifact in tests/output/, which ignores itself in git."""
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / ".gitignore").write_text("*\n")
    driver.save_screenshot(str(OUTPUT / f"{name}.png"))


def row(driver: WebDriver, key: str) -> dict[str, Any] | None:
    """A service row as data, read in one script: rows are replaced live, so element handles go stale."""
    return driver.execute_script(  # type: ignore[no-any-return]
        """
        const rows = document.querySelectorAll('#service-rows tr[data-key]');
        const row = [...rows].find(r => r.dataset.key === arguments[0]);
        if (!row) return null;
        const link = row.querySelector('a.endpoint');
        return {state: row.dataset.state, title: row.title, text: row.textContent,
                cells: [...row.children].map(cell => cell.textContent), href: link && link.href};
        """,
        key,
    )


def click_in_row(driver: WebDriver, key: str, css: str) -> None:
    driver.execute_script(
        "[...document.querySelectorAll('#service-rows tr[data-key]')]"
        ".find(r => r.dataset.key === arguments[0]).querySelector(arguments[1]).click()",
        key,
        css,
    )


# --- HTTP: files, headers, redirect, traversal, Origin --------------------------------------------


def test_get_root_redirects_to_the_ui(server: UiServer) -> None:
    response = server.https("/")
    assert response.status in (302, 303)
    assert response.getheader("Location") == "/ui/"


def test_ui_files_have_types_cache_and_security_headers(server: UiServer) -> None:
    for path, content_type in (
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/views/services.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
    ):
        response = server.https(path)
        assert response.status == 200, path
        assert response.getheader("Content-Type") == content_type
        assert response.getheader("Cache-Control") == "no-cache"
        policy = response.getheader("Content-Security-Policy")
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert f"wss://127.0.0.1:{server.port}" in policy
        assert "unsafe-inline" not in policy and "require-trusted-types-for 'script'" in policy
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert response.getheader("Referrer-Policy") == "no-referrer"
        etag = response.getheader("ETag")
        assert server.https(path, {"If-None-Match": etag}).status == 304


@pytest.mark.parametrize(
    "path",
    [
        "/ui/../server.py",
        "/ui/..%2fserver.py",
        "/ui/%2e%2e/server.py",
        "/ui/%2e%2e%2fwebui.py",
        "/ui/views/../../server.py",
        "/ui//etc/passwd",
        "/ui/.%2e/__init__.py",
        "/ui/app.js%00.html",
        "/ui/missing.js",
    ],
)
def test_paths_outside_the_ui_folder_are_not_found(server: UiServer, path: str) -> None:
    response = server.https(path)
    assert response.status == 404


async def _handshake(server: UiServer, origin: str | None) -> None:
    context = ssl.create_default_context(cafile=str(server.ca_file))
    headers = {"Authorization": f"Bearer {server.tokens['read']}"}
    async with connect(f"wss://127.0.0.1:{server.port}/", ssl=context, origin=origin, additional_headers=headers) as ws:  # type: ignore[arg-type]
        await ws.send('{"id": "1", "type": "request", "action": "ping"}')
        assert '"pong":true' in str(await ws.recv())


def test_a_cross_origin_websocket_is_refused_and_others_work(server: UiServer) -> None:
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(_handshake(server, "https://evil.example"))
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        asyncio.run(_handshake(server, f"http://127.0.0.1:{server.port}"))  # not our scheme
    asyncio.run(_handshake(server, None))  # not a browser
    asyncio.run(_handshake(server, server.origin))  # the page itself


def test_configured_origins_are_allowed() -> None:
    allowed = webui.normalize_origins(["https://Ops.Example:443", "https://dash.example:8443"])
    assert webui.origin_allowed("https://ops.example", "registry:9443", allowed)
    assert webui.origin_allowed("https://dash.example:8443", "registry:9443", allowed)
    assert not webui.origin_allowed("https://dash.example", "registry:9443", allowed)
    assert webui.origin_allowed("https://registry:9443", "registry:9443", frozenset())
    assert not webui.origin_allowed("null", "registry:9443", allowed)
    assert not webui.origin_allowed("https://ops.example:99999", "registry:9443", allowed)
    assert not webui.origin_allowed("https://registry:9443/", "registry:9443", allowed)
    with pytest.raises(ValidationError, match="no path") as refused:
        webui.normalize_origins(["https://ops.example/path"])
    assert refused.value.field == "allowed_origins[0]"
    with pytest.raises(ValidationError, match="no path") as refused:
        webui.normalize_origins(["https://ops.example", "https://ops.example:70000"])
    assert refused.value.field == "allowed_origins[1]"


# --- the page -------------------------------------------------------------------------------------


def test_sign_in_with_a_wrong_then_a_good_token_and_sign_out(server: UiServer, browser: WebDriver) -> None:
    browser.get(f"{server.origin}/")  # the redirect, in a browser
    wait(browser, lambda d: visible(d, "#token"))
    assert browser.current_url == f"{server.origin}/ui/"
    assert browser.find_element(By.ID, "token").get_attribute("type") == "password"
    browser.find_element(By.ID, "token").send_keys("not-a-token")
    browser.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    wait(browser, lambda d: "Wrong token" in d.find_element(By.ID, "signin-error").text)
    assert browser.execute_script("return sessionStorage.length") == 0
    screenshot(browser, "signin")

    browser.find_element(By.ID, "token").clear()
    sign_in(browser, server, "admin")
    assert "admin (admin)" in browser.find_element(By.ID, "who").text
    stored = browser.execute_script("return [sessionStorage.getItem('svcreg.token'), localStorage.length]")
    assert stored == [server.tokens["admin"], 0]
    assert server.tokens["admin"] not in browser.current_url
    browser.refresh()  # the token survives a reload of the tab
    wait(browser, lambda d: visible(d, "#nav"))

    browser.find_element(By.ID, "sign-out").click()
    wait(browser, lambda d: visible(d, "#token"))
    assert browser.execute_script("return sessionStorage.getItem('svcreg.token')") is None


def test_services_appear_and_change_live(server: UiServer, browser: WebDriver) -> None:
    sign_in(browser, server)
    with server.client("write") as client:
        started = time.monotonic()
        client.register_service(
            make_entry("api", "prod-api", ip="192.168.1.100", version="1.2.3", tags=("blue",), ttl_seconds=30)
        )
        wait(browser, lambda d: row(d, "api@prod-api") is not None, timeout=1.0)
        assert time.monotonic() - started < 1.0
        shown = row(browser, "api@prod-api")
        assert shown is not None
        cells = shown["cells"]
        assert cells[0].startswith("api") and cells[1] == "prod-api" and cells[3] == "running"
        assert "192.168.1.100" in cells[4] and cells[6] == "1.2.3" and "TTL 30 s" in cells[7]
        assert shown["href"] == "http://192.168.1.100:8080/"

        client.set_state("api", "failed", "prod-api")
        wait(browser, lambda d: (row(d, "api@prod-api") or {}).get("state") == "failed", timeout=1.0)
        client.register_service(make_entry("db", "prod-db", ip="192.168.1.101", endpoints=()))
    wait(browser, lambda d: row(d, "db@prod-db") is not None)

    search = browser.find_element(By.ID, "service-search")
    search.send_keys("blue")
    wait(browser, lambda d: d.find_element(By.ID, "service-count").text == "1 of 2 instances")
    search.clear()
    search.send_keys(" ")  # an input event; blank search shows everything
    wait(browser, lambda d: d.find_element(By.ID, "service-count").text == "2 of 2 instances")
    browser.execute_script(
        "const search = document.getElementById('service-search'); search.value = '';"
        " search.dispatchEvent(new Event('input')); search.blur()"
    )
    time.sleep(1.5)  # the changed rows' flash fades
    screenshot(browser, "services")
    if os.environ.get("SVCREG_UPDATE_SCREENSHOTS"):  # the README's picture, refreshed on request only
        browser.save_screenshot(str(ROOT / "docs" / "img" / "ui-services.png"))


def test_a_write_asks_for_confirmation_and_a_read_token_sees_no_write_controls(
    server: UiServer, browser: WebDriver
) -> None:
    with server.client() as client:
        client.register_service(make_entry("api", "prod-api", ip="192.168.1.100"))
        client.allocate_ip("api", "production")
    sign_in(browser, server, "write")
    wait(browser, lambda d: row(d, "api@prod-api") is not None)
    click_in_row(browser, "api@prod-api", "button.danger")
    wait(browser, lambda d: d.find_element(By.ID, "confirm").is_displayed())
    browser.find_element(By.ID, "confirm-cancel").click()
    time.sleep(0.2)
    assert row(browser, "api@prod-api") is not None
    click_in_row(browser, "api@prod-api", "button.danger")
    wait(browser, lambda d: d.find_element(By.ID, "confirm").is_displayed())
    browser.find_element(By.ID, "confirm-ok").click()
    wait(browser, lambda d: row(d, "api@prod-api") is None)
    browser.find_element(By.ID, "sign-out").click()

    with server.client() as client:
        client.register_service(make_entry("api", "prod-api", ip="192.168.1.100"))
    sign_in(browser, server, "read")
    wait(browser, lambda d: row(d, "api@prod-api") is not None)
    for view in ("services", "events", "topology", "networks", "deploys"):
        go(browser, view)
        time.sleep(0.1)
        controls = [e for e in browser.find_elements(By.CSS_SELECTOR, ".write, .set-state") if e.is_displayed()]
        assert controls == [], view
    assert not browser.find_element(By.ID, "deploy-form").is_displayed()


def test_registry_data_renders_as_text(server: UiServer, browser: WebDriver) -> None:
    entry = make_entry("xss", "prod-api", ip="192.168.1.100", tags=(XSS,), metadata={"note": XSS}, version=XSS)
    with server.client() as client:
        client.register_service(entry)
    sign_in(browser, server)
    wait(browser, lambda d: row(d, "xss@prod-api") is not None)
    for view in ("services", "events", "topology", "networks", "deploys"):
        go(browser, view)
    go(browser, "services")
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
    shown = row(browser, "xss@prod-api")
    assert shown is not None
    assert XSS in shown["text"]
    assert shown["title"] == f"note={XSS}"
    # An alert would make this call raise UnexpectedAlertPresentException.
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0


def test_topology_shows_the_networks_and_nodes_of_services_yaml(server: UiServer, browser: WebDriver) -> None:
    with server.client() as client:
        client.register_service(make_entry("api", "prod-api", ip="192.168.1.100"))
        client.register_service(make_entry("cache", "localhost", ip="127.0.0.1", location=Location.LOCAL))
    sign_in(browser, server)
    go(browser, "topology")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#topology-svg [data-service="api@prod-api"]'))
    networks = {e.get_attribute("data-network") for e in browser.find_elements(By.CSS_SELECTOR, "[data-network]")}
    assert set(server.config.networks) <= networks
    nodes = {e.get_attribute("data-node") for e in browser.find_elements(By.CSS_SELECTOR, "#topology-svg [data-node]")}
    assert {"prod-api", "localhost"} <= nodes
    dot = browser.find_element(By.CSS_SELECTOR, '[data-service="api@prod-api"] circle')
    assert "state-running" in dot.get_attribute("class")
    with server.client() as client:
        client.set_state("api", "stopped", "prod-api")
    wait(
        browser,
        lambda d: (
            "state-stopped"
            in d.find_element(By.CSS_SELECTOR, '[data-service="api@prod-api"] circle').get_attribute("class")
        ),
        timeout=1.0,
    )
    screenshot(browser, "topology")


def test_networks_show_usage_and_owners(server: UiServer, browser: WebDriver) -> None:
    with server.client() as client:
        client.register_service(make_entry("api", "prod-api", ip="192.168.1.100"))
        client.allocate_ip("api", "production")
        client.allocate_ip("gone", "production")
    sign_in(browser, server)
    go(browser, "networks")
    card = '[data-network="production"]'
    wait(browser, lambda d: "2 used" in d.find_element(By.CSS_SELECTOR, card).text)
    owners = browser.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' tbody tr')].map(row => row.innerText)", card
    )
    assert any(text.startswith("api") and "orphaned" not in text for text in owners)
    assert any(text.startswith("gone orphaned") for text in owners)
    screenshot(browser, "networks")


def test_an_admin_deploys_and_sees_the_progress(tmp_path: Path, chromium_paths: tuple[str, str]) -> None:
    server = UiServer(tmp_path, deploys=True)
    driver = open_browser(server, chromium_paths)
    try:
        sign_in(driver, server)
        go(driver, "deploys")
        driver.find_element(By.ID, "deploy-package").send_keys(server.package)
        Select(driver.find_element(By.ID, "deploy-node")).select_by_visible_text("prod-api")
        driver.find_element(By.ID, "deploy-env").send_keys("HELLO_GREETING=hi")
        driver.find_element(By.CSS_SELECTOR, "#deploy-form button[type=submit]").click()
        wait(driver, lambda d: d.find_element(By.ID, "confirm").is_displayed())
        driver.find_element(By.ID, "confirm-ok").click()
        progress = '#job-detail [data-host="prod-api"] li'
        wait(driver, lambda d: "Deploy (started)" in d.find_element(By.CSS_SELECTOR, progress).text)
        assert "running" in driver.find_element(By.ID, "job-detail").text
        assert server.deployer is not None
        assert server.deployer.calls[0][1] == {"HELLO_GREETING": "hi"}
        server.deployer.release.set()
        wait(driver, lambda d: "successful" in d.find_element(By.CSS_SELECTOR, "#job-detail h3").text)
        outcome = '#job-detail [data-host="prod-api"] h4'
        wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, outcome).text == "prod-api deployed 1.0.0")
        wait(driver, lambda d: "successful" in d.find_element(By.ID, "job-rows").text)
        screenshot(driver, "deploys")
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()
        server.close()


def test_events_resume_after_the_server_restarts(server: UiServer, browser: WebDriver) -> None:
    sign_in(browser, server)
    go(browser, "events")
    with server.client() as client:
        client.register_service(make_entry("one", "prod-api", ip="192.168.1.100"))
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#event-list li.event")) == 1)

    server.stop()
    wait(browser, lambda d: d.find_element(By.ID, "connection").text == "reconnecting")
    # Written while the page is cut off: it must come from the resumed subscription's backlog.
    offline = Registry.with_persistence(server.db, networks=server.config)
    offline.add_or_update(make_entry("two", "prod-api", ip="192.168.1.100"))
    offline.close()
    server.start()
    wait(browser, lambda d: d.find_element(By.ID, "connection").text == "live", timeout=10)
    assert "Reconnected" in browser.find_element(By.ID, "notice").text
    with server.client() as client:
        client.register_service(make_entry("three", "prod-api", ip="192.168.1.100"))
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#event-list li.event")) >= 3)
    time.sleep(0.3)
    items = browser.find_elements(By.CSS_SELECTOR, "#event-list li.event")
    revisions = [int(item.get_attribute("data-revision")) for item in items]
    assert revisions == sorted(set(revisions), reverse=True), "newest first, no duplicates"
    assert revisions == list(range(revisions[0], revisions[0] - len(revisions), -1)), "no gaps"
    assert [item.text.split()[-1] for item in items] == ["three@prod-api", "two@prod-api", "one@prod-api"]
    screenshot(browser, "events")
    # The reconnect attempts while the server was down are logged by Chromium as failed connections.
    browser.expected_console_errors.append("WebSocket connection to")  # type: ignore[attr-defined]


def test_phone_width_and_dark_mode(server: UiServer, chromium_paths: tuple[str, str]) -> None:
    driver = open_browser(server, chromium_paths)
    try:
        # A window cannot be narrower than ~500 px; a phone is emulated.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
        )
        driver.execute_cdp_cmd(
            "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
        )
        with server.client() as client:
            client.register_service(make_entry("api", "prod-api", ip="192.168.1.100"))
        sign_in(driver, server)
        wait(driver, lambda d: row(d, "api@prod-api") is not None)
        background = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(15, 20, 26)"
        # Nothing but the table scrolls sideways at phone width.
        wide = driver.execute_script(
            "return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 390.5"
            " && !e.closest('.table-wrap')).map(e => e.tagName + ' ' + e.textContent)"
        )
        assert wide == []
        screenshot(driver, "services-phone-dark")
        # Keyboard: focus lands on the navigation after sign-in; Tab + Enter opens the next view.
        assert driver.switch_to.active_element.text == "Services"
        driver.switch_to.active_element.send_keys(Keys.TAB)
        assert driver.switch_to.active_element.text == "Events"
        driver.switch_to.active_element.send_keys(Keys.ENTER)
        wait(driver, lambda d: visible(d, "#view-events"))
    finally:
        driver.quit()


# --- scale -----------------------------------------------------------------------------------------


def _many(count: int, prefix: str) -> list[ServiceEntry]:
    return [
        # every host on an address of its own (its instances share it), as in a real network
        make_entry(
            f"{prefix}-{index % 50}", f"host-{index // 50}", ip=f"192.168.1.{index // 50 % 250 + 2}", tags=("bulk",)
        )
        for index in range(count)
    ]


def test_5000_services_render_and_a_burst_of_1000_events_does_not_freeze(server: UiServer, browser: WebDriver) -> None:
    assert server.registry is not None
    entries = _many(5000, "svc")
    server.call(lambda: server.registry.add_or_update_many(entries))  # type: ignore[union-attr]
    browser.get(f"{server.origin}/ui/")
    wait(browser, lambda d: visible(d, "#token"))
    browser.find_element(By.ID, "token").send_keys(server.tokens["admin"])
    # From the click to the table drawn: authenticate, subscribe, list 5000 entries, render the first page
    # (the table holds a page of rows and grows on scroll), and the next frame, so style and layout count.
    elapsed = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const started = performance.now();
        document.querySelector('#signin-form button').click();
        (function poll() {
          const count = document.getElementById('service-count');
          if (count && count.textContent === '5000 of 5000 instances') {
            requestAnimationFrame(() => done(performance.now() - started));
          } else requestAnimationFrame(poll);
        })();
        """
    )
    print(f"\n5000 services: first render {elapsed:.0f} ms after sign-in")
    # A bound against a hang, not the target: the 1 s target is measured by bench/bench_webui.py.
    assert elapsed < 5000
    assert len(browser.find_elements(By.CSS_SELECTOR, "#service-rows tr")) == 100
    browser.execute_script("document.getElementById('service-more').scrollIntoView()")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#service-rows tr")) >= 200)

    # A burst of 1000 events: the page keeps drawing frames (no long freeze) and shows them all.
    browser.execute_script(
        """
        window.gaps = [];
        let last = performance.now();
        window.watching = true;
        (function frame(now) {
          window.gaps.push(now - last); last = now;
          if (window.watching) requestAnimationFrame(frame);
        })(last);
        """
    )
    burst = _many(1000, "burst")
    server.call(lambda: server.registry.add_or_update_many(burst))  # type: ignore[union-attr]
    started = time.monotonic()
    try:
        wait(browser, lambda d: d.find_element(By.ID, "service-count").text == "6000 of 6000 instances", timeout=5)
    except TimeoutException:
        state = browser.execute_script(
            "return ['service-count', 'notice', 'connection'].map(id => document.getElementById(id).textContent)"
        )
        pytest.fail(f"the burst did not reach the table within 5 s: {state}")
    shown = time.monotonic() - started
    worst = browser.execute_script("window.watching = false; return Math.max(...window.gaps)")
    print(f"burst of 1000 events: all shown {shown * 1000:.0f} ms after the commit; longest frame {worst:.0f} ms")
    assert worst < 3000  # no freeze; the figures come from bench/bench_webui.py
