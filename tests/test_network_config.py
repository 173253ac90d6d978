"""services.yaml: the seed's format, lookups, and every error naming the file and the field."""

from __future__ import annotations

import datetime
import textwrap
from pathlib import Path

import msgspec
import pytest

from registry import ConfigError, Location, NetworkConfig, NotFound, ValidationError
from registry.network.config import NetworkSettings

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


def test_the_settings_struct_declares_the_documented_keys() -> None:
    assert [field.name for field in msgspec.structs.fields(NetworkSettings)] == [
        "type",
        "subnet",
        "nodes",
        "config_path",
        "gateway",
        "reserved",
        "description",
        "release_on_remove",
    ]


def test_empty_sections_and_no_gateway() -> None:
    config = NetworkConfig.from_yaml(
        textwrap.dedent(
            """
            other_tool: {keeps: its own section}
            networks:
              a: {type: lan, subnet: 10.0.0.0/24, nodes: , reserved: , description: }
              b: {type: lan, subnet: 10.0.1.0/24, gateway: null}
              c: {type: lan, subnet: 10.0.2.0/24, gateway: false}
              d: {type: lan, subnet: 10.0.3.0/31}
              e: {type: lan, subnet: 10.0.4.0/24, gateway: 10.0.4.254}
            """
        )
    )
    assert [(name, network.gateway) for name, network in config.networks.items()] == [
        ("a", config.get("a").subnet.network + 1),
        ("b", None),
        ("c", None),
        ("d", None),
        ("e", config.get("e").subnet.network + 254),
    ]
    assert (config.get("a").nodes, config.get("a").reserved, config.get("a").description) == ((), (), None)
    assert NetworkConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_node_keys_besides_its_own_are_host_variables() -> None:
    node = {"host": "10.0.0.5", "name": "n1", "ansible_port": 2222, "labels": {"rack": ["a", 1, None, 2.5, True]}}
    [(_, read)] = config_of(a={"type": "lan", "subnet": "10.0.0.0/24", "nodes": [node]}).nodes()
    assert (read.ssh_user, dict(read.vars)) == (
        None,
        {"ansible_port": 2222, "labels": {"rack": ["a", 1, None, 2.5, True]}},
    )
    assert read.to_dict() == node


@pytest.mark.parametrize(
    ("settings", "field", "fragment"),
    [
        (
            {"nodes": [{"host": "10.0.0.5", "name": "n1", "since": datetime.date(2024, 1, 1)}]},
            "nodes[0].since",
            "datetime.date",
        ),
        ({"nodes": [{"host": "10.0.0.5", "name": "n1", "ssh_user": "  "}]}, "nodes[0].ssh_user", "'  '"),
        ({"nodes": [{"host": "10.0.0.5", "name": "bad name"}]}, "nodes[0].name", "name 'bad name' is invalid"),
        ({"nodes": [{"host": "10.0.0.5", "name": "n1"}, "n2"]}, "nodes[1]", "must be an object, got 'n2'"),
        ({"nodes": [{"host": 5, "name": "n1"}]}, "nodes[0].host", "must be a string, got 5"),
        ({"nodes": [{"host": "0.0.0.0", "name": "n1"}]}, "nodes[0].host", "host '0.0.0.0' is not a valid IP address"),
        ({"reserved": ["10.0.0.9", 7]}, "reserved[1]", "must be a string, got 7"),
        ({"reserved": ["10.0.0.9-10.0.1.2"]}, "reserved[0]", "is outside the subnet 10.0.0.0/24"),
        ({"gateway": True}, "gateway", "got True"),
        ({"gateway": "fd00::1"}, "gateway", "gateway fd00::1 is outside the subnet"),
        ({"description": ["x"]}, "description", "got ['x']"),
        ({"subnet": 10}, "subnet", "must be a string, got 10"),
    ],
)
def test_more_errors_name_the_field(settings: dict[str, object], field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        NetworkConfig.from_dict(
            {"networks": {"a": {"type": "lan", "subnet": "10.0.0.0/24", **settings}}}, source="s.yaml"
        )
    assert caught.value.field == f"networks.a.{field}"
    assert caught.value.message.startswith(f"s.yaml: networks.a.{field}: ")
    assert fragment in caught.value.message


def test_wireguard_config_path_must_be_a_path() -> None:
    with pytest.raises(ConfigError, match=r"networks\.w\.config_path: config_path must be a file path"):
        config_of(w={"type": "wireguard", "subnet": "10.0.0.0/24", "config_path": " "})
    assert config_of(w={"type": "wireguard", "subnet": "10.0.0.0/24", "config_path": None}).get("w").config_path is None
