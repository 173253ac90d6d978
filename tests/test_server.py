"""The WebSocket server over real TLS on loopback, with the real store. No transport mocks."""

from __future__ import annotations

import asyncio
import datetime
import json
import secrets
import socket
import sqlite3
import ssl
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from registry import (
    Compacted,
    Conflict,
    EventType,
    Forbidden,
    NetworkConfig,
    NetworkManager,
    PoolExhausted,
    RateLimited,
    Registry,
    ServiceNotFound,
    StoreError,
    Unauthorized,
    ValidationError,
)
from registry.auth import Role, TokenRegistry
from registry.client import BlockingClient, ConnectionSettings, TrioClient, WsClient
from registry.config import Limits
from registry.exceptions import ConnectionFailed, InternalError
from registry.model import Allocation, Location
from registry.network import DetectedNetwork, Topology
from registry.server import WsServer
from registry.tls import TlsClientConfig, TlsServerConfig

from .helpers import make_entry

NETWORKS = {
    "networks": {
        "local": {"type": "local", "subnet": "127.0.0.0/8"},
        # make_entry()'s address is a node's: instances use it, nobody holds it (tests/test_addresses.py)
        "production": {"type": "lan", "subnet": "192.168.1.0/24", "nodes": [{"host": "192.168.1.100", "name": "n1"}]},
        "tiny": {"type": "lan", "subnet": "10.9.9.0/30"},
    }
}


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    server: TlsServerConfig

    def client_tls(self) -> TlsClientConfig:
        return TlsClientConfig(ca_file=str(self.ca_file))


def write_pki(directory: Path, ca: trustme.CA, **cert_options: object) -> Pki:
    leaf = ca.issue_cert("localhost", "127.0.0.1", **cert_options)
    cert, key, ca_file = directory / "server.crt", directory / "server.key", directory / "ca.crt"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, ca_file, TlsServerConfig.from_files(cert, key))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return write_pki(tmp_path, trustme.CA())


@pytest.fixture
def tokens() -> tuple[TokenRegistry, dict[str, str]]:
    registry = TokenRegistry([])
    plain = {role.label: registry.add(role.label, role)[1] for role in Role}
    return registry, plain


@dataclass
class Running:
    server: WsServer
    registry: Registry
    pki: Pki
    tokens: dict[str, str]

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.server.port}/"

    def settings(self, role: str | None = "admin", **options: object) -> ConnectionSettings:
        token = self.tokens[role] if role else None
        return ConnectionSettings(self.url, self.pki.client_tls(), token, **options)

    async def client(self, role: str | None = "admin") -> WsClient:
        return await WsClient.connect(self.settings(role))


async def start(tmp_path: Path, pki: Pki, tokens: tuple[TokenRegistry, dict[str, str]], **options: object) -> Running:
    config = NetworkConfig.from_dict(NETWORKS)
    registry = Registry.with_persistence(tmp_path / "registry.db", networks=config, **options.pop("registry", {}))
    server = await WsServer.new_tls(
        ("127.0.0.1", 0),
        registry,
        pki.server,
        tokens=tokens[0],
        networks=NetworkManager(config, store=registry.store),
        **options,
    )
    return Running(server, registry, pki, tokens[1])


@pytest.fixture
async def running(tmp_path: Path, pki: Pki, tokens) -> AsyncIterator[Running]:
    running = await start(tmp_path, pki, tokens)
    yield running
    await running.server.close()
    running.registry.close()


# --- authentication and roles ----------------------------------------------------------------


async def test_ping_needs_no_auth_but_reads_do(running: Running) -> None:
    async with await running.client(role=None) as client:
        assert (await client.ping())["pong"] is True
        with pytest.raises(Unauthorized, match="needs authentication"):
            await client.list_services()
        assert await client.authenticate(running.tokens["read"]) == {"name": "read", "role": "read"}
        assert await client.list_services() == []


