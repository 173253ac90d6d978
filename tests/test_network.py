"""services.yaml parsing, classification and IP allocation."""

from __future__ import annotations

import ipaddress
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry import (
    ConfigError,
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
from registry.network import parse_wireguard_config

SEED = textwrap.dedent(
    """
    networks:
      local:
        type: local
        subnet: "127.0.0.0/8"
      production:
        type: lan
        subnet: "192.168.1.0/24"
        nodes:
          - host: "192.168.1.100"
            name: "prod-api"
            ssh_user: "deploy"
            ansible_port: 2222
      monitoring:
        type: wireguard
        subnet: "10.0.0.0/24"
        config_path: "/etc/wireguard/wg0.conf"
    """
)


def config_of(**networks: object) -> NetworkConfig:
    return NetworkConfig.from_dict({"networks": networks})


@pytest.fixture
def seed() -> NetworkConfig:
    return NetworkConfig.from_yaml(SEED, source="services.yaml")


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    store: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "alloc.db")
    yield store
    store.close()


# ------------------------------------------------------------------ config


def test_seed_format_is_read_exactly(seed: NetworkConfig, tmp_path: Path) -> None:
    assert list(seed.networks) == ["local", "production", "monitoring"]
    production = seed.get("production")
    assert production.type is Location.LAN
    assert str(production.subnet) == "192.168.1.0/24"
    assert str(production.gateway) == "192.168.1.1"
    [node] = production.nodes
    assert (node.name, node.host, node.ssh_user, dict(node.vars)) == (
        "prod-api",
        "192.168.1.100",
        "deploy",
        {"ansible_port": 2222},
    )
    assert str(seed.get("monitoring").config_path) == "/etc/wireguard/wg0.conf"
    assert seed.get("production").to_dict() == {
        "name": "production",
        "type": "lan",
        "subnet": "192.168.1.0/24",
        "gateway": "192.168.1.1",
        "nodes": [{"name": "prod-api", "host": "192.168.1.100", "ssh_user": "deploy", "ansible_port": 2222}],
    }
    path = tmp_path / "services.yaml"
    path.write_text(SEED)
    assert NetworkConfig.from_file(path).to_dict() == seed.to_dict()
    # the dict form reads back to the same configuration
    assert NetworkConfig.from_dict(seed.to_dict()).to_dict() == seed.to_dict()


def test_the_shipped_example_is_valid() -> None:
    example = Path(__file__).parent.parent / "inventories" / "services.yaml"
    assert list(NetworkConfig.from_file(example).networks) == ["local", "production", "monitoring"]


def test_classify_and_lookups(seed: NetworkConfig) -> None:
    assert seed.classify("192.168.1.7").name == "production"
    assert seed.classify("127.3.0.1").name == "local"
    assert seed.classify("10.0.0.200").name == "monitoring"
    assert seed.classify("::ffff:10.0.0.3").name == "monitoring"
    assert seed.classify("8.8.8.8") is None
    assert seed.classify("not-an-ip") is None
    assert seed.classify("fe80::1%eth0") is None
    assert [n.name for n in seed.by_location("lan")] == ["production"]
    assert seed.resolve(Location.LAN).name == "production"
    assert seed.resolve("lan").name == "production"
    assert seed.resolve("monitoring").name == "monitoring"
    network, node = seed.find_node("prod-api")
    assert (network.name, node.host) == ("production", "192.168.1.100")
    assert seed.find_node("nope") is None
    with pytest.raises(NotFound, match=r"'nope' is not configured .known: local, production, monitoring"):
        seed.get("nope")


def test_resolve_with_two_networks_of_a_location_asks_for_a_name() -> None:
    config = config_of(a={"type": "lan", "subnet": "10.1.0.0/24"}, b={"type": "lan", "subnet": "10.2.0.0/24"})
    with pytest.raises(ValidationError, match=r"several lan networks \(a, b\)"):
        config.resolve("lan")
    with pytest.raises(NotFound, match="no wireguard network"):
        config.resolve(Location.WIREGUARD)


