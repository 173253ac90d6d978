"""Hostile clients against a real server (real TLS on loopback): none can exhaust, stall or lock out the
registry (docs/protocol.md#limits, docs/security.md). Every attack here is bounded in count and time.

The in-process tests look at the server's own state; the slow ones run `svcreg serve` in a subprocess and
read its memory from /proc/PID/status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import signal
import socket
import sqlite3
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme
import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from registry.auth import Role, TokenRegistry
from registry.client import ConnectionSettings, WsClient
from registry.config import Limits
from registry.tls import TlsClientConfig

from .helpers import SVCREG, ServeProcess, free_port, make_entry
from .test_server import Pki, Running, start, write_pki

# --- in-process server --------------------------------------------------------------------------


@pytest.fixture
def hostile_pki(tmp_path: Path) -> Pki:
    return write_pki(tmp_path, trustme.CA())


@pytest.fixture
def tokens() -> tuple[TokenRegistry, dict[str, str]]:
    registry = TokenRegistry([])
    return registry, {role.label: registry.add(role.label, role)[1] for role in Role}


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, pki, tokens, **limits: object) -> AsyncIterator[Running]:
    running = await start(tmp_path, pki, tokens, limits=Limits(**limits))  # type: ignore[arg-type]
    try:
        yield running
    finally:
        await running.server.close()
        running.registry.close()


def _raw_request(running: Running, request: bytes, *, timeout: float = 10) -> bytes:
    """Send ``request`` over a fresh TLS connection; everything the server answers until it closes."""
    context = ssl.create_default_context(cafile=str(running.pki.ca_file))
    with (
        socket.create_connection(("127.0.0.1", running.server.port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(request)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and b"Connection: close" in answer:
                break
        return answer


def _upgrade(*headers: str, key: bool = True) -> bytes:
    lines = ["GET / HTTP/1.1", "Host: 127.0.0.1", "Connection: Upgrade", "Sec-WebSocket-Version: 13", *headers]
    if key:
        lines.append("Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode())
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_a_header_sent_twice_is_a_bad_request(tmp_path: Path, hostile_pki, tokens) -> None:
    async with serving(tmp_path, hostile_pki, tokens) as running:
        bearer = f"Authorization: Bearer {running.tokens['read']}"
        for headers, name in [
            (("Upgrade: websocket", bearer, bearer), "Authorization"),
            (("Upgrade: websocket", "Upgrade: websocket", bearer), "Upgrade"),
        ]:
            answer = await asyncio.to_thread(_raw_request, running, _upgrade(*headers))
            status, _, rest = answer.partition(b"\r\n")
            assert status.startswith(b"HTTP/1.1 400"), answer[:200]
            assert f"{name} is sent more than once".encode() in rest
        async with await running.client("read") as client:  # and it serves on
            assert (await client.ping())["pong"] is True


async def test_metrics_has_one_content_length_and_its_body(tmp_path: Path, hostile_pki, tokens) -> None:
    async with serving(tmp_path, hostile_pki, tokens) as running:
        context = ssl.create_default_context(cafile=str(running.pki.ca_file))
        url = f"https://127.0.0.1:{running.server.port}/metrics"

        def fetch() -> tuple[list[str], list[str], bytes]:
            # urllib reads the first Content-Length; with two (0 and the real one) the body came back empty.
            with urllib.request.urlopen(url, context=context, timeout=10) as response:
                return (
                    response.headers.get_all("Content-Length"),
                    response.headers.get_all("Content-Type"),
                    response.read(),
                )

        lengths, types, body = await asyncio.to_thread(fetch)
        assert lengths == [str(len(body))]
        assert types == ["text/plain; version=0.0.4; charset=utf-8"]
        assert b"svcreg_connections" in body


async def test_handshakes_that_fail_after_the_token_check_leave_nothing_behind(
    tmp_path: Path, hostile_pki, tokens
) -> None:
    """A valid token but no Sec-WebSocket-Key: HTTP 400, and no trace of the connection in the server."""
    async with serving(tmp_path, hostile_pki, tokens) as running:
        request = _upgrade("Upgrade: websocket", f"Authorization: Bearer {running.tokens['read']}", key=False)
        for _ in range(200):
            answer = await asyncio.to_thread(_raw_request, running, request)
            assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        for _ in range(50):  # the last connection may still be closing
            gc.collect()
            if not running.server._handshakes:
                break
            await asyncio.sleep(0.05)
        assert len(running.server._handshakes) == 0
        assert running.server._sessions == set()


async def _open_unauthenticated(running: Running, count: int, **options: object) -> list[ClientConnection]:
    context = running.pki.client_tls().ssl_context()
    return [await connect(running.url, ssl=context, **options) for _ in range(count)]  # type: ignore[arg-type]


async def test_unauthenticated_connections_have_their_own_budget(tmp_path: Path, hostile_pki, tokens) -> None:
    async with serving(
        tmp_path, hostile_pki, tokens, max_connections=3, max_pending=4, max_pending_per_address=10
    ) as running:
        pending = await _open_unauthenticated(running, 4)
        with pytest.raises(InvalidStatus) as refused:
            await _open_unauthenticated(running, 1)
        assert refused.value.response.status_code == 503
        assert b"unauthenticated" in refused.value.response.body
        # The pending connections keep no authenticated client out: all three admitted.
        clients = [await running.client(role) for role in ("admin", "read", "write")]
        try:
            for client in clients:
                assert (await client.ping())["pong"] is True
            # authenticated connections fill the server: now a newcomer with a token gets 503
            with pytest.raises(Exception, match="503"):
                await running.client("admin")
        finally:
            for client in clients:
                await client.close()
        # A pending connection that authenticates counts as authenticated from then on: its place frees up.
        await pending[0].send(json.dumps({"id": "a", "type": "request", "action": "authenticate",
                                          "params": {"token": running.tokens["read"]}}))  # fmt: skip
        assert json.loads(await pending[0].recv())["result"]["role"] == "read"
        late = await _open_unauthenticated(running, 1)
        for connection in pending + late:
            await connection.close()


async def test_one_address_cannot_use_the_whole_pending_budget(tmp_path: Path, hostile_pki, tokens) -> None:
    async with serving(tmp_path, hostile_pki, tokens, max_pending=10, max_pending_per_address=2) as running:
        mine = await _open_unauthenticated(running, 2)
        with pytest.raises(InvalidStatus) as refused:
            await _open_unauthenticated(running, 1)
        assert b"from this address" in refused.value.response.body
        # another loopback address still gets in (Linux routes all of 127/8 to lo)
        theirs = await _open_unauthenticated(running, 1, local_addr=("127.0.0.2", 0))
        for connection in mine + theirs:
            await connection.close()


async def test_an_unauthenticated_slowloris_is_cut_at_the_handshake_timeout(
    tmp_path: Path, hostile_pki, tokens
) -> None:
    async with serving(tmp_path, hostile_pki, tokens, handshake_timeout=0.5) as running:
        context = ssl.create_default_context(cafile=str(running.pki.ca_file))

        def dribble() -> float:
            started = time.monotonic()
            with (
                socket.create_connection(("127.0.0.1", running.server.port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    while tls.recv(1024):  # 408 or just the close
                        pass
            return time.monotonic() - started

        assert await asyncio.to_thread(dribble) < 5
        async with await running.client("read") as client:
            assert (await client.ping())["pong"] is True


async def test_a_resume_far_larger_than_the_send_buffer_reaches_a_client_that_reads(
    tmp_path: Path, hostile_pki, tokens
) -> None:
    """3,000 replayed events through a 16 KiB send buffer and a 50-event queue: all, in order, once."""
    async with serving(tmp_path, hostile_pki, tokens, send_buffer_bytes=16384, send_queue=50) as running:
        start_revision = running.registry.revision
        for number in range(30):
            running.registry.add_or_update_many(make_entry(f"svc-{number}-{each}") for each in range(100))
        async with await running.client("read") as client:
            await client.subscribe(since_revision=start_revision)
            revisions = [(await client.next_event(timeout=10)).revision for _ in range(3000)]
        assert revisions == list(range(start_revision + 1, start_revision + 3001))


# --- `svcreg serve` in a subprocess: memory and shutdown ----------------------------------------


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class _Served:
    def __init__(self, home: Path, serve: ServeProcess, url: str, token: str) -> None:
        self.home, self.serve, self.url, self.token = home, serve, url, token

    @property
    def pid(self) -> int:
        return self.serve.process.pid

    def settings(self) -> ConnectionSettings:
        return ConnectionSettings(self.url, TlsClientConfig(ca_file=str(self.home / "tls" / "ca.crt")), self.token)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[_Served]:
    import subprocess

    home = tmp_path / "svcreg"
    env = {key: value for key, value in os.environ.items() if not key.startswith("SVCREG_")}
    subprocess.run([*SVCREG, "init", str(home)], env=env, check=True, capture_output=True, timeout=60)
    config_file = home / "svcreg.yaml"
    config = yaml.safe_load(config_file.read_text())
    port = free_port()
    config["listen"] = f"127.0.0.1:{port}"
    config_file.write_text(yaml.safe_dump(config))
    serve = ServeProcess(config_file, env)
    served = _Served(home, serve, f"wss://127.0.0.1:{port}/", (home / "admin.token").read_text().strip())
    yield served
    if serve.process.poll() is None:
        serve.stop(signal.SIGKILL)


def _padding(size: int) -> dict[str, str]:
    """``size`` bytes of incompressible metadata, in values of 2 KiB (a value may have 4,096 characters)."""
    return {f"pad-{number}": os.urandom(1024).hex() for number in range(size // 2048)}


async def _fill(served: _Served, count: int, metadata_bytes: int) -> None:
    async with await WsClient.connect(served.settings()) as client:
        for batch in range(0, count, 50):
            entries = [
                make_entry(f"svc-{number}", metadata=_padding(metadata_bytes)).to_dict()
                for number in range(batch, min(batch + 50, count))
            ]
            await asyncio.gather(*(client.register_service(entry) for entry in entries))


async def _attack_with_unread_lists(served: _Served, count: int) -> ClientConnection:
    """Pipeline ``count`` list_services and never read (max_queue=1: the client stops reading its socket)."""
    settings = served.settings()
    attacker = await connect(
        served.url,
        ssl=settings.tls.ssl_context(),
        additional_headers={"Authorization": f"Bearer {served.token}"},
        max_queue=1,
        max_size=None,
    )
    frame = json.dumps({"id": "x", "type": "request", "action": "list_services"})
    for _ in range(count):
        await attacker.send(frame)
    return attacker


@pytest.mark.slow
async def test_a_client_that_never_reads_its_large_answers_holds_bounded_memory(served: _Served) -> None:
    """300 entries of 16 KiB (a ~5 MB answer) asked for 60 times and never read: before the fix every
    answer was built and queued (over 1 GB); now one is in the making and the rest wait in the kernel."""
    await _fill(served, 300, 16384)
    before = _rss_kib(served.pid)
    attacker = await _attack_with_unread_lists(served, 60)
    try:
        async with await WsClient.connect(served.settings()) as bystander:
            for _ in range(20):  # the others are served meanwhile
                assert (await asyncio.wait_for(bystander.ping(), 5))["pong"] is True
                await asyncio.sleep(0.1)
        growth_mib = (_rss_kib(served.pid, "VmHWM") - before) / 1024
        assert growth_mib < 150, f"server grew by {growth_mib:.0f} MiB under 60 unread 5 MB answers"
    finally:
        attacker.transport.abort()
    async with await WsClient.connect(served.settings()) as newcomer:  # and serves at once afterwards
        assert len(await asyncio.wait_for(newcomer.list_services(), 10)) == 300


@pytest.mark.slow
async def test_sigterm_under_attack_stops_the_server_and_keeps_every_write(served: _Served) -> None:
    await _fill(served, 200, 16384)
    attacker = await _attack_with_unread_lists(served, 30)
    context = served.settings().tls.ssl_context()
    pending = [await connect(served.url, ssl=context) for _ in range(15)]
    started = time.monotonic()
    served.serve.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(served.serve.process.wait, 15) == 0
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"SIGTERM took {elapsed:.1f} s"
    for connection in [attacker, *pending]:
        connection.transport.abort()
    database = served.home / "registry.db"
    assert database.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True) as connection:
        (services,) = connection.execute("SELECT count(*) FROM services").fetchone()
    assert services == 200