async def test_wrong_token_at_the_handshake_is_refused(running: Running) -> None:
    settings = ConnectionSettings(running.url, running.pki.client_tls(), "svcreg_wrong")
    with pytest.raises(Unauthorized, match="401"):  # a refused token is not a network problem
        await WsClient.connect(settings)
    with pytest.raises(Unauthorized, match="401"):
        await asyncio.to_thread(BlockingClient, settings)  # off the loop that runs the server
    async with await running.client(role=None) as client:
        with pytest.raises(Unauthorized, match="invalid token"):
            await client.authenticate("svcreg_wrong")


async def test_roles(running: Running) -> None:
    async with await running.client("read") as reader:
        with pytest.raises(Forbidden, match="needs the write role"):
            await reader.register_service(make_entry())
    async with await running.client("write") as writer:
        await writer.register_service(make_entry())
        with pytest.raises(Forbidden, match="needs the admin role"):
            await writer._call("deploy_package", {"package": "x.tar.gz"})
    async with await running.client("admin") as admin:
        with pytest.raises(ValidationError, match="does not deploy packages"):
            await admin._call("deploy_package", {"package": "x.tar.gz"})


async def test_unauthenticated_connection_is_closed_after_the_timeout(tmp_path: Path, pki: Pki, tokens) -> None:
    running = await start(tmp_path, pki, tokens, limits=Limits(handshake_timeout=0.3))
    try:
        async with connect(running.url, ssl=pki.client_tls().ssl_context()) as raw:
            await asyncio.wait_for(raw.wait_closed(), 5)
            assert raw.close_code == 1008
    finally:
        await running.server.close()
        running.registry.close()


# --- every action ------------------------------------------------------------------------------


async def test_every_action(running: Running) -> None:
    async with await running.client("admin") as client:
        stored = await client.register_service(make_entry(ttl_seconds=30))
        assert stored.mod_revision == 1 and stored.network_info.network == "production"
        assert (await client.get_service("api-server")).host_id == "prod-host-1"
        assert [e.service_name for e in await client.list_services(location="lan")] == ["api-server"]
        assert [r.address for r in await client.list_endpoints()] == ["192.168.1.100:8080"]
        assert (await client.set_state("api-server", "stopped")).state.value == "stopped"
        assert (await client.heartbeat("api-server")).service_name == "api-server"
        allocation = await client.allocate_ip("web-1", "production")
        assert allocation == Allocation("web-1", "production", "192.168.1.2", 24) and str(allocation) == "192.168.1.2"
        assert dict(allocation) == {"owner": "web-1", "network": "production", "ip": "192.168.1.2", "prefixlen": 24}
        assert await client.allocate_ip("web-1", "production") == allocation
        # an instance without an address gets one, owned by the instance
        web = await client.register_service(
            {"service_name": "web", "host_id": "h2", "network_info": {"network": "production"}}
        )
        instance = Allocation("web@h2", "production", "192.168.1.3", 24)
        assert (web.location, web.network_info.ip) == (Location.LAN, "192.168.1.3")
        assert await client.list_allocations() == [allocation, instance]
        assert await client.release_ip("web-1") == [allocation]
        assert (await client.allocate_ip("vip", "production", ip="192.168.1.9")).ip == "192.168.1.9"
        networks = await client.list_networks()
        assert [n.name for n in networks] == ["local", "production", "tiny"] and networks[1].type is Location.LAN
        topology = await client.get_topology()
        assert isinstance(topology, Topology) and topology.revision == running.registry.revision
        subscription = await client.subscribe(["ServiceRemoved", "IpReleased"])
        removed = await client.remove_service("web", "h2")
        event = await client.next_event(timeout=5)
        assert event.type is EventType.SERVICE_REMOVED and event.revision == running.registry.revision - 1
        assert event.subscription == subscription and event.service == removed
        released = await client.next_event(timeout=5)
        assert released.type is EventType.IP_RELEASED and released.allocation == instance
        assert released.revision == event.revision + 1 and released.data["reason"] == "removed"
        with pytest.raises(TimeoutError):
            await client.next_event(timeout=0.05)
        await client.unsubscribe(subscription)


