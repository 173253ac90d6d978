"""Optional paging of list_services, list_endpoints and list_allocations (docs/protocol.md#paging), through
a real server on loopback TLS, and the clients that page through everything by default."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from websockets.asyncio.client import ClientConnection, connect

from registry.auth import Role, TokenRegistry
from registry.client import PAGE_SIZE, BlockingClient, TrioClient
from registry.exceptions import ValidationError
from registry.model import Endpoint, Location
from registry.paging import Page

from .helpers import make_entry
from .test_server import Running, start, write_pki


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    tokens = TokenRegistry([])
    plain = {role.label: tokens.add(role.label, role)[1] for role in Role}
    running = await start(tmp_path, write_pki(tmp_path, trustme.CA()), (tokens, plain))
    yield running
    await running.server.close()
    running.registry.close()


def _fill(running: Running, count: int, prefix: str = "svc") -> None:
    endpoints = (Endpoint("http", 8080), Endpoint("metrics", 9100))
    running.registry.add_or_update_many(
        make_entry(f"{prefix}-{number:05}", f"host-{number % 7}", endpoints=endpoints) for number in range(count)
    )


async def _raw(running: Running, role: str = "admin") -> ClientConnection:
    headers = {"Authorization": f"Bearer {running.tokens[role]}"}
    return await connect(running.url, ssl=running.pki.client_tls().ssl_context(), additional_headers=headers)


async def _ask(connection: ClientConnection, action: str, **params: Any) -> dict[str, Any]:
    await connection.send(json.dumps({"id": "p", "type": "request", "action": action, "params": params}))
    answer: dict[str, Any] = json.loads(await connection.recv())
    return answer


async def _walk(connection: ClientConnection, action: str, limit: int, **params: Any) -> list[list[Any]]:
    pages, cursor = [], None
    while True:
        answer = await _ask(connection, action, limit=limit, **({"cursor": cursor} if cursor else {}), **params)
        assert answer["type"] == "response", answer
        pages.append(answer["result"])
        cursor = answer.get("next_cursor")
        if cursor is None:
            return pages
        assert len(answer["result"]) == limit


def _key(action: str, item: dict[str, Any]) -> tuple[Any, ...]:
    if action == "list_endpoints":
        return item["service_name"], item["host_id"], item["endpoint"]
    if action == "list_allocations":
        return item["network"], item["ip"]
    return item["service_name"], item["host_id"]


@pytest.mark.parametrize("action", ["list_services", "list_endpoints", "list_allocations"])
async def test_pages_concatenate_to_the_whole_list(running: Running, action: str) -> None:
    _fill(running, 230)
    assert running.server.networks is not None
    for number in range(80):
        running.server.networks.allocate_ip(f"owner-{number}", "production")
    async with await _raw(running) as connection:
        whole = await _ask(connection, action)
        assert "next_cursor" not in whole  # without limit: everything, the seed's shape
        pages = await _walk(connection, action, 37)
    items = [item for page in pages for item in page]
    assert len(pages) > 1
    assert sorted(items, key=lambda item: _key(action, item)) == sorted(
        whole["result"], key=lambda item: _key(action, item)
    )
    assert len({_key(action, item) for item in items}) == len(items)


async def test_a_walk_while_writes_happen_returns_every_stable_entry_once(running: Running) -> None:
    _fill(running, 100)
    async with await _raw(running) as connection:
        first = await _ask(connection, "list_services", limit=40)
        seen = [(item["service_name"], item["host_id"]) for item in first["result"]]
        # before the cursor, after it, and a removal of one not yet seen
        _fill(running, 5, prefix="aaa")
        _fill(running, 5, prefix="zzz")
        running.registry.remove("svc-00090", "host-6")
        cursor = first["next_cursor"]
        while cursor:
            answer = await _ask(connection, "list_services", limit=40, cursor=cursor)
            seen += [(item["service_name"], item["host_id"]) for item in answer["result"]]
            cursor = answer.get("next_cursor")
    stable = {(f"svc-{number:05}", f"host-{number % 7}") for number in range(100)} - {("svc-00090", "host-6")}
    assert stable <= set(seen)
    assert len(seen) == len(set(seen))
    assert ("svc-00090", "host-6") not in seen
    assert {name for name, _ in seen if name.startswith("zzz")} == {f"zzz-{number:05}" for number in range(5)}
    assert not any(name.startswith("aaa") for name, _ in seen)  # they sort before the cursor


async def test_pages_never_show_what_a_caller_may_not_see(running: Running) -> None:
    running.server.registry_host = "registry-host"
    running.registry.add_or_update_many(
        make_entry(f"cache-{number}", host, ip="127.0.0.1", location=Location.LOCAL)
        for number in range(20)
        for host in ("registry-host", "other-host")
    )
    async with await _raw(running, "read") as connection:
        pages = await _walk(connection, "list_services", 3)
    hosts = {item["host_id"] for page in pages for item in page}
    assert hosts == {"registry-host"}
    assert sum(len(page) for page in pages) == 20


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "params.limit"),
        ({"limit": 10001}, "params.limit"),
        ({"limit": "x"}, "params.limit"),
        ({"limit": 5, "cursor": "not-a-cursor"}, "params.cursor"),
        ({"limit": 5, "cursor": base64.urlsafe_b64encode(b'["list_endpoints","a","b","c"]').decode()}, "params.cursor"),
        ({"limit": 5, "cursor": base64.urlsafe_b64encode(b'["list_services",1,2]').decode()}, "params.cursor"),
        ({"limit": 5, "cursor": ""}, "params.cursor"),
    ],
)
async def test_a_bad_limit_or_cursor_is_a_bad_request_naming_it(
    running: Running, params: dict[str, Any], field: str
) -> None:
    async with await _raw(running) as connection:
        answer = await _ask(connection, "list_services", **params)
    assert answer["error"]["code"] == "bad_request"
    assert answer["error"]["details"]["field"] == field


async def test_the_asyncio_client_pages_through_by_default_and_gives_pages_on_request(running: Running) -> None:
    count = 2 * PAGE_SIZE + 100
    _fill(running, count)
    async with await running.client("read") as client:
        entries = await client.list_services()
        assert len(entries) == count
        assert len({entry.key for entry in entries}) == count
        assert len(await client.list_endpoints(host_id="host-1")) == 2 * len(
            [entry for entry in entries if entry.host_id == "host-1"]
        )
        page = await client.list_services(limit=10)
        assert isinstance(page, Page)
        assert len(page.items) == 10
        assert page.next_cursor is not None
        rest = await client.list_services(cursor=page.next_cursor)
        assert rest.next_cursor is None
        assert len(rest.items) == count - 10
        with pytest.raises(ValidationError, match=r"params\.cursor"):
            await client.list_services(limit=5, cursor="bogus")


async def test_the_blocking_and_trio_clients_page_through(running: Running) -> None:
    count = PAGE_SIZE + 50
    _fill(running, count)

    def blocking() -> int:
        with BlockingClient(running.settings("read")) as client:
            return len(client.list_services())

    async def with_trio() -> int:
        async with TrioClient(running.settings("read")) as client:
            return len(await client.list_services(location="lan"))

    assert await asyncio.to_thread(blocking) == count
    assert await asyncio.to_thread(trio.run, with_trio) == count