def test_empty_and_missing_networks_are_an_empty_config() -> None:
    assert len(NetworkConfig.from_yaml("")) == 0
    assert len(NetworkConfig.from_yaml("networks:\n")) == 0


@pytest.mark.parametrize(
    ("yaml_text", "message", "field"),
    [
        ("networks: [1, 2]", r"networks: .*object", "networks"),
        ("- a\n- b", "input: must be an object", None),
        (
            "networks:\n  lan: {type: lan, subnet: 192.168.1.0/33}",
            "networks.lan.subnet: subnet .* is not a valid CIDR",
            "networks.lan.subnet",
        ),
        ("networks:\n  lan: {type: lan, subnet: 192.168.1.0}", "is not a CIDR", "networks.lan.subnet"),
        (
            "networks:\n  lan: {type: lan, subnet: 192.168.1.5/24}",
            "host bits set .did you mean 192.168.1.0/24",
            "networks.lan.subnet",
        ),
        ("networks:\n  lan: {type: lan}", "networks.lan.subnet: is required", "networks.lan.subnet"),
        (
            "networks:\n  lan: {type: mesh, subnet: 10.0.0.0/8}",
            "networks.lan.type: must be one of local, lan, wireguard, got 'mesh'",
            "networks.lan.type",
        ),
        ("networks:\n  lan: {subnet: 10.0.0.0/8}", "networks.lan.type: is required", "networks.lan.type"),
        (
            "networks:\n  lan: {type: lan, subnet: 10.0.0.0/8, colour: red}",
            "networks.lan.colour: unknown field",
            "networks.lan.colour",
        ),
        (
            "networks:\n  lo: {type: local, subnet: 10.0.0.0/8}",
            "local network must be a loopback subnet",
            "networks.lo.subnet",
        ),
        ("networks:\n  lan: 5", "networks.lan: must be an object, got 5", "networks.lan"),
        ("networks:\n  'bad name': {type: lan, subnet: 10.0.0.0/8}", "network name 'bad name' is invalid", "networks"),
        (
            "networks:\n  a: {type: lan, subnet: 10.0.0.0/16}\n  b: {type: lan, subnet: 10.0.5.0/24}",
            r"networks.b.subnet: subnet 10.0.5.0/24 overlaps network 'a' \(10.0.0.0/16\)",
            "networks.b.subnet",
        ),
        (
            "networks:\n  a: {type: lan, subnet: 10.0.0.0/24, nodes: [{host: 10.0.1.5, name: n1}]}",
            "networks.a.nodes.0..host: host 10.0.1.5 is outside the subnet 10.0.0.0/24",
            "networks.a.nodes[0].host",
        ),
        (
            "networks:\n  a: {type: lan, subnet: 10.0.0.0/24, nodes: "
            "[{host: 10.0.0.5, name: n1}, {host: 10.0.0.6, name: n1}]}",
            "networks.a.nodes.1..name: duplicate node name 'n1'",
            "networks.a.nodes[1].name",
        ),
        (
            "networks:\n  a: {type: lan, subnet: 10.0.0.0/24, nodes: [{host: 10.0.0.5, name: n1}]}\n"
            "  b: {type: lan, subnet: 10.0.1.0/24, nodes: [{host: 10.0.1.5, name: n1}]}",
            "networks.b.nodes.0..name: node name 'n1' is already used in network 'a'",
            "networks.b.nodes[0].name",
        ),
        (
            "networks:\n  a: {type: lan, subnet: 10.0.0.0/24, nodes: "
            "[{host: 10.0.0.5, name: n1}, {host: 10.0.0.5, name: n2}]}",
            "node 'n2' has the same host 10.0.0.5 as node 'n1'",
            "networks.a.nodes[1].host",
        ),
        (
            "networks:\n  a: {type: lan, subnet: 10.0.0.0/24, nodes: [{name: n1}]}",
            "networks.a.nodes.0..host: is required",
            "networks.a.nodes[0].host",
        ),
        (
            "networks:\n  a: {type: lan, subnet: 10.0.0.0/24, nodes: [{host: 10.0.0.300, name: n1}]}",
            "host '10.0.0.300' is not a valid IP",
            "networks.a.nodes[0].host",
        ),
        (
            "networks:\n  a: {type: lan, subnet: 10.0.0.0/24, nodes: [{host: 10.0.0.1, name: gw}]}",
            "has the gateway's address",
            "networks.a.nodes[0].host",
        ),
        (
            "networks:\n  a: {type: lan, subnet: 10.0.0.0/24, gateway: 10.9.0.1}",
            "gateway 10.9.0.1 is outside the subnet",
            "networks.a.gateway",
        ),
        (
            "networks:\n  a: {type: lan, subnet: 10.0.0.0/24, config_path: /x}",
            "config_path is only for wireguard",
            "networks.a.config_path",
        ),
        (
            "networks:\n  a: {type: lan, subnet: 10.0.0.0/24, reserved: [10.0.1.0/28]}",
            "reserved entry '10.0.1.0/28' is outside",
            "networks.a.reserved[0]",
        ),
        (
            "networks:\n  a: {type: lan, subnet: 10.0.0.0/24, reserved: [banana]}",
            "reserved entry 'banana' is not",
            "networks.a.reserved[0]",
        ),
        ("networks:\n  a: {type: lan\n", "invalid YAML at line", "networks"),
    ],
)
def test_every_config_error_names_the_network_and_field(yaml_text: str, message: str, field: str | None) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        NetworkConfig.from_yaml(yaml_text, source="services.yaml")
    assert caught.value.field == field
    assert caught.value.message.startswith("services.yaml: ")
    assert caught.value.code == "bad_request"


