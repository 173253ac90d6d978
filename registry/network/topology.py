"""Topology detection: which networks this host (or a network namespace) is actually on.

Addresses come from ``ip -j -d addr`` (JSON, no scraping); WireGuard peers from ``wg show``
and from the networks' wg-quick files. Each address is matched to a configured network.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import netaddr

from ..exceptions import ConfigError, InternalError
from ..model import DetectedNetwork, Location, Topology
from .config import Network, NetworkConfig

__all__ = ["DetectedNetwork", "Topology", "WireGuardConfig", "detect_topology", "parse_wireguard_config"]


@dataclass(frozen=True, slots=True)
class WireGuardConfig:
    """The parts of a wg-quick file the registry needs (never the keys)."""

    addresses: tuple[str, ...]
    peers_allowed_ips: tuple[str, ...]


_SECTION = re.compile(r"^\[(?P<name>[^\]]+)\]$")


def parse_wireguard_config(text: str, *, source: str = "wireguard config") -> WireGuardConfig:
    """Read ``[Interface] Address`` and every ``[Peer] AllowedIPs`` of a wg-quick file.

    Written by hand because the format repeats ``[Peer]`` sections, which configparser
    cannot represent. Private and preshared keys are skipped, never stored or echoed.
    """
    wanted: dict[tuple[str, str], list[str]] = {("interface", "address"): [], ("peer", "allowedips"): []}
    section: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        where = f"{source}: line {number}"
        match = _SECTION.match(line)
        if match:
            section = _section(match.group("name"), where)
        elif line:
            key, value = _setting(line, section, where)
            target = wanted.get((section or "", key))
            if target is not None:
                target.extend(_networks(value, where))
    return WireGuardConfig(tuple(wanted["interface", "address"]), tuple(wanted["peer", "allowedips"]))


def _section(name: str, where: str) -> str:
    section = name.strip().lower()
    if section not in ("interface", "peer"):
        raise ConfigError(f"{where}: unknown section [{name}]", field="config_path")
    return section


def _setting(line: str, section: str | None, where: str) -> tuple[str, str]:
    """``(key in lower case, value)``; errors name the key at most, never a value (it may be a key)."""
    key, separator, value = line.partition("=")
    if not separator:
        raise ConfigError(f"{where}: expected 'Key = Value'", field="config_path")
    key = key.strip().lower()
    if section is None:
        raise ConfigError(f"{where}: {key!r} is outside any section", field="config_path")
    return key, value


def _networks(value: str, where: str) -> list[str]:
    """The comma-separated addresses or CIDRs of an Address or AllowedIPs line."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    for item in items:
        try:
            netaddr.IPNetwork(item)
        except (netaddr.AddrFormatError, ValueError):
            raise ConfigError(f"{where}: {item!r} is not an address or CIDR", field="config_path") from None
    return items


_TIMEOUT: Final = 10  # seconds for one ip/wg command


def detect_topology(config: NetworkConfig | None = None, *, netns: str | None = None) -> Topology:
    """The local, LAN and WireGuard networks this host (or network namespace) is on.

    An interface is WireGuard when its link kind is ``wireguard`` (kernel), when ``wg``
    knows it (wireguard-go runs as a tun device), or when its address lies in a
    configured wireguard network. Each address is matched to a configured network.
    """
    config = config if config is not None else NetworkConfig()
    warnings: list[str] = []
    interfaces, live = _live_peers(netns, warnings)
    wireguard = _WireGuard(interfaces, live, _file_peers(config, warnings))
    links = [_Link.of(interface, wireguard) for interface in _interfaces(netns)]
    found = [_detected(link, cidr, config, wireguard) for link in links for cidr in _addresses(link, warnings)]
    return _topology(found, config, warnings)


@dataclass(frozen=True, slots=True)
class _WireGuard:
    """What is known about WireGuard before the addresses are read."""

    interfaces: frozenset[str]  # the ones ``wg`` knows
    live: Mapping[str, list[str]]  # interface -> its peers' AllowedIPs, from ``wg show``
    files: Mapping[str, list[str]]  # configured network -> its peers' AllowedIPs, from its config_path

    def allowed_ips(self, interface: str, network: Network | None) -> tuple[str, ...]:
        """The live interface's peers win; the config file is the fallback when it has none."""
        peers = self.live.get(interface) or (self.files.get(network.name, []) if network is not None else [])
        return tuple(sorted(set(peers)))


@dataclass(frozen=True, slots=True)
class _Link:
    """One interface from ``ip -j -d addr``."""

    name: str
    is_loopback: bool
    is_wireguard: bool
    addr_info: list[dict[str, Any]]

    @classmethod
    def of(cls, interface: Mapping[str, Any], wireguard: _WireGuard) -> _Link:
        name = str(interface.get("ifname", "?"))
        kind = (interface.get("linkinfo") or {}).get("info_kind")
        return cls(
            name=name,
            is_loopback=interface.get("link_type") == "loopback" or "LOOPBACK" in interface.get("flags", []),
            is_wireguard=kind == "wireguard" or name in wireguard.interfaces,
            addr_info=interface.get("addr_info", []),
        )