async def test_error_codes(tmp_path: Path, pki: Pki, tokens) -> None:
    running = await start(tmp_path, pki, tokens, registry={"event_retention": 5})
    try:
        async with await running.client() as client:
            with pytest.raises(ServiceNotFound, match="'ghost' is not registered"):
                await client.get_service("ghost")
            with pytest.raises(
                ValidationError, match="location: must be one of local, lan, wireguard, got 'moon'"
            ) as caught:
                await client.register_service(make_entry().to_dict() | {"location": "moon"})
            assert caught.value.field == "params.service.location"
            with pytest.raises(ValidationError, match="in the lan network 'production'"):
                await client.register_service(make_entry(ip="192.168.1.7", location="wireguard"))
            await client.allocate_ip("a", "tiny")
            with pytest.raises(PoolExhausted):
                await client.allocate_ip("b", "tiny")
            for number in range(10):
                await client.register_service(make_entry(f"svc-{number}"))
            with pytest.raises(Compacted) as compacted:
                await client.subscribe(since_revision=1)
            assert compacted.value.oldest_revision == running.registry.revision - 4
            for _ in range(16):
                await client.subscribe()
            with pytest.raises(RateLimited, match="too many subscriptions"):
                await client.subscribe()
    finally:
        await running.server.close()
        running.registry.close()


async def test_oversize_message_closes_with_1009_and_server_lives(tmp_path: Path, pki: Pki, tokens) -> None:
    running = await start(tmp_path, pki, tokens, limits=Limits(max_message_size=4096))
    try:
        headers = {"Authorization": f"Bearer {running.tokens['admin']}"}
        async with connect(running.url, ssl=pki.client_tls().ssl_context(), additional_headers=headers) as raw:
            await raw.send(json.dumps({"id": "1", "type": "request", "action": "ping", "params": {"x": "y" * 10000}}))
            await asyncio.wait_for(raw.wait_closed(), 5)
            assert raw.close_code == 1009
        async with await running.client() as client:
            assert (await client.ping())["pong"]
    finally:
        await running.server.close()
        running.registry.close()


async def test_a_thousand_malformed_frames_leave_the_server_healthy(running: Running) -> None:
    headers = {"Authorization": f"Bearer {running.tokens['read']}"}
    async with connect(running.url, ssl=running.pki.client_tls().ssl_context(), additional_headers=headers) as raw:
        garbage = ["{", "[]", "null", '{"id": 1}', '{"id": "x", "type": "request", "action": "nope"}', "\x00" * 10]
        for number in range(1000):
            await raw.send(garbage[number % len(garbage)])
        answers = [json.loads(await asyncio.wait_for(raw.recv(), 10)) for _ in range(1000)]
        assert all(answer["type"] == "error" for answer in answers)
        assert {answer["error"]["code"] for answer in answers} == {"bad_request", "unknown_action"}
        await raw.send(json.dumps({"id": "ok", "type": "request", "action": "ping"}))
        assert json.loads(await raw.recv())["result"]["pong"] is True
    async with await running.client() as client:
        assert (await client.ping())["pong"]


def _entry_with_port_zero() -> dict[str, object]:
    service = make_entry().to_dict()
    for bookkeeping in ("create_revision", "mod_revision", "updated_at"):
        service.pop(bookkeeping, None)
    return service | {"endpoints": [{"name": "http", "port": 0}]}


