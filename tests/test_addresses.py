"""Addresses in an instance's life: allocated on register, recorded, released on removal, with events;
the location worked out from the address; a reload of the networks (the library; the server in test_server)."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from registry import (
    Allocation,
    Conflict,
    Event,
    EventType,
    Location,
    NetworkConfig,
    NetworkInfo,
    NetworkManager,
    PoolExhausted,
    Registry,
    ServiceEntry,
    ValidationError,
)

from .test_network_config import SEED, config_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def seed() -> NetworkConfig:
    return NetworkConfig.from_yaml(SEED, source="services.yaml")


@pytest.fixture
def registry(seed: NetworkConfig, tmp_path: Path) -> Registry:
    return Registry.with_persistence(tmp_path / "registry.db", networks=seed)


def drain(subscription: object) -> list[Event]:
    events = []
    while (event := subscription.get_nowait()) is not None:  # type: ignore[attr-defined]
        events.append(event)
    return events


def kinds(events: list[Event]) -> list[str]:
    return [event.type.value for event in events]


def test_an_instance_without_ip_gets_the_next_free_address_of_its_network(registry: Registry) -> None:
    events = registry.subscribe()
    api = registry.add_or_update({"service_name": "api", "host_id": "h1", "network_info": {"network": "production"}})
    assert (api.network_info.ip, api.network_info.network, api.location) == ("192.168.1.2", "production", Location.LAN)
    assert registry.get_allocation("api@h1", "production") == Allocation("api@h1", "production", "192.168.1.2", 24)
    got = drain(events)
    assert kinds(got) == ["IpAllocated", "ServiceRegistered"]  # the address first, then the instance
    assert got[0].allocation == Allocation("api@h1", "production", "192.168.1.2", 24)
    assert got[0].data["reason"] == "registered" and got[0].revision + 1 == got[1].revision
    # re-registering the same instance keeps its address: a heartbeat, no event
    again = registry.add_or_update(ServiceEntry("api", "h1", network_info=NetworkInfo(network="production")))
    assert again == api and drain(events) == []
    # a location with one network is enough; the next instance gets the next address
    web = registry.add_or_update(ServiceEntry("web", "h2", Location.LAN))
    assert (web.network_info.ip, web.network_info.network) == ("192.168.1.3", "production")
    # and allocate_ip never hands out what instances hold
    assert registry.allocate_ip("spare", "production").ip == "192.168.1.4"


def test_a_given_address_in_a_managed_network_is_recorded_and_defended(registry: Registry) -> None:
    registry.add_or_update(ServiceEntry("db", "h1", network_info=NetworkInfo("192.168.1.2")))
    assert registry.owner_of("192.168.1.2") == Allocation("db@h1", "production", "192.168.1.2", 24)
    assert registry.allocate_ip("other", "production").ip == "192.168.1.3"
    with pytest.raises(Conflict, match=r"192\.168\.1\.2 in 'production' is already allocated to 'db@h1'"):
        registry.allocate_ip("thief", "production", ip="192.168.1.2")
    with pytest.raises(Conflict, match=r"network_info\.ip 192\.168\.1\.3 in 'production' is allocated to 'other'"):
        registry.add_or_update(ServiceEntry("api", "h2", network_info=NetworkInfo("192.168.1.3")))
    with pytest.raises(Conflict, match="'db@h1'"):
        registry.add_or_update(ServiceEntry("api", "h2", network_info=NetworkInfo("192.168.1.2")))
    # the host's own allocation is its instances' too (ansible's ip_allocation with owner: inventory_hostname)
    host_address = registry.allocate_ip("h3", "production").ip
    assert (
        registry.add_or_update(ServiceEntry("api", "h3", network_info=NetworkInfo(host_address))).location
        is Location.LAN
    )
    assert registry.owner_of(host_address).owner == "h3"  # type: ignore[union-attr]
    # another instance of the same host shares the host's address
    shared = registry.add_or_update(ServiceEntry("metrics", "h1", network_info=NetworkInfo("192.168.1.2")))
    assert shared.network_info.network == "production"
    # a node's own address (services.yaml) is the file's: used by instances, held by nobody
    node = registry.add_or_update(ServiceEntry("agent", "prod-api", network_info=NetworkInfo("192.168.1.100")))
    assert node.location is Location.LAN and registry.owner_of("192.168.1.100") is None
    # re-registered without an address, it keeps the one it is on (no new allocation, no event)
    assert registry.add_or_update(ServiceEntry("agent", "prod-api", Location.LAN)) == node
    assert registry.add_or_update(ServiceEntry("agent2", "elsewhere", network_info=NetworkInfo("192.168.1.100")))


def test_removal_releases_the_address_or_hands_it_to_an_instance_still_on_it(registry: Registry) -> None:
    registry.add_or_update(ServiceEntry("db", "h1", network_info=NetworkInfo("192.168.1.2")))
    registry.add_or_update(ServiceEntry("metrics", "h1", network_info=NetworkInfo("192.168.1.2")))
    registry.add_or_update(ServiceEntry("api", "h2", network_info=NetworkInfo(network="production")))
    events = registry.subscribe()
    registry.remove("db", "h1")
    got = drain(events)
    assert kinds(got) == ["ServiceRemoved", "IpReleased", "IpAllocated"]
    assert got[1].allocation is not None and got[1].allocation.owner == "db@h1" and got[1].data["reason"] == "removed"
    assert got[2].data == {"allocation": got[2].allocation.to_dict(), "reason": "handed_over"}  # type: ignore[union-attr]
    assert registry.owner_of("192.168.1.2").owner == "metrics@h1"  # type: ignore[union-attr]
    registry.remove("api", "h2")
    assert kinds(drain(events)) == ["ServiceRemoved", "IpReleased"]
    assert registry.allocate_ip("next", "production").ip == "192.168.1.3"  # api's address is free again


def test_deregistration_after_ttl_failure_releases_the_address(seed: NetworkConfig) -> None:
    clock = Clock()
    registry = Registry(networks=seed, clock=clock)
    registry.add_or_update(ServiceEntry("api", "h1", Location.LAN, ttl_seconds=5, deregister_after_seconds=10))
    events = registry.subscribe()
    clock.now += 6
    registry.expire()
    clock.now += 11
    registry.expire()
    got = drain(events)
    assert kinds(got) == ["ServiceStateChanged", "ServiceRemoved", "IpReleased"]
    assert got[-1].data["reason"] == "deregistered_after_failure"
    assert registry.allocations() == []


def test_sticky_networks_keep_an_address_after_removal(tmp_path: Path) -> None:
    config = config_of(n={"type": "lan", "subnet": "10.1.0.0/24", "release_on_remove": False})
    assert config.networks["n"].to_dict()["release_on_remove"] is False
    registry = Registry(networks=config)
    first = registry.add_or_update(ServiceEntry("api", "h1", Location.LAN))
    registry.remove("api", "h1")
    assert registry.get_allocation("api@h1", "n").ip == first.network_info.ip
    with pytest.raises(Conflict, match="'api@h1'"):
        registry.add_or_update(ServiceEntry("web", "h2", network_info=NetworkInfo(first.network_info.ip)))
    assert registry.add_or_update(ServiceEntry("api", "h1", Location.LAN)).network_info.ip == first.network_info.ip


def test_moving_to_another_address_releases_the_old_one(registry: Registry) -> None:
    registry.add_or_update(ServiceEntry("api", "h1", Location.LAN))  # .2
    events = registry.subscribe()
    moved = registry.add_or_update(ServiceEntry("api", "h1", network_info=NetworkInfo("192.168.1.50")))
    got = drain(events)
    assert kinds(got) == ["IpReleased", "IpAllocated", "ServiceUpdated"]
    assert got[0].data["reason"] == "moved" and moved.network_info.ip == "192.168.1.50"
    # into a WireGuard network: the LAN address goes, the new one is recorded
    registry.add_or_update(ServiceEntry("api", "h1", Location.WIREGUARD))
    assert [(a.network, a.ip) for a in registry.allocations()] == [("monitoring", "10.0.0.2")]
    # to an address in no network (with its location): nothing is held any more
    registry.add_or_update(ServiceEntry("api", "h1", Location.LAN, NetworkInfo("203.0.113.5")))
    assert registry.allocations() == []


def test_a_full_network_refuses_the_registration_and_changes_nothing(tmp_path: Path) -> None:
    registry = Registry(networks=config_of(n={"type": "lan", "subnet": "10.2.0.0/30"}))  # one usable address
    registry.add_or_update(ServiceEntry("a", "h1", Location.LAN))
    with pytest.raises(PoolExhausted, match="no free address"):
        registry.add_or_update(ServiceEntry("b", "h2", Location.LAN))
    # all or nothing: the first entry's claim is undone when the second cannot be had
    registry.remove("a", "h1")
    revision = registry.revision
    with pytest.raises(PoolExhausted):
        registry.add_or_update_many([ServiceEntry("c", "h3", Location.LAN), ServiceEntry("d", "h4", Location.LAN)])
    assert registry.allocations() == [] and registry.revision == revision and len(registry) == 0
    # one writer each (the server's batches): only the one that cannot be had fails
    outcomes = registry.add_or_update_each(
        [ServiceEntry("c", "h3", Location.LAN), ServiceEntry("d", "h4", Location.LAN)]
    )
    assert isinstance(outcomes[0], ServiceEntry) and isinstance(outcomes[1], PoolExhausted)


def test_the_location_comes_from_the_address(registry: Registry) -> None:
    assert (
        registry.add_or_update(ServiceEntry("a", "h", network_info=NetworkInfo("127.0.0.1"))).location is Location.LOCAL
    )
    wg = registry.add_or_update(ServiceEntry("b", "h", network_info=NetworkInfo(ipaddress.ip_address("10.0.0.9"))))
    assert (wg.location, wg.network_info.network) == (Location.WIREGUARD, "monitoring")
    with pytest.raises(
        ValidationError, match=r"location is required for 203\.0\.113\.7.*production \(lan 192\.168\.1\.0/24\)"
    ):
        registry.add_or_update(ServiceEntry("c", "h", network_info=NetworkInfo("203.0.113.7")))
    assert (
        registry.add_or_update(ServiceEntry("c", "h", Location.LAN, NetworkInfo("203.0.113.7"))).location
        is Location.LAN
    )
    with pytest.raises(ValidationError, match="is in the lan network 'production', but the location is 'wireguard'"):
        registry.add_or_update(ServiceEntry("d", "h", Location.WIREGUARD, NetworkInfo("192.168.1.9")))
    with pytest.raises(ValidationError, match="network_info needs an ip, or a network"):
        registry.add_or_update(ServiceEntry("e", "h"))
    # a local instance without an address is on the loopback
    assert registry.add_or_update(ServiceEntry("f", "h", Location.LOCAL)).network_info.ip == "127.0.0.1"


def test_without_networks_an_address_is_needed_and_the_loopback_is_local() -> None:
    registry = Registry()
    assert (
        registry.add_or_update({"service_name": "a", "host_id": "h", "network_info": {"ip": "::1"}}).location
        is Location.LOCAL
    )
    with pytest.raises(ValidationError, match=r"location is required for 192\.0\.2\.1: this registry has no networks"):
        registry.add_or_update(ServiceEntry("b", "h", network_info=NetworkInfo("192.0.2.1")))
    with pytest.raises(ValidationError, match=r"network_info\.ip is required: this registry has no networks"):
        registry.add_or_update(ServiceEntry("b", "h", Location.LAN))
    with pytest.raises(ValidationError, match="no networks configured"):
        registry.allocate_ip("x", "lan")


def test_address_events_resume_filter_and_survive_a_restart(seed: NetworkConfig, tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with Registry.with_persistence(path, networks=seed) as registry:
        start = registry.revision
        registry.add_or_update(ServiceEntry("api", "h1", Location.LAN))
        registry.allocate_ip("vip", "production")
        registry.release_ip("vip")
    with Registry.load(path, networks=seed) as registry:
        assert registry.get_allocation("api@h1", "lan").ip == "192.168.1.2"
        replay = drain(registry.subscribe(since_revision=start))
        assert kinds(replay) == ["IpAllocated", "ServiceRegistered", "IpAllocated", "IpReleased"]
        assert [event.data["reason"] for event in replay if event.allocation] == [
            "registered",
            "allocate_ip",
            "release_ip",
        ]
        only_api = drain(registry.subscribe(["IpAllocated"], since_revision=start, filter={"service_name": "api"}))
        assert [event.allocation.owner for event in only_api] == ["api@h1"]  # type: ignore[union-attr]
        by_network = drain(registry.subscribe(since_revision=start, filter={"network": "monitoring"}))
        assert by_network == []


def test_release_ip_refuses_the_address_of_a_registered_instance(registry: Registry) -> None:
    registry.add_or_update(ServiceEntry("api", "h1", Location.LAN))
    with pytest.raises(Conflict, match="address of the registered instance 'api@h1': remove the service"):
        registry.release_ip("api@h1")
    assert registry.allocations()[0].owner == "api@h1"


def test_reloading_the_networks_reports_changes_and_orphans(registry: Registry, seed: NetworkConfig) -> None:
    registry.allocate_ip("a", "production")  # .2
    registry.allocate_ip("b", "monitoring")  # 10.0.0.2
    events = registry.subscribe()
    assert registry.reload_networks(NetworkConfig.from_yaml(SEED)) is None  # the same file again: nothing
    changed = config_of(
        local={"type": "local", "subnet": "127.0.0.0/8"},
        production={"type": "lan", "subnet": "192.168.1.0/24"},
        backup={"type": "lan", "subnet": "172.16.0.0/24"},
    )
    event = registry.reload_networks(changed)
    assert event is not None and event.type is EventType.NETWORK_TOPOLOGY_CHANGED
    assert event.data["networks"] == {"added": ["backup"], "removed": ["monitoring"], "changed": ["production"]}
    assert [orphan["allocation"]["owner"] for orphan in event.data["orphaned"]] == ["b"]
    assert [(e.type, e.revision) for e in drain(events)] == [(event.type, event.revision)]
    assert [a.owner for a in registry.allocations()] == ["a"]
    assert registry.allocate_ip("c", "backup").ip == "172.16.0.2"
    # back to the first file: the orphan is in use again, never dropped
    registry.reload_networks(seed)
    assert [a.owner for a in registry.allocations("monitoring")] == ["b"]
    assert registry.orphaned_allocations()[0]["allocation"]["owner"] == "c"


def test_the_seed_network_manager_works_on_the_registry_that_owns_the_store(
    registry: Registry, seed: NetworkConfig
) -> None:
    events = registry.subscribe()
    manager = NetworkManager(seed, store=registry.store)
    allocation = manager.allocate_ip("api-server", Location.LAN)
    assert str(allocation) == "192.168.1.2" and allocation.interface == ipaddress.ip_interface("192.168.1.2/24")
    assert registry.allocations() == [allocation]
    assert kinds(drain(events)) == ["IpAllocated"]
    standalone = NetworkManager(seed)
    assert standalone.allocate_ip("api-server", "production").ip == "192.168.1.2"


def test_events_are_typed_and_know_their_subscription(registry: Registry) -> None:
    first, second = registry.subscribe(), registry.subscribe(["IpAllocated"])
    registry.add_or_update(ServiceEntry("api", "h1", Location.LAN))
    registered = next(event for event in drain(first) if event.type is EventType.SERVICE_REGISTERED)
    assert isinstance(registered.service, ServiceEntry) and registered.service.service_name == "api"
    assert registered.subscription == first.id and registered.allocation is None
    allocated = second.get(timeout=1)
    assert allocated is not None and allocated.subscription == second.id
    assert isinstance(allocated.allocation, Allocation) and allocated.service is None

    async def wait_briefly() -> None:
        with pytest.raises(TimeoutError):
            await second.next_event(timeout=0.05)

    asyncio.run(wait_briefly())