def test_yaml_is_loaded_safely() -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        NetworkConfig.from_yaml("networks: !!python/object/apply:os.system ['true']")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        NetworkConfig.from_file(tmp_path / "nope.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        NetworkConfig.from_file(binary)


# ------------------------------------------------------------------ allocation


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


@pytest.mark.parametrize("owner", ["", "a/b", " padded", "tab\there", "x" * 254, 5, None])
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


# ------------------------------------------------------------------ wireguard config


def test_wireguard_config_keeps_addresses_and_allowed_ips_never_keys() -> None:
    text = textwrap.dedent(
        """
        # wg0
        [Interface]
        PrivateKey = aGVsbG8gdGhpcyBpcyBzZWNyZXQgc28gZG9udCBsb2cgaXQ=
        Address = 10.0.0.1/24, fd00::1/64
        ListenPort = 51820

        [Peer]
        PublicKey = cHVibGljIGtleSBvbmUgICAgICAgICAgICAgICAgICAgICA=
        PresharedKey = c2VjcmV0IHBzayAgICAgICAgICAgICAgICAgICAgICAgICA=
        AllowedIPs = 10.0.0.2/32
        Endpoint = 192.0.2.1:51820

        [Peer]
        PublicKey = cHVibGljIGtleSB0d28gICAgICAgICAgICAgICAgICAgICA=
        AllowedIPs = 10.0.0.3/32,10.10.0.0/16  # site
        """
    )
    parsed = parse_wireguard_config(text)
    assert parsed.addresses == ("10.0.0.1/24", "fd00::1/64")
    assert parsed.peers_allowed_ips == ("10.0.0.2/32", "10.0.0.3/32", "10.10.0.0/16")
    assert "secret" not in repr(parsed) and "aGVsbG8" not in repr(parsed)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[Interface]\nAddress = 10.0.0.300/24\n", "line 2: '10.0.0.300/24' is not an address"),
        ("Address = 10.0.0.1/24\n", "line 1: 'address' is outside any section"),
        ("[Interface]\nthis is not a key\n", "line 2: expected 'Key = Value'"),
        ("[Router]\n", "line 1: unknown section"),
    ],
)
def test_bad_wireguard_configs_say_where(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_wireguard_config(text, source="wg0.conf")


def test_bad_wireguard_config_error_never_echoes_a_private_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_wireguard_config("[Interface]\nPrivateKey = c2VjcmV0\nAddress = nope\n")
    assert "c2VjcmV0" not in str(caught.value)