@pytest.mark.parametrize(
    ("action", "params", "field"),
    [
        ("subscribe", {"since_revision": 10**400}, "params.since_revision"),
        ("subscribe", {"filter": {"location": "mars"}}, "params.filter.location"),
        ("list_services", {"location": "mars"}, "params.location"),
        ("register_service", {"service": _entry_with_port_zero()}, "params.service.endpoints"),
        ("register_service", {"service": {"service_name": 5}}, "params.service"),
        ("deploy_package", {"package": "p", "targets": [{"host": "h", "ssh_user": 5}]}, "params.targets[0].ssh_user"),
        ("deploy_package", {"package": "p", "target": {"host": "h", "install_base": 5}}, "params.target.install_base"),
    ],
)
async def test_bad_params_are_a_bad_request_naming_the_field(
    running: Running, action: str, params: dict[str, object], field: str
) -> None:
    headers = {"Authorization": f"Bearer {running.tokens['admin']}"}
    async with connect(running.url, ssl=running.pki.client_tls().ssl_context(), additional_headers=headers) as raw:
        await raw.send(json.dumps({"id": "r1", "type": "request", "action": action, "params": params}))
        answer = json.loads(await asyncio.wait_for(raw.recv(), 10))
    assert answer["id"] == "r1" and answer["error"]["code"] == "bad_request"
    named = answer["error"]["details"]["field"]
    assert named.startswith(field) and answer["error"]["message"].startswith(f"{named}: ")


async def test_pipelined_requests_are_answered_by_id(running: Running) -> None:
    async with await running.client() as client:
        results = await asyncio.gather(*(client.register_service(make_entry(f"svc-{n}")) for n in range(50)))
        assert sorted(entry.mod_revision for entry in results) == list(range(1, 51))


# --- TLS is required ---------------------------------------------------------------------------


async def test_plaintext_gets_nothing_usable_and_the_server_keeps_serving(running: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(1024), 5)
    writer.close()
    assert b"HTTP/1.1" not in answer
    with pytest.raises(Exception):  # noqa: B017 - any failure will do; what matters is no session
        async with connect(f"ws://127.0.0.1:{running.server.port}/", open_timeout=5):
            pass
    async with await running.client() as client:
        assert (await client.ping())["pong"]


async def test_wrong_ca_is_refused(running: Running, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other))
    settings = ConnectionSettings(running.url, TlsClientConfig(ca_file=str(other)), running.tokens["admin"])
    with pytest.raises(ConnectionFailed, match=r"(?i)certificate"):
        await WsClient.connect(settings)


async def test_expired_server_certificate_is_refused(tmp_path: Path, tokens) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    pki = write_pki(tmp_path, trustme.CA(), not_before=past - datetime.timedelta(days=1), not_after=past)
    running = await start(tmp_path, pki, tokens)
    try:
        with pytest.raises(ConnectionFailed, match=r"(?i)expired"):
            await running.client()
    finally:
        await running.server.close()
        running.registry.close()


async def test_tls_1_1_is_refused(running: Running) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(running.pki.ca_file)
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point of this test
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", running.server.port), timeout=5) as raw, pytest.raises(ssl.SSLError):
        context.wrap_socket(raw, server_hostname="localhost")


# --- subscriptions over the wire -------------------------------------------------------------------


async def test_slow_subscriber_is_dropped_fast_one_keeps_receiving(tmp_path: Path, pki: Pki, tokens) -> None:
    running = await start(tmp_path, pki, tokens, limits=Limits(send_queue=20))
    try:
        headers = {"Authorization": f"Bearer {running.tokens['read']}"}
        # max_queue=1: the slow client stops reading from its socket after one frame.
        slow = await connect(running.url, ssl=pki.client_tls().ssl_context(), additional_headers=headers, max_queue=1)
        await slow.send(json.dumps({"id": "s", "type": "request", "action": "subscribe"}))
        # Each event carries ~256 KiB of incompressible metadata, so 60 of them (15 MiB) overflow the kernel's
        # socket buffers (up to 4 MiB), the TLS buffers and the 20-frame send queue. (Compressible padding
        # would shrink to a few bytes under permessage-deflate and never fill anything.)
        count = 60
        async with await running.client("read") as fast:
            await fast.subscribe()
            async with await running.client("write") as writer:
                for number in range(count):
                    metadata = {f"pad{key}": secrets.token_urlsafe(3000) for key in range(64)}
                    await writer.register_service(make_entry(f"svc-{number}", metadata=metadata))
            got = [(await fast.next_event(timeout=10)).revision for _ in range(count)]
            assert got == list(range(1, count + 1))
        # The slow one was closed with a reason, not waited for. Its close frame is queued behind the frames
        # it has not read, so it sees the reason once it reads what was already sent.
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    await slow.recv()
        assert slow.close_code == 1013
        assert "slow reader" in slow.close_reason
    finally:
        await running.server.close()
        running.registry.close()


