"""Topology detection against real interfaces: network namespaces, veth and wireguard-go.

These tests need root, iproute2, wireguard-tools and wireguard-go (scripts/ensure-system-deps
installs them). When something is missing they fail and say what; they never skip.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from registry import EventType, InternalError, Location, NetworkConfig, Registry, detect_topology

pytestmark = pytest.mark.netns

_counter = itertools.count()


def _require_tools() -> None:
    missing = [tool for tool in ("ip", "wg", "wireguard-go") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"topology tests need {', '.join(missing)}: run scripts/ensure-system-deps (as root)")
    if os.geteuid() != 0:
        pytest.fail("topology tests need root for network namespaces (run make test as root)")
    if not Path("/dev/net/tun").exists():
        pytest.fail("topology tests need /dev/net/tun for wireguard-go")


def sh(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


@dataclass
class Lab:
    """Two namespaces joined by a veth pair; ``host`` also runs a wireguard-go interface."""

    host: str
    peer: str
    tmp: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.host, *args)

    def start_wireguard(self, name: str, address: str, peers: dict[str, str]) -> None:
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.host, "wireguard-go", name],
            env={**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(process)
        deadline = time.monotonic() + 10
        while name not in self.ip("-o", "link", "show"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"wireguard-go did not create {name} (exit {process.poll()})")
            time.sleep(0.05)
        key = self.tmp / f"{name}.key"
        key.write_text(sh("wg", "genkey"))
        key.chmod(0o600)
        command = ["ip", "netns", "exec", self.host, "wg", "set", name, "private-key", str(key), "listen-port", "0"]
        for public_source, allowed in peers.items():
            public = subprocess.run(["wg", "pubkey"], input=public_source, capture_output=True, text=True, check=True)
            command += ["peer", public.stdout.strip(), "allowed-ips", allowed]
        sh(*command)
        self.ip("addr", "add", address, "dev", name)
        self.ip("link", "set", name, "up")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    _require_tools()
    suffix = f"{os.getpid()}-{next(_counter)}"
    lab = Lab(host=f"svt-h-{suffix}", peer=f"svt-p-{suffix}", tmp=tmp_path)
    sh("ip", "netns", "add", lab.host)
    try:
        sh("ip", "netns", "add", lab.peer)
        lab.ip("link", "set", "lo", "up")
        lab.ip("link", "add", "veth-h", "type", "veth", "peer", "name", "veth-p", "netns", lab.peer)
        lab.ip("addr", "add", "192.168.77.2/24", "dev", "veth-h")
        lab.ip("link", "set", "veth-h", "up")
        sh("ip", "-n", lab.peer, "addr", "add", "192.168.77.3/24", "dev", "veth-p")
        sh("ip", "-n", lab.peer, "link", "set", "veth-p", "up")
        yield lab
    finally:
        for process in lab.processes:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
        for namespace in (lab.host, lab.peer):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


def lab_config(tmp_path: Path, *, wg_file: bool = True) -> NetworkConfig:
    config_path = tmp_path / "wg0.conf"
    if wg_file:
        config_path.write_text(
            textwrap.dedent(
                """
                [Interface]
                PrivateKey = c2VjcmV0IGtleSB0aGF0IG11c3Qgbm90IGxlYWsgYW55d2hlcmU=
                Address = 10.77.0.1/24

                [Peer]
                PublicKey = cHVibGljIGtleSBvbmUgICAgICAgICAgICAgICAgICAgICA=
                AllowedIPs = 10.77.0.9/32
                """
            )
        )
    return NetworkConfig.from_dict(
        {
            "networks": {
                "local": {"type": "local", "subnet": "127.0.0.0/8"},
                "lab": {"type": "lan", "subnet": "192.168.77.0/24"},
                "mesh": {"type": "wireguard", "subnet": "10.77.0.0/24", "config_path": str(config_path)},
            }
        }
    )


def test_detects_local_lan_and_wireguard(lab: Lab, tmp_path: Path) -> None:
    lab.start_wireguard("wgt0", "10.77.0.1/24", {sh("wg", "genkey"): "10.77.0.2/32,10.88.0.0/16"})
    lab.ip("addr", "add", "172.31.5.1/24", "dev", "veth-h")  # an address in no configured network
    topology = detect_topology(lab_config(tmp_path), netns=lab.host)
    assert topology.to_dict() == {
        "networks": [
            {
                "interface": "veth-h",
                "location": "lan",
                "address": "172.31.5.1/24",
                "subnet": "172.31.5.0/24",
                "network": None,
            },
            {
                "interface": "veth-h",
                "location": "lan",
                "address": "192.168.77.2/24",
                "subnet": "192.168.77.0/24",
                "network": "lab",
            },
            {
                "interface": "lo",
                "location": "local",
                "address": "127.0.0.1/8",
                "subnet": "127.0.0.0/8",
                "network": "local",
            },
            {"interface": "lo", "location": "local", "address": "::1/128", "subnet": "::1/128", "network": None},
            {
                "interface": "wgt0",
                "location": "wireguard",
                "address": "10.77.0.1/24",
                "subnet": "10.77.0.0/24",
                "network": "mesh",
                # from the live interface (wg show dump), which wins over the config file
                "peers_allowed_ips": ["10.77.0.2/32", "10.88.0.0/16"],
            },
        ],
        "missing": [],
        "warnings": [],
    }
    assert [item.interface for item in topology.by_location(Location.WIREGUARD)] == ["wgt0"]
    assert "c2VjcmV0" not in repr(topology)


def test_wireguard_by_kind_of_link_even_when_not_configured(lab: Lab, tmp_path: Path) -> None:
    lab.start_wireguard("wgx", "10.99.0.1/24", {})
    topology = detect_topology(NetworkConfig(), netns=lab.host)
    [wireguard] = topology.by_location("wireguard")
    assert (wireguard.interface, wireguard.subnet, wireguard.network) == ("wgx", "10.99.0.0/24", None)
    assert wireguard.peers_allowed_ips == ()


def test_config_file_peers_when_the_interface_has_none(lab: Lab, tmp_path: Path) -> None:
    lab.start_wireguard("wgt0", "10.77.0.1/24", {})
    [wireguard] = detect_topology(lab_config(tmp_path), netns=lab.host).by_location("wireguard")
    assert wireguard.peers_allowed_ips == ("10.77.0.9/32",)


def test_missing_networks_and_unreadable_wireguard_file_are_reported(lab: Lab, tmp_path: Path) -> None:
    topology = detect_topology(lab_config(tmp_path, wg_file=False), netns=lab.host)
    assert topology.missing == ("mesh",)
    assert topology.warnings == (f"network 'mesh': {tmp_path / 'wg0.conf'} does not exist",)


def test_link_local_addresses_are_ignored(lab: Lab) -> None:
    lab.ip("addr", "add", "fe80::1234/64", "dev", "veth-h")
    addresses = [item.address for item in detect_topology(netns=lab.host).networks]
    assert not any(address.startswith("fe80") for address in addresses)
    assert "192.168.77.2/24" in addresses


def test_a_topology_change_emits_one_event(lab: Lab, tmp_path: Path) -> None:
    config = lab_config(tmp_path)
    registry = Registry(networks=config)
    subscription = registry.subscribe([EventType.NETWORK_TOPOLOGY_CHANGED])
    first = registry.update_topology(detect_topology(config, netns=lab.host).to_dict())
    assert first is not None and first.type is EventType.NETWORK_TOPOLOGY_CHANGED
    assert registry.update_topology(detect_topology(config, netns=lab.host).to_dict()) is None  # unchanged
    lab.start_wireguard("wgt0", "10.77.0.1/24", {})
    second = registry.update_topology(detect_topology(config, netns=lab.host).to_dict())
    assert second is not None and second.revision == first.revision + 1
    events = [subscription.get(timeout=1), subscription.get(timeout=1)]
    assert [event.revision for event in events] == [first.revision, second.revision]
    assert "mesh" in {item["network"] for item in events[1].data["topology"]["networks"]}
    assert "mesh" in events[0].data["topology"]["missing"]
    registry.close()


def test_unknown_namespace_is_a_clear_error() -> None:
    _require_tools()
    with pytest.raises(InternalError, match=r"ip addr failed: .*svt-does-not-exist"):
        detect_topology(netns="svt-does-not-exist")
