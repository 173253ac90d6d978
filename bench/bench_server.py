"""The registry side by side with etcd and with the ceiling of its own stack. Figures for the notes.

    .venv/bin/python bench/bench_server.py [--seconds 3] [--subscribers 1000] [--runs 3] [--json]

Three servers, each in its own process, driven in turn by the same harness from this process over
loopback, with the same ~300-byte entry:

  * svcreg: `svcreg serve` on the durable embedded store (synchronous=FULL);
  * etcd: Debian's `etcd-server`, one member, its default durable WAL (fsync per commit),
    driven through `aetcd` (asyncio gRPC; installed with `pip install -e '.[bench]'`);
  * echo: a raw `websockets` TLS echo server with the same certificates and the same event loop as
    svcreg serve (--loop: uvloop where installed): the ceiling of our stack; it also broadcasts a
    frame to every connection for the fan-out ceiling.

Measured for each: writes/s and p50/p99 latency with 1, 8 and 64 concurrent clients (register_service
/ put), reads/s (get_service / get), fan-out of one change to N subscribers on N connections (time
until the last one has it; etcd: one watch per connection), and svcreg's memory per idle connection.
With --runs N every figure is the median of N runs, and the ratios (svcreg/etcd, svcreg/echo) are
printed beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from websockets.asyncio.client import connect

from registry.client import ConnectionSettings, WsClient
from registry.tls import TlsClientConfig

# A frame starting with "B" is sent to every connection (the fan-out ceiling); anything else is echoed.
ECHO_SERVER = textwrap.dedent(
    """
    import asyncio, ssl, sys
    from websockets.asyncio.server import broadcast, serve

    connections = set()

    async def echo(connection):
        connections.add(connection)
        try:
            async for message in connection:
                if message[:1] == "B":
                    broadcast(connections, message)
                else:
                    await connection.send(message)
        finally:
            connections.discard(connection)

    async def main():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[1], sys.argv[2])
        async with serve(echo, "127.0.0.1", 0, ssl=context, max_size=2**20, max_queue=None) as server:
            print(server.sockets[0].getsockname()[1], flush=True)
            await asyncio.Future()

    run = asyncio.run
    if sys.argv[3] != "asyncio":  # the same loop as svcreg serve --loop
        try:
            import uvloop
            run = uvloop.run
        except ImportError:
            if sys.argv[3] == "uvloop":
                raise
    run(main())
    """
)

ENTRY = {
    "service_name": "bench",
    "host_id": "h",
    "location": "local",
    "network_info": {"ip": "127.0.0.1"},
    "endpoints": [{"name": "http", "port": 8080}],
    "tags": ["bench", "v1"],
    "metadata": {"owner": "platform-team", "description": "an entry of about 300 bytes, like the issue's"},
}
CONCURRENCY = (1, 8, 64)


def entry(index: int, sequence: int) -> dict[str, object]:
    """Client ``index``'s ``sequence``-th write: one of 500 instances per client, with new content every
    time (an unchanged entry would be a heartbeat for svcreg: no revision, no commit)."""
    return dict(
        ENTRY,
        service_name=f"bench-{index}-{sequence % 500}",
        metadata={**ENTRY["metadata"], "sequence": str(sequence)},  # type: ignore[dict-item]
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def run_clients(clients: list, seconds: float, operation) -> tuple[float, list[float]]:
    """Each client runs ``operation`` in a loop for ``seconds``: (operations/s, latencies)."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    done = 0

    async def loop(client, index: int) -> None:
        nonlocal done
        sequence = 0
        while time.perf_counter() < stop_at:
            began = time.perf_counter()
            await operation(client, index, sequence)
            latencies.append(time.perf_counter() - began)
            sequence += 1
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(loop(client, index) for index, client in enumerate(clients)))
    return done / (time.perf_counter() - began), latencies


def record(results: dict[str, float], name: str, rate: float, latencies: list[float] | None = None) -> None:
    results[f"{name}_per_s"] = rate
    if latencies:
        results[f"{name}_p50_ms"] = percentile(latencies, 0.5) * 1e3
        results[f"{name}_p99_ms"] = percentile(latencies, 0.99) * 1e3