async def test_resume_after_a_dropped_connection_delivers_missed_events_once(running: Running) -> None:
    seen: list[int] = []

    async def watch() -> None:
        async for event in WsClient.watch(running.settings("read"), retry_delay=0.05):
            seen.append(event.revision)
            if len(seen) == 30:
                return

    watcher = asyncio.create_task(watch())
    async with await running.client("write") as writer:
        for number in range(10):
            await writer.register_service(make_entry(f"a-{number}"))
        while len(seen) < 10:
            await asyncio.sleep(0.01)
        for connection in list(running.server._sessions):  # drop every connection, as a network blip would
            if connection.subscriptions:
                await connection.connection.close(1012, "restart")
        for number in range(20):
            await writer.register_service(make_entry(f"b-{number}"))
    await asyncio.wait_for(watcher, 20)
    assert seen == list(range(1, 31))


async def test_health_and_metrics_over_tls(running: Running) -> None:
    async with await running.client() as client:
        await client.register_service(make_entry())
    context = running.pki.client_tls().ssl_context()

    async def get(path: str) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", running.server.port, ssl=context, server_hostname="localhost"
        )
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        head, _, body = data.decode().partition("\r\n\r\n")
        return int(head.split()[1]), body

    assert await get("/healthz") == (200, "ok\n")
    status, body = await get("/metrics")
    assert status == 200
    assert 'svcreg_services{state="running"} 1.0' in body
    assert 'svcreg_requests_total{action="register_service",result="ok"} 1.0' in body
    assert "svcreg_store_commit_seconds_count" in body
    assert "svcreg_connections" in body


# --- the other client flavours ---------------------------------------------------------------------


async def test_blocking_client(running: Running) -> None:
    def blocking() -> None:
        with BlockingClient(running.settings("write")) as client:
            subscription = client.subscribe(["ServiceRegistered"])
            stored = client.register_service(make_entry())
            event = client.next_event(timeout=5)
            assert event.revision == stored.mod_revision and event.subscription == subscription
            assert event.service == stored
            with pytest.raises(TimeoutError):
                client.next_event(timeout=0.1)
            client.unsubscribe(subscription)
            with pytest.raises(ServiceNotFound):
                client.get_service("ghost")

    await asyncio.to_thread(blocking)


async def test_trio_client(running: Running) -> None:
    async def scenario() -> list[int]:
        async with TrioClient(running.settings("write")) as client:
            await client.subscribe()
            for number in range(3):
                await client.register_service(make_entry(f"svc-{number}"))
            with trio.fail_after(5):
                revisions = [(await client.next_event()).revision for _ in range(3)]
            with pytest.raises(TimeoutError):
                await client.next_event(timeout=0.05)
            return revisions

    assert await asyncio.to_thread(trio.run, scenario) == [1, 2, 3]


