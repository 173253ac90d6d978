"""Topology detection without root: the wg-quick parser, and detect_topology on recorded
``ip -j -d addr`` / ``wg show all dump`` output (tests/test_topology.py runs it on real interfaces)."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from registry import ConfigError, InternalError, NetworkConfig, detect_topology
from registry.network import parse_wireguard_config, topology


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


# ------------------------------------------------------------------ detect_topology on recorded output

IP_ADDR = [
    {
        "ifname": "lo",
        "flags": ["LOOPBACK", "UP"],
        "link_type": "loopback",
        "addr_info": [
            {"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"},
            {"family": "inet6", "local": "::1", "prefixlen": 128, "scope": "host"},
        ],
    },
    {
        "ifname": "eth0",
        "flags": ["UP"],
        "link_type": "ether",
        "linkinfo": {"info_kind": "veth"},
        "addr_info": [
            {"family": "inet", "local": "192.168.1.10", "prefixlen": 24, "scope": "global"},
            {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"},
            {"family": "inet", "local": "10.0.0.7", "prefixlen": 99, "scope": "global"},
        ],
    },
    # kernel WireGuard: known by its link kind
    {"ifname": "wg0", "linkinfo": {"info_kind": "wireguard"}, "addr_info": [{"local": "10.9.0.1", "prefixlen": 24}]},
    # wireguard-go: a plain tun device that only `wg` knows
    {"ifname": "tun7", "linkinfo": {"info_kind": "tun"}, "addr_info": [{"local": "172.16.0.1", "prefixlen": 16}]},
    # an address in the configured wireguard network, on an interface nothing says is WireGuard
    {"ifname": "ens3", "addr_info": [{"local": "10.0.0.1", "prefixlen": 24}]},
]
WG_DUMP = "".join(
    "\t".join(fields) + "\n"
    for fields in [
        ("wg0", "(hidden)", "pub0", "51820", "off"),
        ("wg0", "peer1", "(none)", "192.0.2.1:51820", "10.9.0.2/32,10.10.0.0/16", "0", "0", "0", "off"),
        ("wg0", "peer2", "(none)", "(none)", "10.9.0.2/32", "0", "0", "0", "off"),
        ("tun7", "(hidden)", "pub7", "51821", "off"),
        ("tun7", "peer3", "(none)", "(none)", "(none)", "0", "0", "0", "off"),
    ]
)


class Commands:
    """Stands in for ``ip`` and ``wg``: records what ran, answers with recorded output."""

    def __init__(self, *, ip: object = IP_ADDR, wg: str | None = WG_DUMP, wg_fails: bool = False) -> None:
        self.ip_output = ip if isinstance(ip, str) else json.dumps(ip)
        self.wg_output = wg
        self.wg_fails = wg_fails
        self.ran: list[list[str]] = []

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if name != "wg" or self.wg_output is not None else None

    def run(self, command: list[str], netns: str | None) -> subprocess.CompletedProcess[str]:
        self.ran.append([*command, f"netns={netns}"])
        if command[0] == "wg":
            return subprocess.CompletedProcess(command, int(self.wg_fails), self.wg_output or "", "no permission")
        return subprocess.CompletedProcess(command, 0, self.ip_output, "")


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> Commands:
    fake = Commands()
    monkeypatch.setattr(topology, "_run", fake.run)
    monkeypatch.setattr(topology.shutil, "which", fake.which)
    return fake


def wireguard_file(tmp_path: Path) -> Path:
    path = tmp_path / "wg1.conf"
    path.write_text("[Interface]\nPrivateKey = c2VjcmV0\nAddress = 10.0.0.1/24\n[Peer]\nAllowedIPs = 10.0.0.9/32\n")
    return path


def networks(tmp_path: Path, **extra: dict[str, str]) -> NetworkConfig:
    return NetworkConfig.from_dict(
        {
            "networks": {
                "local": {"type": "local", "subnet": "127.0.0.0/8"},
                "production": {"type": "lan", "subnet": "192.168.1.0/24"},
                "mesh": {"type": "wireguard", "subnet": "10.0.0.0/24", "config_path": str(wireguard_file(tmp_path))},
                **extra,
            }
        }
    )


def test_every_address_is_classified_and_matched(commands: Commands, tmp_path: Path) -> None:
    config = networks(tmp_path, backbone={"type": "lan", "subnet": "10.200.0.0/16"})
    topology_ = detect_topology(config, netns="ns1")
    assert topology_.to_dict() == {
        "networks": [
            {"interface": "eth0", "location": "lan", "address": "192.168.1.10/24", "subnet": "192.168.1.0/24",
             "network": "production"},
            {"interface": "lo", "location": "local", "address": "127.0.0.1/8", "subnet": "127.0.0.0/8",
             "network": "local"},
            {"interface": "lo", "location": "local", "address": "::1/128", "subnet": "::1/128", "network": None},
            # no live peers for this interface: the network's config file has them
            {"interface": "ens3", "location": "wireguard", "address": "10.0.0.1/24", "subnet": "10.0.0.0/24",
             "network": "mesh", "peers_allowed_ips": ["10.0.0.9/32"]},
            # wireguard-go has no peers with allowed ips and no configured network: none
            {"interface": "tun7", "location": "wireguard", "address": "172.16.0.1/16", "subnet": "172.16.0.0/16",
             "network": None, "peers_allowed_ips": []},
            # the live peers, each once, sorted
            {"interface": "wg0", "location": "wireguard", "address": "10.9.0.1/24", "subnet": "10.9.0.0/24",
             "network": None, "peers_allowed_ips": ["10.10.0.0/16", "10.9.0.2/32"]},
        ],
        "missing": ["backbone"],
        "warnings": ["interface eth0: cannot read address 10.0.0.7/99"],
    }  # fmt: skip
    assert commands.ran == [
        ["wg", "show", "all", "dump", "netns=ns1"],
        ["ip", "-j", "-d", "addr", "show", "netns=ns1"],
    ]
    assert "c2VjcmV0" not in repr(topology_)


def test_without_wg_or_a_configuration(commands: Commands) -> None:
    commands.wg_output = None
    found = {item.interface: item.location.value for item in detect_topology().networks}
    # tun7 is WireGuard only by what `wg` says; ens3 only by the configured network
    assert found == {"lo": "local", "eth0": "lan", "wg0": "wireguard", "tun7": "lan", "ens3": "lan"}
    assert [command[0] for command in commands.ran] == ["ip"]


def test_what_cannot_be_read_is_a_warning(commands: Commands, tmp_path: Path) -> None:
    commands.wg_fails = True
    (tmp_path / "bad.conf").write_text("[Router]\n")
    (tmp_path / "binary.conf").write_bytes(b"\xff\xfe")
    config = networks(
        tmp_path,
        gone={"type": "wireguard", "subnet": "10.1.0.0/24", "config_path": str(tmp_path / "gone.conf")},
        bad={"type": "wireguard", "subnet": "10.2.0.0/24", "config_path": str(tmp_path / "bad.conf")},
        binary={"type": "wireguard", "subnet": "10.3.0.0/24", "config_path": str(tmp_path / "binary.conf")},
    )
    assert detect_topology(config).warnings == (
        "wg show failed: no permission",
        f"network 'gone': {tmp_path / 'gone.conf'} does not exist",
        f"network 'bad': {tmp_path / 'bad.conf'}: line 1: unknown section [Router]",
        f"network 'binary': cannot read {tmp_path / 'binary.conf'}: UnicodeDecodeError",
        "interface eth0: cannot read address 10.0.0.7/99",
    )


@pytest.mark.parametrize(
    ("output", "message"),
    [("not json", "is not JSON"), ({"ifname": "lo"}, "did not print a list of interfaces")],
)
def test_unreadable_ip_output_is_an_internal_error(commands: Commands, output: object, message: str) -> None:
    commands.ip_output = output if isinstance(output, str) else json.dumps(output)
    with pytest.raises(InternalError, match=message):
        detect_topology()
