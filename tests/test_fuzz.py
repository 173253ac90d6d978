"""Fuzzing the request decoder and every action's params through a real server (loopback TLS): whatever
a client sends, the answer is a documented error or a result — never ``internal``, never a crash, never a
broken connection. The slow tier sends 10,000 frames (issue 12)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from registry.auth import Role, TokenRegistry
from registry.exceptions import RegistryError
from registry.protocol import ACTIONS, decode_request

from .test_server import Running, start, write_pki

# --- values -----------------------------------------------------------------------------------

_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # surrogates and NUL included
_WORDS = st.sampled_from(
    ["", "a", "api", "h1", "local", "lan", "wireguard", "running", "stopped", "production", "192.168.1.5",
     "10.9.9.1", "::1", "http", "x" * 300, "sub-1", "job-1", "../registry.db", "hello-1.0.0.tar.gz"]
)  # fmt: skip
_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -1, 1, 2**63, 2**64, 10**30, 0.5, 1e308]),
)
_SCALARS = st.one_of(st.none(), st.booleans(), _NUMBERS, _TEXT, _WORDS)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(_WORDS, _TEXT), inner, max_size=4)),
    max_leaves=12,
)


def _fields(action: str) -> list[str]:
    params = ACTIONS[action].params
    return list(getattr(params, "__struct_fields__", ()))


SERVICE_FIELDS = ["service_name", "host_id", "location", "network_info", "state", "endpoints", "metadata", "tags",
                  "ttl_seconds", "deregister_after_seconds", "version", "network"]  # fmt: skip


@st.composite
def _service(draw: st.DrawFn) -> dict[str, Any]:
    service: dict[str, Any] = {
        "service_name": draw(st.one_of(_WORDS, _TEXT)),
        "host_id": draw(st.one_of(_WORDS, _TEXT)),
        "location": draw(st.one_of(st.sampled_from(["local", "lan", "wireguard"]), _VALUES)),
        "network_info": draw(st.one_of(st.fixed_dictionaries({"ip": st.one_of(_WORDS, _VALUES)}), _VALUES)),
    }
    for key in draw(st.lists(st.sampled_from(SERVICE_FIELDS), max_size=4)):
        service[key] = draw(_VALUES)
    if draw(st.booleans()):
        service["endpoints"] = draw(
            st.lists(st.fixed_dictionaries({"protocol": _VALUES, "port": st.one_of(_NUMBERS, _VALUES)}), max_size=2)
        )
    return service


@st.composite
def _request(draw: st.DrawFn, request_id: str) -> dict[str, Any]:
    action = draw(st.one_of(st.sampled_from(sorted(ACTIONS)), _TEXT))
    fields = _fields(action) if action in ACTIONS else []
    params: dict[str, Any] = {}
    for key in draw(st.lists(st.one_of(st.sampled_from(fields or ["x"]), _TEXT), max_size=4)):
        params[key] = draw(_service() if key == "service" else _VALUES)
    request: dict[str, Any] = {"id": request_id, "type": "request", "action": action, "params": params}
    if draw(st.integers(0, 9)) == 0:  # now and then a broken envelope
        request[draw(st.sampled_from(["type", "params", "extra"]))] = draw(_VALUES)
    return request


# --- the decoder alone --------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.one_of(_request("f"), _VALUES).map(lambda value: json.dumps(value)) | _TEXT | st.binary(max_size=60))
def test_decode_request_raises_only_registry_errors(frame: str | bytes) -> None:
    try:
        decode_request(frame)
    except RegistryError as error:
        assert error.code != "internal"
        assert error.message


# --- through a server -------------------------------------------------------------------------


class _ServerThread:
    """A real server on its own event loop thread, so that hypothesis can drive it from a plain test."""

    def __init__(self, directory: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        tokens = TokenRegistry([])
        plain = {role.label: tokens.add(role.label, role)[1] for role in Role}
        pki = write_pki(directory, trustme.CA())
        self.running: Running = self._run(start(directory, pki, (tokens, plain)))

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def connect(self) -> ClientConnection:
        running = self.running
        headers = {"Authorization": f"Bearer {running.tokens['admin']}"}
        return connect(running.url, ssl=running.pki.client_tls().ssl_context(), additional_headers=headers)

    def internal_errors(self) -> float:
        metrics = self.running.server.metrics.render().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if 'result="internal"' in line)

    def close(self) -> None:
        self._run(self.running.server.close())
        self.running.registry.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_ServerThread]:
    server = _ServerThread(tmp_path_factory.mktemp("fuzz"))
    yield server
    server.close()


def _send_batch(server: _ServerThread, frames: list[str]) -> None:
    """Send ``frames`` pipelined on one connection; every one gets an answer, none ``internal``."""
    with server.connect() as connection:
        for frame in frames:
            connection.send(frame)
        answers: dict[str | None, dict[str, Any]] = {}
        unanswered = len(frames)
        while unanswered:
            message = json.loads(connection.recv(timeout=20))
            if message.get("type") in ("event", "job"):
                continue
            if message.get("type") == "error" and message.get("id") is None and "subscription" in json.dumps(message):
                continue  # a lagged subscription's notice, not an answer
            answers[message.get("id")] = message
            unanswered -= 1
            assert message.get("error", {}).get("code") != "internal", message
        connection.send(json.dumps({"id": "last", "type": "request", "action": "ping"}))
        while (message := json.loads(connection.recv(timeout=20))).get("id") != "last":
            pass
        assert message["result"]["pong"] is True  # the connection still works
    assert server.internal_errors() == 0


def _batches(size: int) -> st.SearchStrategy[list[str]]:
    return st.tuples(*(_request(f"f{number}") for number in range(size))).map(
        lambda requests: [json.dumps(request) for request in requests]
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(frames=_batches(40))
def test_fuzzed_frames_never_end_in_internal(server: _ServerThread, frames: list[str]) -> None:
    _send_batch(server, frames)


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=_batches(40))
def test_ten_thousand_fuzzed_frames_never_end_in_internal(server: _ServerThread, frames: list[str]) -> None:
    _send_batch(server, frames)