async def test_address_events_reach_every_client_typed_and_as_visibility_allows(running: Running) -> None:
    """IpAllocated/IpReleased over the wire: typed on all three clients, seen by whoever sees the network."""

    async def trio_events(count: int) -> list[tuple[str, str | None, str]]:
        async with TrioClient(running.settings("read")) as client:
            subscription = await client.subscribe(["IpAllocated", "IpReleased"], since_revision=0)
            with trio.fail_after(5):
                events = [await client.next_event() for _ in range(count)]
            return [
                (e.type.value, e.subscription == subscription and e.allocation.owner, e.allocation.ip) for e in events
            ]  # type: ignore[union-attr]

    def blocking_events(count: int) -> list[tuple[str, str]]:
        with BlockingClient(running.settings("read")) as client:
            client.subscribe(["IpAllocated", "IpReleased"], since_revision=0)
            return [(e.type.value, str(e.allocation)) for e in (client.next_event(timeout=5) for _ in range(count))]

    async with await running.client("write") as writer:
        entry = await writer.register_service(
            {"service_name": "web", "host_id": "h1", "network_info": {"network": "production"}}
        )
        with pytest.raises(Conflict, match="allocated to 'web@h1'") as caught:
            await writer.register_service(make_entry("api", "h2", ip=entry.network_info.ip))
        assert caught.value.code == "conflict"
        await writer.remove_service("web", "h1")
    expected = [("IpAllocated", "web@h1", "192.168.1.2"), ("IpReleased", "web@h1", "192.168.1.2")]
    assert await asyncio.to_thread(trio.run, trio_events, 2) == expected
    assert await asyncio.to_thread(blocking_events, 2) == [
        ("IpAllocated", "192.168.1.2"),
        ("IpReleased", "192.168.1.2"),
    ]
    # a reader in no configured network sees no address events of a network (as it sees no instances there)
    from registry.access import visibility_for

    outsider = visibility_for(
        "198.51.100.7", Role.READ, running.registry.networks, registry_host="r", hosts_with_address=lambda ip: ()
    )
    replay = running.registry.subscribe(["IpAllocated"], since_revision=0)
    event = replay.get(timeout=1)
    assert event is not None and not outsider.allows_event(event)
    assert visibility_for(
        "192.168.1.77", Role.READ, running.registry.networks, registry_host="r", hosts_with_address=lambda ip: ()
    ).allows_event(event)


async def test_every_client_flavour_fails_to_connect_the_same_way(running: Running) -> None:
    async def trio_connect(settings: ConnectionSettings) -> None:
        async with TrioClient(settings):
            pass

    def attempts(settings: ConnectionSettings) -> list[Any]:
        return [
            WsClient.connect(settings),
            asyncio.to_thread(BlockingClient, settings),  # off the loop that runs the server
            asyncio.to_thread(trio.run, trio_connect, settings),
        ]

    for attempt in attempts(ConnectionSettings(running.url, running.pki.client_tls(), "svcreg_wrong")):
        with pytest.raises(Unauthorized, match="refused the connection: HTTP 401"):
            await attempt
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"wss://127.0.0.1:{unused.getsockname()[1]}/"
    for attempt in attempts(ConnectionSettings(nobody, running.pki.client_tls(), timeout=2)):
        with pytest.raises(ConnectionFailed, match=f"cannot connect to {nobody}"):
            await attempt


# --- topology re-detection -----------------------------------------------------------------------------


class ScriptedNetworks(NetworkManager):
    """A NetworkManager whose detection returns scripted topologies (or raises), one per call."""

    def __init__(self, config: NetworkConfig, store: object, script: list[Topology | Exception]) -> None:
        super().__init__(config, store=store)
        self.script = script
        self.calls = 0

    def detect(self, *, netns: str | None = None) -> Topology:
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if isinstance(step, Exception):
            raise step
        return step


def _topology(*addresses: str) -> Topology:
    return Topology(
        tuple(DetectedNetwork("eth0", Location.LAN, f"{a}/24", "192.168.1.0/24", "production") for a in addresses)
    )