def _run(command: list[str], netns: str | None) -> subprocess.CompletedProcess[str]:
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except FileNotFoundError:
        raise InternalError(f"{command[0]} is not installed (it is needed to detect the topology)") from None
    except subprocess.TimeoutExpired:
        raise InternalError(f"{' '.join(command)} did not answer within {_TIMEOUT} s") from None


def _live_peers(netns: str | None, warnings: list[str]) -> tuple[frozenset[str], dict[str, list[str]]]:
    """The WireGuard interface names ``wg`` knows, and each one's peers' AllowedIPs."""
    if shutil.which("wg") is None:
        return frozenset(), {}
    result = _run(["wg", "show", "all", "dump"], netns)
    if result.returncode != 0:
        warnings.append(f"wg show failed: {result.stderr.strip() or result.returncode}")
        return frozenset(), {}
    peers: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        fields = line.split("\t")
        # interface lines have 5 fields (name, private key, public key, port, fwmark);
        # peer lines 9 (name, public key, psk, endpoint, allowed ips, handshake, rx, tx, keepalive).
        if len(fields) == 5:
            peers.setdefault(fields[0], [])
        elif len(fields) == 9:
            peers.setdefault(fields[0], []).extend(item for item in fields[4].split(",") if item and item != "(none)")
    return frozenset(peers), peers


def _file_peers(config: NetworkConfig, warnings: list[str]) -> dict[str, list[str]]:
    """Each configured wireguard network's peers' AllowedIPs, from its config_path file."""
    peers: dict[str, list[str]] = {}
    for network in config.by_location(Location.WIREGUARD):
        parsed = _read_wireguard_file(network, warnings)
        if parsed is not None:
            peers[network.name] = list(parsed.peers_allowed_ips)
    return peers


def _read_wireguard_file(network: Network, warnings: list[str]) -> WireGuardConfig | None:
    """The network's wg-quick file, or None (with a warning when it cannot be read)."""
    path = network.config_path
    if path is None:
        return None
    try:
        return parse_wireguard_config(path.read_text(encoding="utf-8"), source=str(path))
    except FileNotFoundError:
        warnings.append(f"network {network.name!r}: {path} does not exist")
    except (OSError, UnicodeDecodeError) as exc:
        warnings.append(f"network {network.name!r}: cannot read {path}: {exc.__class__.__name__}")
    except ConfigError as exc:
        warnings.append(f"network {network.name!r}: {exc.message}")
    return None


def _interfaces(netns: str | None) -> list[dict[str, Any]]:
    result = _run(["ip", "-j", "-d", "addr", "show"], netns)
    if result.returncode != 0:
        raise InternalError(f"ip addr failed: {result.stderr.strip() or result.returncode}")
    try:
        data = json.loads(result.stdout or "[]")
    except json.JSONDecodeError as exc:
        raise InternalError(f"ip -j addr printed something that is not JSON: {exc}") from None
    if not isinstance(data, list):
        raise InternalError("ip -j addr did not print a list of interfaces")
    return data


def _addresses(link: _Link, warnings: list[str]) -> Iterator[netaddr.IPNetwork]:
    """The link's addresses as ``ip/prefixlen``; link-local ones are not a network to report."""
    for info in link.addr_info:
        local, prefixlen = info.get("local"), info.get("prefixlen")
        if local is None or prefixlen is None or info.get("scope") == "link":
            continue
        try:
            cidr = netaddr.IPNetwork(f"{local}/{prefixlen}")
        except (netaddr.AddrFormatError, ValueError):
            warnings.append(f"interface {link.name}: cannot read address {local}/{prefixlen}")
            continue
        yield cidr


def _location(link: _Link, cidr: netaddr.IPNetwork, network: Network | None) -> Location:
    if link.is_loopback or cidr.ip.is_loopback():
        return Location.LOCAL
    if link.is_wireguard or (network is not None and network.type is Location.WIREGUARD):
        return Location.WIREGUARD
    return Location.LAN


def _detected(link: _Link, cidr: netaddr.IPNetwork, config: NetworkConfig, wireguard: _WireGuard) -> DetectedNetwork:
    """One address, classified and matched to its configured network."""
    network = config.classify(str(cidr.ip))
    location = _location(link, cidr, network)
    return DetectedNetwork(
        interface=link.name,
        location=location,
        address=f"{cidr.ip}/{cidr.prefixlen}",
        subnet=str(cidr.cidr),
        network=network.name if network is not None else None,
        peers_allowed_ips=wireguard.allowed_ips(link.name, network) if location is Location.WIREGUARD else (),
    )


def _topology(found: list[DetectedNetwork], config: NetworkConfig, warnings: list[str]) -> Topology:
    """Sorted, so that equal topologies give equal dicts; ``missing`` in configuration order."""
    found.sort(key=lambda item: (item.location.value, item.interface, item.address))
    present = {item.network for item in found}
    missing = tuple(name for name in config.networks if name not in present)
    return Topology(tuple(found), missing, tuple(warnings))
