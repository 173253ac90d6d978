"""IP allocation: lowest free address first, reserved addresses, durability, concurrency."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry import (
    Conflict,
    Location,
    MemoryStore,
    NetworkConfig,
    NetworkManager,
    NotFound,
    PoolExhausted,
    SqliteStore,
    Store,
    ValidationError,
)

from .test_network_config import SEED, config_of


@pytest.fixture
def seed() -> NetworkConfig:
    return NetworkConfig.from_yaml(SEED, source="services.yaml")


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    store: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "alloc.db")
    yield store
    store.close()


def test_seed_example_first_allocation_is_dot_two(seed: NetworkConfig, store: Store) -> None:
    manager = NetworkManager(seed, store=store)
    first = manager.allocate_ip("api-server", Location.LAN)
    assert (first.ip, first.network, first.prefixlen) == ("192.168.1.2", "production", 24)
    assert first.to_dict() == {"owner": "api-server", "network": "production", "ip": "192.168.1.2", "prefixlen": 24}
    assert manager.allocate_ip("api-server", "production") == first  # idempotent per owner
    assert manager.allocate_ip("web", "lan").ip == "192.168.1.3"
    assert manager.allocate_ip("api-server", "monitoring").ip == "10.0.0.2"  # one address per network
    assert manager.get_allocation("api-server", "production") == first
    assert [(a.owner, a.ip) for a in manager.allocations()] == [
        ("api-server", "192.168.1.2"),
        ("web", "192.168.1.3"),
        ("api-server", "10.0.0.2"),
    ]


def test_release_returns_what_was_released_and_is_idempotent(seed: NetworkConfig, store: Store) -> None:
    manager = NetworkManager(seed, store=store)
    lan = manager.allocate_ip("api", "production")
    wg = manager.allocate_ip("api", "monitoring")
    assert manager.release_ip("api", "monitoring") == [wg]
    assert manager.allocations() == [lan]
    assert manager.release_ip("api") == [lan]
    assert manager.release_ip("api") == []
    with pytest.raises(NotFound, match="'api' has no address in 'production'"):
        manager.get_allocation("api", "production")


def test_released_addresses_are_reused_lowest_first(store: Store) -> None:
    manager = NetworkManager(config_of(n={"type": "lan", "subnet": "10.0.0.0/28"}), store=store)
    ips = [manager.allocate_ip(f"o{i}", "n").ip for i in range(5)]
    assert ips == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    manager.release_ip("o3")
    manager.release_ip("o1")
    assert manager.allocate_ip("x", "n").ip == "10.0.0.3"
    assert manager.allocate_ip("y", "n").ip == "10.0.0.5"
    assert manager.allocate_ip("z", "n").ip == "10.0.0.7"


def test_reserved_addresses_are_never_handed_out(store: Store) -> None:
    config = config_of(
        n={
            "type": "lan",
            "subnet": "10.0.0.0/28",
            "gateway": "10.0.0.14",
            "reserved": ["10.0.0.1-10.0.0.3", "10.0.0.8/30"],
            "nodes": [{"host": "10.0.0.5", "name": "node-a"}],
        }
    )
    manager = NetworkManager(config, store=store)
    assert manager.free_count("n") == 16 - 2 - 1 - 3 - 4 - 1
    handed = [manager.allocate_ip(f"o{i}", "n").ip for i in range(manager.free_count("n"))]
    assert handed == ["10.0.0.4", "10.0.0.6", "10.0.0.7", "10.0.0.12", "10.0.0.13"]
    with pytest.raises(PoolExhausted, match=r"'n' \(10.0.0.0/28\) has no free address left") as caught:
        manager.allocate_ip("late", "n")
    assert caught.value.code == "pool_exhausted"
    assert caught.value.details["network"] == "n"


def test_point_to_point_and_ipv6_subnets(store: Store) -> None:
    config = config_of(
        p2p={"type": "lan", "subnet": "10.9.9.0/31"},
        v6={"type": "wireguard", "subnet": "fd00:1::/64"},
        lo={"type": "local", "subnet": "::1/128"},
    )
    manager = NetworkManager(config, store=store)
    assert [manager.allocate_ip(o, "p2p").ip for o in "ab"] == ["10.9.9.0", "10.9.9.1"]
    assert manager.allocate_ip("x", "v6").ip == "fd00:1::2"
    assert manager.allocate_ip("x", "lo").ip == "::1"
    with pytest.raises(PoolExhausted):
        manager.allocate_ip("y", "lo")


def test_requesting_a_specific_address(store: Store) -> None:
    manager = NetworkManager(config_of(n={"type": "lan", "subnet": "10.0.0.0/24"}), store=store)
    assert manager.allocate_ip("db", "n", ip="10.0.0.50").ip == "10.0.0.50"
    assert manager.allocate_ip("db", "n", ip="10.0.0.50").ip == "10.0.0.50"
    with pytest.raises(Conflict, match="already allocated to 'db'"):
        manager.allocate_ip("web", "n", ip="10.0.0.50")
    with pytest.raises(Conflict, match=r"already holds 10\.0\.0\.50"):
        manager.allocate_ip("db", "n", ip="10.0.0.51")
    with pytest.raises(Conflict, match="reserved"):
        manager.allocate_ip("web", "n", ip="10.0.0.1")
    with pytest.raises(ValidationError, match="outside network 'n'"):
        manager.allocate_ip("web", "n", ip="10.1.0.1")
    with pytest.raises(ValidationError, match="ip"):
        manager.allocate_ip("web", "n", ip="banana")
    # the cursor walks past a specifically taken address
    ips = {manager.allocate_ip(f"o{i}", "n").ip for i in range(60)}
    assert "10.0.0.50" not in ips and len(ips) == 60


@pytest.mark.parametrize("owner", ["", "a/b", " padded", "tab\there", "x" * 321, 5, None])
def test_bad_owners_are_refused(seed: NetworkConfig, owner: object) -> None:
    manager = NetworkManager(seed)
    with pytest.raises(ValidationError) as caught:
        manager.allocate_ip(owner, "production")  # type: ignore[arg-type]
    assert caught.value.field == "owner"


def test_unknown_network_is_not_found(seed: NetworkConfig) -> None:
    manager = NetworkManager(seed)
    with pytest.raises(NotFound, match="'backbone' is not configured"):
        manager.allocate_ip("a", "backbone")
    with pytest.raises(NotFound):
        manager.release_ip("a", "backbone")


def test_allocations_survive_a_restart(seed: NetworkConfig, tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with SqliteStore(path) as store:
        manager = NetworkManager(seed, store=store)
        kept = [manager.allocate_ip(f"svc-{i}", "production") for i in range(5)]
        manager.release_ip("svc-1")
    with SqliteStore(path) as store:
        manager = NetworkManager(seed, store=store)
        assert manager.allocations() == [a for a in kept if a.owner != "svc-1"]
        assert manager.allocate_ip("svc-0", "production") == kept[0]
        assert manager.allocate_ip("new", "production").ip == "192.168.1.3"  # svc-1's freed address
        assert manager.allocate_ip("newer", "production").ip == "192.168.1.7"


def test_allocations_that_no_longer_fit_the_config_are_kept_aside(seed: NetworkConfig, tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with SqliteStore(path) as store:
        manager = NetworkManager(seed, store=store)
        manager.allocate_ip("a", "production")  # .2
        manager.allocate_ip("b", "production")  # .3
        manager.allocate_ip("c", "monitoring")
    changed = config_of(
        production={"type": "lan", "subnet": "192.168.1.0/24", "nodes": [{"host": "192.168.1.3", "name": "new-node"}]}
    )
    with SqliteStore(path) as store:
        manager = NetworkManager(changed, store=store)
        assert [a.owner for a in manager.allocations()] == ["a"]
        reasons = {item["allocation"]["owner"]: item["reason"] for item in manager.orphaned_allocations()}
        assert "now reserved" in reasons["b"]
        assert "'monitoring' is no longer configured" in reasons["c"]
        # an orphaned address is not handed out again while its record exists
        assert manager.allocate_ip("d", "production").ip == "192.168.1.4"


def test_concurrent_allocations_never_duplicate(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "c.db") as store:
        manager = NetworkManager(config_of(n={"type": "lan", "subnet": "10.0.0.0/22"}), store=store)
        results: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(8)

        def worker(index: int) -> None:
            barrier.wait()
            for i in range(60):
                ip = manager.allocate_ip(f"w{index}-{i}", "n").ip
                with lock:
                    results.append(ip)
                # every owner asks twice: idempotency under contention
                assert manager.allocate_ip(f"w{index}-{i}", "n").ip == ip

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 480 == len(set(results))
        assert sorted(results, key=ipaddress.ip_address)[-1] == "10.0.1.225"  # lowest-first, no holes


def test_allocate_many_is_one_transaction(store: Store) -> None:
    manager = NetworkManager(config_of(n={"type": "lan", "subnet": "10.0.0.0/29"}), store=store)
    assert [a.ip for a in manager.allocate_many(["a", "b"], "n")] == ["10.0.0.2", "10.0.0.3"]
    with pytest.raises(PoolExhausted):
        manager.allocate_many(["c", "d", "e", "f"], "n")  # only 3 left: nothing is allocated
    assert [a.owner for a in manager.allocations()] == ["a", "b"]
    assert manager.free_count("n") == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=80))
def test_allocation_property_matches_a_model(operations: list[tuple[bool, int]]) -> None:
    """Against a trivially correct model: lowest free address, no duplicates, idempotent."""
    config = config_of(n={"type": "lan", "subnet": "10.0.0.0/27", "reserved": ["10.0.0.9"]})
    manager = NetworkManager(config)
    pool = [f"10.0.0.{i}" for i in range(2, 31) if i != 9]
    held: dict[str, str] = {}
    for allocate, number in operations:
        owner = f"o{number}"
        if allocate:
            if owner in held:
                expected = held[owner]
            else:
                free = [ip for ip in pool if ip not in held.values()]
                if not free:
                    with pytest.raises(PoolExhausted):
                        manager.allocate_ip(owner, "n")
                    continue
                expected = free[0]
                held[owner] = expected
            assert manager.allocate_ip(owner, "n").ip == expected
        else:
            released = manager.release_ip(owner)
            assert [a.ip for a in released] == ([held.pop(owner)] if owner in held else [])
    assert {a.owner: a.ip for a in manager.allocations()} == held