async def test_topology_is_detected_at_start_and_changes_emit_events(
    tmp_path: Path, pki: Pki, tokens, caplog: pytest.LogCaptureFixture
) -> None:
    config = NetworkConfig.from_dict(NETWORKS)
    registry = Registry.with_persistence(tmp_path / "registry.db", networks=config)
    first, second = _topology("192.168.1.10"), _topology("192.168.1.10", "192.168.1.11")
    script: list[Topology | Exception] = [
        first,
        first,
        InternalError("ip is not installed"),
        InternalError("ip is not installed"),
        OSError("boom"),
        second,
    ]
    networks = ScriptedNetworks(config, registry.store, script)
    events = registry.subscribe([EventType.NETWORK_TOPOLOGY_CHANGED])
    server = await WsServer.new_tls(
        ("127.0.0.1", 0), registry, pki.server, tokens=tokens[0], networks=networks, topology_interval=0.01
    )
    try:
        # Detected before the server listens: the first event is already there.
        assert registry.topology() == first.to_dict()
        changed = await asyncio.wait_for(events.next_event(), 5)
        assert changed.data["topology"] == first.to_dict() and changed.data["previous"] is None
        # An unchanged topology emits nothing; failures are warnings; the next change is one event.
        changed = await asyncio.wait_for(events.next_event(), 5)
        assert changed.data["topology"] == second.to_dict() and changed.data["previous"] == first.to_dict()
        assert networks.calls >= 6
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "topology" in r.message]
        assert warnings == [  # a repeated failure is logged once, at warning level
            "topology detection failed (keeping the last topology): ip is not installed",
            "topology detection failed (keeping the last topology): OSError: boom",
            "topology detection works again",
        ]
        async with await WsClient.connect(
            ConnectionSettings(f"wss://127.0.0.1:{server.port}/", pki.client_tls(), tokens[1]["read"])
        ) as client:
            assert await client.get_topology() == second
        assert registry.revision == 2  # two changes, two events: repeats and failures wrote nothing
    finally:
        await server.close()
        registry.close()


def test_topology_interval_must_be_positive(tmp_path: Path, pki: Pki, tokens) -> None:
    with Registry() as registry, pytest.raises(ValidationError, match="topology_interval"):
        WsServer(registry, pki.server, tokens=tokens[0], topology_interval=0)


async def test_an_unreadable_frame_fails_the_calls_at_once(pki: Pki) -> None:
    """A server that answers garbage: the client closes the connection instead of hanging."""
    from websockets.asyncio.server import serve

    async def rogue(connection) -> None:  # answers every request with something that is not JSON
        async for _ in connection:
            await connection.send("this is not json")

    async with serve(rogue, "127.0.0.1", 0, ssl=pki.server.ssl_context()) as rogue_server:
        port = rogue_server.sockets[0].getsockname()[1]
        settings = ConnectionSettings(f"wss://127.0.0.1:{port}/", pki.client_tls(), "svcreg_token", timeout=30)
        client = await WsClient.connect(settings)
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(ConnectionFailed):
                await client.ping()
            with pytest.raises(ConnectionFailed):
                await client.ping()  # the connection is closed now: no 30 s wait
            assert loop.time() - began < 5
        finally:
            await client.close()


