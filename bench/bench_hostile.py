"""Hostile clients against `svcreg serve` (issue 12): what one misbehaving client costs the server and the
others. Figures for the notes, each against its target.

    .venv/bin/python bench/bench_hostile.py [--quick] [--scenario NAME] [--json]

Each scenario starts its own `svcreg init` + `svcreg serve` on 127.0.0.1 and reads the server's memory from
/proc/PID/status (VmRSS, sampled every 20 ms):

  * pipelined: one `list_services` answer of ~20 MB (5,000 entries of 4 KB); an attacker with a read token
    sends 200 of them and never reads. Server RSS growth, a concurrent client's worst ping, the time for a
    new client to connect and ping once the attacker has gone.
  * keyless: 3,000 handshakes with a valid token and no Sec-WebSocket-Key (HTTP 400), 4 at a time: RSS growth
    after a warm-up of 1,000 (and from a fresh server).
  * pending: 1,000 unauthenticated connections open (limits raised to admit them all), then an admin
    connects: the time it takes; and with the default limits, how many of the 1,000 get in.
  * resume: 9,000 events written, then a subscriber resumes from before them, with the default send buffer
    and with a 64 KiB one: delivered, in order, once.
  * sigterm: SIGTERM while the pipelined attacker and 500 unauthenticated connections are open: time until
    the process exits, and whether every write is in the store.

--quick runs smaller counts (a smoke run); the targets are for the full counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from registry.client import ConnectionSettings, WsClient
from registry.tls import TlsClientConfig


@dataclass
class Server:
    home: Path
    process: subprocess.Popen[str]
    port: int
    token: str

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/"

    @property
    def ca(self) -> Path:
        return self.home / "tls" / "ca.crt"

    def settings(self, token: str | None = "") -> ConnectionSettings:
        return ConnectionSettings(
            self.url, TlsClientConfig(ca_file=str(self.ca)), self.token if token == "" else token, timeout=30
        )

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def serving(limits: dict[str, Any] | None = None) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as directory:
        home = Path(directory) / "svcreg"
        env = {key: value for key, value in os.environ.items() if not key.startswith("SVCREG_")}
        cli = [sys.executable, "-m", "registry.cli"]
        subprocess.run([*cli, "init", str(home)], env=env, check=True, capture_output=True, timeout=60)
        config_file = home / "svcreg.yaml"
        config = yaml.safe_load(config_file.read_text())
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config["listen"] = f"127.0.0.1:{port}"
        config["limits"] = {**config.get("limits", {}), **(limits or {})}
        config_file.write_text(yaml.safe_dump(config))
        process = subprocess.Popen(
            [*cli, "serve", "--config", str(config_file)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if "serving wss://" in line:
                    break
            else:
                raise SystemExit("svcreg serve did not start")
            threading.Thread(target=lambda: [None for _ in process.stdout or ()], daemon=True).start()
            yield Server(home, process, port, (home / "admin.token").read_text().strip())
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


class RssSampler:
    """The server's peak RSS while the block runs (sampled every 20 ms)."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak, self._stop = server, server.rss_kib(), threading.Event()

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, self.server.rss_kib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None


@dataclass
class Results:
    figures: list[Figure] = field(default_factory=list)

    def add(self, name: str, value: float, unit: str, target: str = "", check: Callable[[float], bool] | None = None):
        self.figures.append(Figure(name, round(value, 3), unit, target, check(value) if check else None))


# --- helpers ----------------------------------------------------------------------------------


