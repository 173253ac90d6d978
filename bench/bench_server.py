"""Benchmarks for the WebSocket server (issue: TLS WebSocket API). Figures for the notes, not pass/fail.

    .venv/bin/python bench/bench_server.py [--seconds 3] [--subscribers 1000] [--json]

The registry (`svcreg serve`, durable store) and a raw `websockets` TLS echo server (the
ceiling for this stack) each run in their own process with the same certificates; the
load comes from this process over loopback, through the same harness for both:

  * durable register_service ops/s and p50/p99 latency with 1, 8 and 64 concurrent clients;
  * get_service ops/s with the same concurrency;
  * the echo server's round trips/s with the same frames and concurrency, and our ratio to it;
  * fan-out: one change delivered to N subscribers on N connections: time until the last
    one has it (p50/p99 over several changes);
  * memory per idle connection (server RSS with N idle authenticated connections).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from websockets.asyncio.client import connect

from registry.client import ConnectionSettings, WsClient
from registry.tls import TlsClientConfig

ECHO_SERVER = textwrap.dedent(
    """
    import asyncio, ssl, sys
    from websockets.asyncio.server import serve

    async def echo(connection):
        async for message in connection:
            await connection.send(message)

    async def main():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[1], sys.argv[2])
        async with serve(echo, "127.0.0.1", 0, ssl=context, max_size=2**20) as server:
            print(server.sockets[0].getsockname()[1], flush=True)
            await asyncio.Future()

    asyncio.run(main())
    """
)

ENTRY = {
    "service_name": "bench",
    "host_id": "h",
    "location": "local",
    "network_info": {"ip": "127.0.0.1"},
    "endpoints": [{"name": "http", "port": 8080}],
}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_clients(count: int, seconds: float, make_client, operation) -> tuple[float, list[float]]:
    """``count`` connections each running ``operation`` in a loop for ``seconds``."""
    clients = [await make_client() for _ in range(count)]
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
    elapsed = time.perf_counter() - began
    for client in clients:
        await client.close()
    return done / elapsed, latencies


async def bench(options: argparse.Namespace) -> dict[str, float]:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "svcreg"
        env = {**os.environ, "SVCREG_HOME": str(home)}
        subprocess.run(
            [sys.executable, "-m", "registry.cli", "init", str(home)], env=env, check=True, capture_output=True
        )
        config = home / "svcreg.yaml"
        with socket.socket() as probe:  # the config wants a real port
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        text = config.read_text().replace("127.0.0.1:9443", f"127.0.0.1:{free}")
        text = text.replace("max_connections: 1000", f"max_connections: {options.subscribers + 100}")
        config.write_text(text)
        token = (home / "admin.token").read_text().strip()
        server = subprocess.Popen(
            [sys.executable, "-m", "registry.cli", "serve", "--config", str(config)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        echo = subprocess.Popen(
            [sys.executable, "-c", ECHO_SERVER, str(home / "tls/server.crt"), str(home / "tls/server.key")],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None and echo.stdout is not None
            for line in server.stdout:  # warnings may come before the banner
                if "serving wss://" in line:
                    break
            else:
                raise SystemExit("svcreg serve did not start")
            port = int(line.split("wss://")[1].split("/")[0].rsplit(":", 1)[1])
            # Keep reading its output: a full pipe would stall the server mid-benchmark.
            threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()
            echo_port = int(echo.stdout.readline())
            tls = TlsClientConfig(ca_file=str(home / "tls/ca.crt"))
            settings = ConnectionSettings(f"wss://127.0.0.1:{port}/", tls, token, timeout=60)
            context = tls.ssl_context()

            async def registry_client():
                return await WsClient.connect(settings)

            async def echo_client():
                return await connect(f"wss://localhost:{echo_port}/", ssl=context, max_size=2**20)

            request = json.dumps(
                {"id": "1", "type": "request", "action": "register_service", "params": {"service": ENTRY}}
            )

            async def echo_once(client, index, sequence):
                await client.send(request)
                await client.recv()

            async def register(client, index, sequence):
                entry = dict(ENTRY, service_name=f"bench-{index}-{sequence % 500}")
                await client.register_service(entry)

            async def get(client, index, sequence):
                await client.get_service("bench-0-0")

            for concurrency in (1, 8, 64):
                echo_rate, _ = await run_clients(concurrency, options.seconds, echo_client, echo_once)
                write_rate, write_latency = await run_clients(concurrency, options.seconds, registry_client, register)
                read_rate, _ = await run_clients(concurrency, options.seconds, registry_client, get)
                results[f"echo_roundtrips_per_s_c{concurrency}"] = echo_rate
                results[f"register_per_s_c{concurrency}"] = write_rate
                results[f"register_p50_ms_c{concurrency}"] = percentile(write_latency, 0.5) * 1e3
                results[f"register_p99_ms_c{concurrency}"] = percentile(write_latency, 0.99) * 1e3
                results[f"get_service_per_s_c{concurrency}"] = read_rate
                results[f"register_vs_echo_c{concurrency}"] = write_rate / echo_rate
                results[f"get_vs_echo_c{concurrency}"] = read_rate / echo_rate

            # Memory per idle connection, then fan-out to the same connections.
            baseline = rss_kib(server.pid)
            subscribers = []
            for _ in range(options.subscribers):
                subscribers.append(await WsClient.connect(settings))
            await asyncio.sleep(1)
            results["rss_kib_per_idle_connection"] = (rss_kib(server.pid) - baseline) / options.subscribers
            for client in subscribers:
                await client.subscribe(["ServiceUpdated", "ServiceRegistered"], filter={"service_name": "fanout"})
            writer = await WsClient.connect(settings)
            delays = []
            for round_number in range(options.fanout_rounds):
                began = time.perf_counter()
                await writer.register_service(dict(ENTRY, service_name="fanout", tags=[str(round_number)]))
                await asyncio.gather(*(client.next_event(timeout=30) for client in subscribers))
                delays.append(time.perf_counter() - began)
            results["fanout_subscribers"] = options.subscribers
            results["fanout_p50_ms"] = statistics.median(delays) * 1e3
            results["fanout_p99_ms"] = percentile(delays, 0.99) * 1e3
            await writer.close()
            for client in subscribers:
                await client.close()
        finally:
            server.terminate()
            echo.terminate()
            server.wait(timeout=30)
            echo.wait(timeout=30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--fanout-rounds", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    results = asyncio.run(bench(options))
    if options.json:
        print(json.dumps(results, indent=2))
        return
    for key, value in results.items():
        print(f"{key:34s} {value:14,.2f}")


if __name__ == "__main__":
    main()