# --- the three servers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def svcreg_server(home: Path, subscribers: int, loop: str = "auto") -> Iterator[tuple[int, subprocess.Popen[str]]]:
    env = {**os.environ, "SVCREG_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "registry.cli", "init", str(home)], env=env, check=True, capture_output=True)
    config = home / "svcreg.yaml"
    text = config.read_text().replace("127.0.0.1:9443", f"127.0.0.1:{free_port()}")
    config.write_text(text.replace("max_connections: 1000", f"max_connections: {subscribers + 200}"))
    server = subprocess.Popen(
        [sys.executable, "-m", "registry.cli", "serve", "--config", str(config), "--loop", loop],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:  # warnings may come before the banner
            if "serving wss://" in line:
                break
        else:
            raise SystemExit("svcreg serve did not start")
        # Keep reading its output: a full pipe would stall the server mid-benchmark.
        threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()
        yield int(line.split("wss://")[1].split("/")[0].rsplit(":", 1)[1]), server
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def echo_server(home: Path, loop: str = "auto") -> Iterator[int]:
    echo = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, str(home / "tls/server.crt"), str(home / "tls/server.key"), loop],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert echo.stdout is not None
        yield int(echo.stdout.readline())
    finally:
        echo.terminate()
        echo.wait(timeout=30)


@contextlib.contextmanager
def etcd_server(data_dir: Path) -> Iterator[int]:
    binary = shutil.which("etcd")
    if binary is None:
        raise SystemExit("etcd is not installed: apt-get install etcd-server (scripts/ensure-bench-deps does it)")
    client, peer = free_port(), free_port()
    etcd = subprocess.Popen(
        [
            binary,
            "--name=bench",
            f"--data-dir={data_dir}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=bench=http://127.0.0.1:{peer}",
            "--log-level=error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", client), timeout=1):
                break
            if time.monotonic() > deadline or etcd.poll() is not None:
                raise SystemExit("etcd did not start")
            time.sleep(0.1)
        yield client
    finally:
        etcd.terminate()
        etcd.wait(timeout=30)


# --- the measurements ----------------------------------------------------------------------------------


async def fan_out(subscribers: list, arm, trigger, receive, rounds: int) -> float:
    """Median time from a change until the last of ``subscribers`` has it."""
    for client in subscribers:
        await arm(client)
    await trigger(-1)  # one warm-up change: every watch is in place before the clock starts
    await asyncio.gather(*(receive(client) for client in subscribers))
    delays = []
    for round_number in range(rounds):
        began = time.perf_counter()
        await trigger(round_number)
        await asyncio.gather(*(receive(client) for client in subscribers))
        delays.append(time.perf_counter() - began)
    return statistics.median(delays) * 1e3


async def bench_svcreg(port: int, pid: int, tls: TlsClientConfig, token: str, options) -> dict[str, float]:
    settings = ConnectionSettings(f"wss://127.0.0.1:{port}/", tls, token, timeout=60)
    results: dict[str, float] = {}

    async def register(client, index, sequence):
        await client.register_service(entry(index, sequence))

    async def get(client, index, sequence):
        await client.get_service("bench-0-0")

    for concurrency in CONCURRENCY:
        clients = [await WsClient.connect(settings) for _ in range(concurrency)]
        record(results, f"write_c{concurrency}", *await run_clients(clients, options.seconds, register))
        record(results, f"read_c{concurrency}", *await run_clients(clients, options.seconds, get))
        for client in clients:
            await client.close()
    baseline = rss_kib(pid)
    subscribers = [await WsClient.connect(settings) for _ in range(options.subscribers)]
    await asyncio.sleep(1)
    results["rss_kib_per_idle_connection"] = (rss_kib(pid) - baseline) / options.subscribers
    writer = await WsClient.connect(settings)

    async def arm(client):
        await client.subscribe(["ServiceUpdated", "ServiceRegistered"], filter={"service_name": "fanout"})

    async def trigger(round_number):
        await writer.register_service(dict(ENTRY, service_name="fanout", tags=[str(round_number)]))

    async def receive(client):
        await client.next_event(timeout=30)

    results["fanout_last_ms"] = await fan_out(subscribers, arm, trigger, receive, options.fanout_rounds)
    for client in [writer, *subscribers]:
        await client.close()
    return results


async def bench_etcd(port: int, options) -> dict[str, float]:
    import aetcd

    results: dict[str, float] = {}

    async def client_factory():
        client = aetcd.Client(host="127.0.0.1", port=port, timeout=60)
        await client.connect()
        return client

    async def put(client, index, sequence):
        written = entry(index, sequence)
        await client.put(f"/bench/services/{written['service_name']}/h".encode(), json.dumps(written).encode())

    async def get(client, index, sequence):
        await client.get(b"/bench/services/bench-0-0/h")

    for concurrency in CONCURRENCY:
        clients = [await client_factory() for _ in range(concurrency)]
        record(results, f"write_c{concurrency}", *await run_clients(clients, options.seconds, put))
        record(results, f"read_c{concurrency}", *await run_clients(clients, options.seconds, get))
        for client in clients:
            await client.close()
    subscribers = [await client_factory() for _ in range(options.subscribers)]
    streams: dict[int, object] = {}
    writer = await client_factory()

    async def arm(client):
        watch = await client.watch(b"/bench/fanout")
        streams[id(client)] = aiter(watch)

    async def trigger(round_number):
        await writer.put(b"/bench/fanout", json.dumps(entry(0, round_number)).encode())

    async def receive(client):
        await anext(streams[id(client)])

    results["fanout_last_ms"] = await fan_out(subscribers, arm, trigger, receive, options.fanout_rounds)
    for client in [writer, *subscribers]:
        await client.close()
    return results


async def bench_echo(port: int, tls: TlsClientConfig, options) -> dict[str, float]:
    context = tls.ssl_context()
    frame = json.dumps({"id": "1", "type": "request", "action": "register_service", "params": {"service": ENTRY}})
    results: dict[str, float] = {}

    async def echo_client():
        return await connect(f"wss://localhost:{port}/", ssl=context, max_size=2**20)

    async def echo_once(client, index, sequence):
        await client.send(frame)
        await client.recv()

    for concurrency in CONCURRENCY:
        clients = [await echo_client() for _ in range(concurrency)]
        rate, latencies = await run_clients(clients, options.seconds, echo_once)
        record(results, f"write_c{concurrency}", rate, latencies)
        record(results, f"read_c{concurrency}", rate, latencies)
        for client in clients:
            await client.close()
    subscribers = [await echo_client() for _ in range(options.subscribers)]
    writer = await echo_client()

    async def arm(client):
        pass

    async def trigger(round_number):
        await writer.send("B" + frame)

    async def receive(client):
        await client.recv()

    results["fanout_last_ms"] = await fan_out(subscribers, arm, trigger, receive, options.fanout_rounds)
    for client in [writer, *subscribers]:
        await client.close()
    return results


async def one_run(options) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "svcreg"
        tls = TlsClientConfig(ca_file=str(home / "tls/ca.crt"))
        with svcreg_server(home, options.subscribers, options.loop) as (port, server):
            token = (home / "admin.token").read_text().strip()
            svcreg = await bench_svcreg(port, server.pid, tls, token, options)
        with echo_server(home, options.loop) as port:
            echo = await bench_echo(port, tls, options)
        with etcd_server(Path(tmp) / "etcd") as port:
            etcd = await bench_etcd(port, options)
    return {"svcreg": svcreg, "etcd": etcd, "echo": echo}


def medians(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        target: {key: statistics.median(run[target][key] for run in runs) for key in runs[0][target]}
        for target in runs[0]
    }


def report(results: dict[str, dict[str, float]]) -> None:
    svcreg, etcd, echo = results["svcreg"], results["etcd"], results["echo"]
    print("(ratios are svcreg / other: above 1 is better for */s, below 1 is better for *_ms)")
    print(f"{'figure':28s} {'svcreg':>11s} {'etcd':>11s} {'echo':>11s} {'/etcd':>7s} {'/echo':>7s}")
    for key, ours in svcreg.items():
        theirs, ceiling = etcd.get(key), echo.get(key)
        print(
            f"{key:28s} {_cell(ours)} {_cell(theirs)} {_cell(ceiling)} {_ratio(ours, theirs)} {_ratio(ours, ceiling)}"
        )


def _cell(value: float | None) -> str:
    return f"{value:11,.1f}" if value is not None else f"{'-':>11s}"


def _ratio(ours: float, other: float | None) -> str:
    return f"{ours / other:7.2f}" if other else f"{'-':>7s}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--fanout-rounds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1, help="report the median of this many runs")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="svcreg serve's and the echo's loop"
    )
    options = parser.parse_args()
    results = medians([asyncio.run(one_run(options)) for _ in range(options.runs)])
    if options.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)


if __name__ == "__main__":
    main()