@pytest.mark.parametrize("default_role", [None, Role.READ])
async def test_client_certificates_authenticate_with_the_role_of_their_name(
    tmp_path: Path, tokens, default_role: Role | None
) -> None:
    """mTLS: a certificate from the client CA is a login; its CN picks the role (a token entry's name).

    A CN that names no token entry signs in nobody, unless tls.client_default_role gives it a role."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    pki = write_pki(tmp_path, server_ca)
    client_ca_file = tmp_path / "client-ca.crt"
    client_ca.cert_pem.write_to_path(str(client_ca_file))
    server_tls = TlsServerConfig.from_files(pki.server.cert, pki.server.key, client_ca=client_ca_file)
    token_registry, _ = tokens
    token_registry.add("deploy-bot", Role.WRITE)
    running = await start(tmp_path, Pki(server_ca, pki.ca_file, server_tls), tokens, client_default_role=default_role)

    def certificate_client(name: str, ca: trustme.CA) -> ConnectionSettings:
        leaf = ca.issue_cert(f"{name}.example", common_name=name)
        cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        key.chmod(0o600)
        return ConnectionSettings(running.url, TlsClientConfig(ca_file=str(pki.ca_file), cert=str(cert), key=str(key)))

    try:
        async with await WsClient.connect(certificate_client("deploy-bot", client_ca)) as bot:
            registered = await bot.register_service(make_entry("api", "h1").to_dict())
            assert registered.service_name == "api"
        async with await WsClient.connect(certificate_client("stranger", client_ca)) as stranger:
            if default_role is None:
                with pytest.raises(Unauthorized, match="needs authentication"):
                    await stranger.list_services()
                assert (await stranger.ping())["pong"] is True
            else:
                assert [entry.service_name for entry in await stranger.list_services()] == ["api"]  # read role
                with pytest.raises(Forbidden, match="write"):
                    await stranger.remove_service("api", "h1")
        # a certificate from another CA does not get through the handshake
        with pytest.raises(ConnectionFailed):
            await WsClient.connect(certificate_client("deploy-bot", trustme.CA()))
    finally:
        await running.server.close()
        running.registry.close()


async def test_location_aware_listing_through_the_server(running: Running) -> None:
    """A read caller on the registry host sees only its own host's local services; admin sees all."""
    running.server.registry_host = "registry-host"
    async with await running.client("admin") as admin:
        for host in ("registry-host", "other-host"):
            await admin.register_service(make_entry("cache", host, ip="127.0.0.1", location=Location.LOCAL).to_dict())
        await admin.register_service(make_entry("api", "prod-1", ip="192.168.1.20").to_dict())
        assert sorted(e.host_id for e in await admin.list_services(service_name="cache")) == [
            "other-host",
            "registry-host",
        ]
    async with await running.client("read") as reader:
        assert sorted((e.service_name, e.host_id) for e in await reader.list_services()) == [
            ("api", "prod-1"),
            ("cache", "registry-host"),
        ]
        with pytest.raises(ServiceNotFound):  # invisible is reported exactly like missing
            await reader.get_service("cache", "other-host")


async def test_a_failed_commit_fails_the_writers_and_acknowledges_nothing(running: Running, tmp_path: Path) -> None:
    store = running.registry.store
    store._conn.execute("PRAGMA busy_timeout = 50")  # give up on the lock below quickly
    subscriber = await running.client()
    await subscriber.subscribe()
    writers = [await running.client("write") for _ in range(3)]
    try:
        with sqlite3.connect(tmp_path / "registry.db", isolation_level=None) as other:
            other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock: the commit fails
            outcomes = await asyncio.gather(
                *(writer.register_service(make_entry(f"svc-{n}", "h1").to_dict()) for n, writer in enumerate(writers)),
                return_exceptions=True,
            )
            other.execute("ROLLBACK")
        assert all(isinstance(outcome, StoreError) and "database is locked" in outcome.message for outcome in outcomes)
        with pytest.raises(StoreError):  # the store stays refused: the server does not pretend
            await writers[0].register_service(make_entry("later", "h1").to_dict())
        with pytest.raises(TimeoutError):  # no event for a write nobody got acknowledged
            await subscriber.next_event(timeout=0.3)
    finally:
        for client in (subscriber, *writers):
            await client.close()


async def test_concurrent_registrations_share_commits_and_fail_alone(running: Running) -> None:
    commits = []
    observer = running.registry.store.commit_observer
    running.registry.store.commit_observer = lambda seconds: (commits.append(seconds), observer and observer(seconds))
    clients = [await running.client("write") for _ in range(20)]
    try:
        entries = [make_entry(f"svc-{n}", "h1").to_dict() for n in range(20)]
        # an address in the lan network 'tiny' claimed as wireguard: the networks config refuses it
        entries[7]["network_info"] = {"ip": "10.9.9.2"}
        entries[7]["location"] = "wireguard"
        outcomes = await asyncio.gather(
            *(client.register_service(entry) for client, entry in zip(clients, entries, strict=True)),
            return_exceptions=True,
        )
    finally:
        for client in clients:
            await client.close()
    assert isinstance(outcomes[7], ValidationError) and "location" in outcomes[7].message
    stored = [outcome for number, outcome in enumerate(outcomes) if number != 7]
    assert sorted(entry.mod_revision for entry in stored) == list(range(1, 20))  # one revision each, no gaps
    assert len(running.registry.list_services()) == 19
    assert len(commits) < 19  # writes that arrived together were committed together
