"""The endpoint lookup's ordering and its errors, without a registry."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleLookupError

from ansible_collections.svcreg.registry.plugins.lookup.endpoint import endpoint_addresses
from registry.model import EndpointRecord, Location, ServiceState


def record(host: str, ip: str, port: int, location: str = "lan", name: str = "http", state: str = "running"):
    return EndpointRecord("api", host, name, "tcp", ip, port, Location(location), ServiceState(state))


def test_best_first_running_then_nearest_then_host() -> None:
    records = [
        record("b", "10.0.0.2", 80, "wireguard"),
        record("c", "192.168.1.3", 80),
        record("a", "192.168.1.2", 80),
        record("z", "127.0.0.1", 80, "local", state="stopped"),
    ]
    assert endpoint_addresses(records, "api", "http") == [
        "192.168.1.2:80",
        "192.168.1.3:80",
        "10.0.0.2:80",
        "127.0.0.1:80",
    ]


def test_ipv6_is_bracketed() -> None:
    assert endpoint_addresses([record("a", "fd00::2", 8080)], "api", "http") == ["[fd00::2]:8080"]


def test_only_the_named_endpoint() -> None:
    records = [record("a", "10.0.0.1", 80), record("a", "10.0.0.1", 9100, name="metrics")]
    assert endpoint_addresses(records, "api", "metrics") == ["10.0.0.1:9100"]


def test_several_endpoints_need_a_name() -> None:
    records = [record("a", "10.0.0.1", 80), record("a", "10.0.0.1", 9100, name="metrics")]
    with pytest.raises(AnsibleLookupError, match=r"several endpoints \(http, metrics\): pass endpoint=NAME"):
        endpoint_addresses(records, "api", None)