async def fill(server: Server, count: int, metadata_bytes: int) -> None:
    pad = max(1, metadata_bytes // 2048)
    async with await WsClient.connect(server.settings()) as client:
        for start in range(0, count, 100):
            await asyncio.gather(
                *(
                    client.register_service(
                        {
                            "service_name": f"svc-{number}",
                            "host_id": f"host-{number % 50}",
                            "location": "local",
                            "network_info": {"ip": "127.0.0.1"},
                            "metadata": {f"pad-{key}": os.urandom(1024).hex() for key in range(pad)},
                        }
                    )
                    for number in range(start, min(start + 100, count))
                )
            )


async def attacker(server: Server, requests: int) -> ClientConnection:
    """A read-token connection that pipelines ``requests`` list_services and never reads."""
    connection = await connect(
        server.url,
        ssl=server.ssl_context(),
        additional_headers={"Authorization": f"Bearer {server.token}"},
        max_queue=1,
        max_size=None,
        open_timeout=30,
    )
    frame = json.dumps({"id": "x", "type": "request", "action": "list_services"})
    for _ in range(requests):
        await asyncio.wait_for(connection.send(frame), 30)
    return connection


async def timed_connect_and_ping(server: Server) -> float:
    started = time.perf_counter()
    async with await WsClient.connect(server.settings()) as client:
        await client.ping()
    return time.perf_counter() - started


@contextlib.asynccontextmanager
async def unauthenticated(server: Server, count: int) -> AsyncIterator[tuple[list[ClientConnection], int]]:
    opened: list[ClientConnection] = []
    refused = 0
    context = server.ssl_context()
    for _ in range(count):
        try:
            opened.append(await connect(server.url, ssl=context, open_timeout=30))
        except InvalidStatus:
            refused += 1
    try:
        yield opened, refused
    finally:
        for connection in opened:
            connection.transport.abort()


# --- scenarios ------------------------------------------------------------------------------


async def pipelined(results: Results, quick: bool) -> None:
    entries, requests = (1000, 40) if quick else (5000, 200)
    with serving() as server:
        await fill(server, entries, 4096)
        async with await WsClient.connect(server.settings()) as probe:
            size = len(json.dumps([entry.to_dict() for entry in await probe.list_services()]))
        results.add("pipelined: one answer", size / 2**20, "MiB")
        before = server.rss_kib()
        pings: list[float] = []
        with RssSampler(server) as sampler:
            bad = await attacker(server, requests)
            async with await WsClient.connect(server.settings()) as bystander:
                deadline = time.monotonic() + (4 if quick else 10)
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    await bystander.ping()
                    pings.append(time.perf_counter() - started)
                    await asyncio.sleep(0.05)
            bad.transport.abort()
        results.add("pipelined: server RSS growth", (sampler.peak - before) / 1024, "MiB", "< 256",
                    lambda value: value < 256)  # fmt: skip
        results.add("pipelined: worst concurrent ping", max(pings) * 1000, "ms", "< 500", lambda value: value < 500)
        results.add("pipelined: connect+ping after the attacker left", await timed_connect_and_ping(server) * 1000,
                    "ms", "< 1000", lambda value: value < 1000)  # fmt: skip


def keyless_handshake(server: Server, context: ssl.SSLContext) -> bytes:
    request = (
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {server.token}\r\n\r\n"
    ).encode()
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(request)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := tls.recv(4096):
                answer += chunk
        return answer


async def keyless(results: Results, quick: bool) -> None:
    count = 600 if quick else 3000
    with serving() as server:
        context = server.ssl_context()

        def run(number: int) -> int:
            return sum(keyless_handshake(server, context).startswith(b"HTTP/1.1 400") for _ in range(number))

        fresh = server.rss_kib()
        # Warm-up at the same concurrency: TLS contexts, caches and the allocator's per-thread arenas settle
        # within ~1,000 handshakes (then 3,000 more add ~0.1 MiB); a leak grows with every handshake.
        await asyncio.gather(*(asyncio.to_thread(run, 250) for _ in range(4)))
        await asyncio.sleep(0.5)
        before = server.rss_kib()
        answered = sum(await asyncio.gather(*(asyncio.to_thread(run, count // 4) for _ in range(4))))
        await asyncio.sleep(0.5)
        after = server.rss_kib()
        results.add("keyless: handshakes answered 400", answered, "", f"= {count}", lambda value: value == count)
        results.add("keyless: server RSS growth after 1,000 warm-up", (after - before) / 1024, "MiB", "< 5",
                    lambda value: value < 5)  # fmt: skip
        results.add("keyless: RSS growth from a fresh server (warm-up too)", (after - fresh) / 1024, "MiB")


async def pending(results: Results, quick: bool) -> None:
    count = 300 if quick else 1000
    many = {"max_pending": 2 * count, "max_pending_per_address": 2 * count, "handshake_timeout": 120}
    with serving(many) as server:
        async with unauthenticated(server, count) as (opened, _):
            results.add("pending: unauthenticated connections open (raised limits)", len(opened), "")
            results.add("pending: admin connect+ping meanwhile", await timed_connect_and_ping(server) * 1000, "ms",
                        "< 1000", lambda value: value < 1000)  # fmt: skip
    with serving({"handshake_timeout": 120}) as server:
        async with unauthenticated(server, count) as (opened, refused):
            results.add("pending: admitted with the default limits", len(opened), f"of {count} ({refused} got 503)")
            results.add("pending: admin connect+ping, default limits", await timed_connect_and_ping(server) * 1000,
                        "ms", "< 1000", lambda value: value < 1000)  # fmt: skip


async def resume(results: Results, quick: bool) -> None:
    count = 2000 if quick else 9000
    for label, limits in (("default buffer", {}), ("64 KiB buffer", {"send_buffer_bytes": 65536})):
        with serving(limits) as server:
            async with await WsClient.connect(server.settings()) as client:
                before = int((await client.ping())["revision"])
                await fill(server, count, 256)
                await client.subscribe(since_revision=before)
                revisions = [(await client.next_event(timeout=30)).revision for _ in range(count)]
            in_order = revisions == sorted(set(revisions)) and len(revisions) == count
            results.add(f"resume ({label}): events delivered", len(set(revisions)), f"in order, once: {in_order}",
                        f"= {count}", lambda value, ok=in_order: value == count and ok)  # fmt: skip


async def sigterm(results: Results, quick: bool) -> None:
    entries = 1000 if quick else 5000
    with serving({"handshake_timeout": 120}) as server:
        await fill(server, entries, 4096)
        bad = await attacker(server, 40 if quick else 200)
        async with unauthenticated(server, 100 if quick else 500) as _:
            started = time.perf_counter()
            server.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.process.wait, 60)
            elapsed = time.perf_counter() - started
        bad.transport.abort()
        database = server.home / "registry.db"
        with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True) as connection:
            (stored,) = connection.execute("SELECT count(*) FROM services").fetchone()
        results.add("sigterm: time to exit under attack", elapsed, f"s (exit code {code})", "< 5",
                    lambda value: value < 5 and code == 0)  # fmt: skip
        results.add("sigterm: writes in the store", stored, "", f"= {entries}", lambda value: value == entries)


SCENARIOS = {"pipelined": pipelined, "keyless": keyless, "pending": pending, "resume": resume, "sigterm": sigterm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append", help="run only these")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    results = Results()
    started = time.monotonic()
    for name in options.scenario or SCENARIOS:
        asyncio.run(asyncio.wait_for(SCENARIOS[name](results, options.quick), 600))
    if options.json:
        print(json.dumps([figure.__dict__ for figure in results.figures], indent=2))
    else:
        print(f"{'figure':58} {'value':>10}  {'unit':28} {'target':>8}  result")
        for figure in results.figures:
            verdict = "" if figure.ok is None else ("PASS" if figure.ok else "FAIL")
            print(f"{figure.name:58} {figure.value:>10}  {figure.unit:28} {figure.target:>8}  {verdict}")
        print(f"({time.monotonic() - started:.0f} s{', quick counts' if options.quick else ''})")
    if any(figure.ok is False for figure in results.figures):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
