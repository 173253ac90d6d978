"""Location-aware discovery: who sees which instances (the rule in registry/access.py)."""

from __future__ import annotations

import pytest

from registry import Location, NetworkConfig, ServiceEntry
from registry.access import visibility_for
from registry.auth import Role

from .helpers import make_entry

NETWORKS = NetworkConfig.from_dict(
    {
        "networks": {
            "local": {"type": "local", "subnet": "127.0.0.0/8"},
            "office": {"type": "lan", "subnet": "192.168.1.0/24", "nodes": [{"host": "192.168.1.100", "name": "db-1"}]},
            "lab": {"type": "lan", "subnet": "192.168.2.0/24"},
            "mesh": {"type": "wireguard", "subnet": "10.0.0.0/24"},
        }
    }
)

ENTRIES = [
    make_entry("office-api", "api-1", ip="192.168.1.10"),
    make_entry("lab-api", "lab-1", ip="192.168.2.10"),
    make_entry("mesh-api", "edge-1", ip="10.0.0.5", location=Location.WIREGUARD),
    make_entry("public-api", "cloud-1", ip="203.0.113.7"),
    make_entry("db-cache", "db-1", ip="127.0.0.1", location=Location.LOCAL),  # local to node db-1
    make_entry("registry-cache", "registry-host", ip="127.0.0.1", location=Location.LOCAL),
    make_entry("api-sidecar", "api-1", ip="127.0.0.1", location=Location.LOCAL),  # local to api-1
]


def placed(entry: ServiceEntry) -> ServiceEntry:
    """The network the registry fills in on registration."""
    network = NETWORKS.classify(entry.network_info.ip)
    info = entry.network_info
    return entry.evolve(network_info=type(info)(info.ip, info.hostname, network.name if network else None))


def visible(caller_ip: str | None, role: Role = Role.READ, networks: NetworkConfig | None = NETWORKS) -> list[str]:
    hosts_by_ip = {"192.168.1.10": ["api-1"]}
    visibility = visibility_for(
        caller_ip,
        role,
        networks,
        registry_host="registry-host",
        hosts_with_address=lambda ip: hosts_by_ip.get(ip, []),
    )
    return sorted(entry.service_name for entry in visibility.filter([placed(entry) for entry in ENTRIES]))


def test_a_lan_caller_sees_its_lan_unplaced_services_and_its_own_host_locals() -> None:
    assert visible("192.168.1.10") == ["api-sidecar", "office-api", "public-api"]
    # a configured node: its own local services, by its node name
    assert visible("192.168.1.100") == ["db-cache", "office-api", "public-api"]


def test_another_lan_and_the_wireguard_network_see_only_their_own() -> None:
    assert visible("192.168.2.77") == ["lab-api", "public-api"]
    assert visible("10.0.0.9") == ["mesh-api", "public-api"]


def test_a_caller_outside_every_network_sees_only_unplaced_services() -> None:
    assert visible("198.51.100.1") == ["public-api"]
    assert visible(None) == ["public-api"]  # an unknown address is treated as outside
    assert visible("not an address") == ["public-api"]


def test_the_registry_host_sees_every_network_but_only_its_own_local_services() -> None:
    expected = ["lab-api", "mesh-api", "office-api", "public-api", "registry-cache"]
    assert visible("127.0.0.1") == expected
    assert visible("::1") == expected
    assert visible("::ffff:127.0.0.1") == expected  # a dual-stack socket's view of an IPv4 peer


def test_ipv4_mapped_addresses_are_classified_as_ipv4() -> None:
    assert visible("::ffff:10.0.0.9") == ["mesh-api", "public-api"]


@pytest.mark.parametrize("caller", ["192.168.2.77", "198.51.100.1", None])
def test_admin_sees_everything(caller: str | None) -> None:
    assert visible(caller, Role.ADMIN) == sorted(entry.service_name for entry in ENTRIES)


def test_without_networks_everyone_sees_everything() -> None:
    assert visible("198.51.100.1", Role.READ, networks=None) == sorted(entry.service_name for entry in ENTRIES)


def test_event_form_is_filtered_by_the_same_rule() -> None:
    visibility = visibility_for(
        "10.0.0.9", Role.READ, NETWORKS, registry_host="registry-host", hosts_with_address=lambda ip: []
    )
    assert visibility.allows(placed(ENTRIES[2]).to_dict())
    assert not visibility.allows(placed(ENTRIES[0]).to_dict())
    assert not visibility.allows(placed(ENTRIES[4]).to_dict())
