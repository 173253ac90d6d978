"""Networks from ``services.yaml``, IP allocation inside them, and topology detection.

Three parts, each usable on its own:

* :class:`NetworkConfig` - the ``networks:`` section of ``services.yaml`` (the seed's
  format), validated as a whole: every error names the network and the field.
* :class:`NetworkManager` - hands out addresses inside those networks, one per
  ``(owner, network)``, persisted in the store's ``allocations`` table. Lowest free
  address first; O(1) amortised (a forward cursor plus a heap of released addresses);
  thread-safe; durable when it returns.
* :func:`detect_topology` - what networks this host is actually on, read from
  ``ip -j -d addr`` (JSON, no scraping), ``wg show`` and the WireGuard config files.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import netaddr
import yaml

from .exceptions import ConfigError, Conflict, InternalError, NotFound, PoolExhausted, ValidationError
from .model import Location, validate_host_id, validate_ip, validate_network_name
from .store import MemoryStore, Store

__all__ = [
    "Allocation",
    "DetectedNetwork",
    "Network",
    "NetworkConfig",
    "NetworkManager",
    "Node",
    "Topology",
    "detect_topology",
    "parse_wireguard_config",
]

_NETWORK_KEYS: Final = frozenset({"type", "subnet", "nodes", "config_path", "gateway", "reserved", "description"})
_NODE_REQUIRED: Final = ("host", "name")
_MAX_OWNER: Final = 253
_ALLOCATIONS: Final = "allocations"


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class Node:
    """A machine in a network. Keys other than host/name/ssh_user are kept as ``vars``
    (they become host variables in the Ansible inventory)."""

    name: str
    host: str
    ssh_user: str | None = None
    vars: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "host": self.host}
        if self.ssh_user is not None:
            data["ssh_user"] = self.ssh_user
        data.update(self.vars)
        return data


@dataclass(frozen=True, slots=True)
class Network:
    """One configured network."""

    name: str
    type: Location
    subnet: netaddr.IPNetwork
    nodes: tuple[Node, ...] = ()
    config_path: Path | None = None
    gateway: netaddr.IPAddress | None = None
    reserved: tuple[netaddr.IPRange, ...] = ()
    description: str | None = None

    def contains(self, ip: str | netaddr.IPAddress) -> bool:
        try:
            address = ip if isinstance(ip, netaddr.IPAddress) else netaddr.IPAddress(ip)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            return False
        return address.version == self.subnet.version and self.subnet.first <= int(address) <= self.subnet.last

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen

    def reserved_ranges(self) -> list[tuple[int, int]]:
        """Inclusive integer ranges never handed out: the network and broadcast addresses,
        the gateway, node addresses and the ``reserved`` entries, merged and sorted."""
        ranges: list[tuple[int, int]] = []
        if not _is_point_to_point(self.subnet):
            ranges.append((self.subnet.first, self.subnet.first))  # network / subnet-router anycast
            if self.subnet.version == 4:
                ranges.append((self.subnet.last, self.subnet.last))  # broadcast
        if self.gateway is not None:
            ranges.append((int(self.gateway), int(self.gateway)))
        ranges.extend((int(netaddr.IPAddress(node.host)), int(netaddr.IPAddress(node.host))) for node in self.nodes)
        ranges.extend((item.first, item.last) for item in self.reserved)
        return _merge(ranges)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "type": self.type.value,
            "subnet": str(self.subnet),
            "gateway": str(self.gateway) if self.gateway is not None else None,
            "nodes": [node.to_dict() for node in self.nodes],
        }
        if self.config_path is not None:
            data["config_path"] = str(self.config_path)
        if self.reserved:
            data["reserved"] = [_range_text(item) for item in self.reserved]
        if self.description is not None:
            data["description"] = self.description
        return data


def _is_point_to_point(subnet: netaddr.IPNetwork) -> bool:
    """/31 and /32 (RFC 3021), /127 and /128: every address is usable, no gateway."""
    return subnet.prefixlen >= (31 if subnet.version == 4 else 127)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _range_text(item: netaddr.IPRange) -> str:
    if item.first == item.last:
        return str(netaddr.IPAddress(item.first, item.version))
    cidrs = item.cidrs()
    if len(cidrs) == 1:
        return str(cidrs[0])
    return f"{netaddr.IPAddress(item.first, item.version)}-{netaddr.IPAddress(item.last, item.version)}"


class NetworkConfig:
    """The configured networks, keyed by name (in file order)."""

    def __init__(self, networks: Iterable[Network] = (), *, source: str | None = None) -> None:
        self.source = source
        self.networks: dict[str, Network] = {}
        for network in networks:
            if network.name in self.networks:
                raise ConfigError(f"{self._where()}network {network.name!r} is defined twice", field="networks")
            self.networks[network.name] = network
        self._check_overlaps()
        # classify() runs for every registration and connection: keep it to a bisect-free
        # scan over a handful of integer pairs.
        self._ranges = sorted(
            ((n.subnet.version, n.subnet.first, n.subnet.last, n) for n in self.networks.values()),
            key=lambda item: (item[0], item[1]),
        )

    # -- loading

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> NetworkConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"networks file {path} does not exist", field="networks") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read networks file {path}: {exc}", field="networks") from None
        return cls.from_yaml(text, source=str(path))

    @classmethod
    def from_yaml(cls, text: str, *, source: str | None = None) -> NetworkConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = f"{source}: " if source else ""
            mark = getattr(exc, "problem_mark", None)
            position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{where}invalid YAML{position}: {problem}", field="networks") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: object, *, source: str | None = None) -> NetworkConfig:
        where = f"{source}: " if source else ""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}the top level must be a mapping with a 'networks' key", field="networks")
        networks = data.get("networks", {})
        if networks is None:
            networks = {}
        if not isinstance(networks, Mapping):
            raise ConfigError(
                f"{where}'networks' must be a mapping of network name to settings, not {type(networks).__name__}",
                field="networks",
            )
        parsed = [_parse_network(name, settings, where) for name, settings in networks.items()]
        return cls(parsed, source=source)

    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    def _check_overlaps(self) -> None:
        items = sorted(self.networks.values(), key=lambda n: (n.subnet.version, n.subnet.first))
        for before, after in itertools.pairwise(items):
            if before.subnet.version == after.subnet.version and after.subnet.first <= before.subnet.last:
                raise ConfigError(
                    f"{self._where()}network {after.name!r}: subnet {after.subnet} overlaps "
                    f"network {before.name!r} ({before.subnet})",
                    field=f"networks.{after.name}.subnet",
                )
        seen: dict[str, str] = {}
        for network in self.networks.values():
            for node in network.nodes:
                if node.name in seen:
                    raise ConfigError(
                        f"{self._where()}network {network.name!r}: node name {node.name!r} is already used "
                        f"in network {seen[node.name]!r}",
                        field=f"networks.{network.name}.nodes",
                    )
                seen[node.name] = network.name

    # -- queries

    def get(self, name: str) -> Network:
        try:
            return self.networks[name]
        except KeyError:
            known = ", ".join(self.networks) or "none"
            raise NotFound(f"network {name!r} is not configured (known: {known})", details={"network": name}) from None

    def by_location(self, location: Location | str) -> list[Network]:
        location = Location(location)
        return [network for network in self.networks.values() if network.type is location]

    def resolve(self, network_or_location: str | Location) -> Network:
        """A network by name, or the only network of a location (``lan``, ``wireguard``...)."""
        if not isinstance(network_or_location, Location) and network_or_location in self.networks:
            return self.networks[network_or_location]
        try:
            location = Location(network_or_location)
        except ValueError:
            return self.get(str(network_or_location))
        candidates = self.by_location(location)
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise NotFound(f"no {location.value} network is configured", details={"network": location.value})
        names = ", ".join(network.name for network in candidates)
        raise ValidationError(
            f"there are several {location.value} networks ({names}): name the one you mean",
            field="network",
        )

    def classify(self, ip: str | netaddr.IPAddress) -> Network | None:
        """The configured network ``ip`` is in, or None."""
        try:
            address = ip if isinstance(ip, netaddr.IPAddress) else netaddr.IPAddress(str(ip).split("%", 1)[0])
        except (netaddr.AddrFormatError, ValueError, TypeError):
            return None
        if address.version == 6 and address.is_ipv4_mapped():
            address = address.ipv4()
        value, version = int(address), address.version
        for net_version, first, last, network in self._ranges:
            if net_version == version and first <= value <= last:
                return network
        return None

    def nodes(self) -> Iterator[tuple[Network, Node]]:
        for network in self.networks.values():
            for node in network.nodes:
                yield network, node

    def find_node(self, name: str) -> tuple[Network, Node] | None:
        for network, node in self.nodes():
            if node.name == name:
                return network, node
        return None

    def to_dict(self) -> dict[str, Any]:
        """The ``services.yaml`` form (reads back with :meth:`from_dict`)."""
        networks = {}
        for name, network in self.networks.items():
            settings = network.to_dict()
            del settings["name"]
            networks[name] = settings
        return {"networks": networks}

    def __len__(self) -> int:
        return len(self.networks)

    def __repr__(self) -> str:
        return f"NetworkConfig({', '.join(self.networks)})"


def _parse_network(name: object, settings: object, where: str) -> Network:
    try:
        name = validate_network_name(name, "network name")
    except ValidationError as exc:
        raise ConfigError(f"{where}{exc.message}", field="networks") from None
    prefix = f"{where}network {name!r}"
    path = f"networks.{name}"
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{prefix}: settings must be a mapping (type, subnet, ...)", field=path)
    unknown = sorted(str(key) for key in settings if key not in _NETWORK_KEYS)
    if unknown:
        raise ConfigError(
            f"{prefix}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_NETWORK_KEYS))})",
            field=f"{path}.{unknown[0]}",
        )
    if "type" not in settings:
        raise ConfigError(f"{prefix}: 'type' is required (local, lan or wireguard)", field=f"{path}.type")
    try:
        kind = Location(settings["type"])
    except (ValueError, TypeError):
        raise ConfigError(
            f"{prefix}: unknown type {settings['type']!r} (use local, lan or wireguard)", field=f"{path}.type"
        ) from None
    subnet = _parse_subnet(settings.get("subnet"), prefix, f"{path}.subnet")
    if kind is Location.LOCAL and not subnet.is_loopback():
        raise ConfigError(
            f"{prefix}: a local network must be a loopback subnet (127.0.0.0/8 or ::1/128), not {subnet}",
            field=f"{path}.subnet",
        )
    gateway = _parse_gateway(settings, subnet, prefix, f"{path}.gateway")
    reserved = _parse_reserved(settings.get("reserved"), subnet, prefix, f"{path}.reserved")
    config_path: Path | None = None
    if settings.get("config_path") is not None:
        if kind is not Location.WIREGUARD:
            raise ConfigError(f"{prefix}: config_path is only for wireguard networks", field=f"{path}.config_path")
        if not isinstance(settings["config_path"], str) or not settings["config_path"].strip():
            raise ConfigError(f"{prefix}: config_path must be a file path", field=f"{path}.config_path")
        config_path = Path(settings["config_path"])
    description = settings.get("description")
    if description is not None and not isinstance(description, str):
        raise ConfigError(f"{prefix}: description must be a string", field=f"{path}.description")
    nodes = _parse_nodes(settings.get("nodes"), subnet, gateway, prefix, f"{path}.nodes")
    return Network(name, kind, subnet, nodes, config_path, gateway, reserved, description)


def _parse_subnet(value: object, prefix: str, path: str) -> netaddr.IPNetwork:
    if value is None:
        raise ConfigError(f"{prefix}: 'subnet' is required (a CIDR such as 192.168.1.0/24)", field=path)
    if not isinstance(value, str) or "/" not in value:
        raise ConfigError(f"{prefix}: subnet {value!r} is not a CIDR (expected e.g. 192.168.1.0/24)", field=path)
    try:
        subnet = netaddr.IPNetwork(value.strip())
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise ConfigError(f"{prefix}: subnet {value!r} is not a valid CIDR", field=path) from None
    if subnet.ip != subnet.network:
        raise ConfigError(f"{prefix}: subnet {value!r} has host bits set (did you mean {subnet.cidr}?)", field=path)
    return subnet


def _parse_address_in(value: object, subnet: netaddr.IPNetwork, prefix: str, path: str, what: str) -> netaddr.IPAddress:
    if not isinstance(value, str):
        raise ConfigError(f"{prefix}: {what} {value!r} is not an IP address", field=path)
    try:
        address = netaddr.IPAddress(validate_ip(value.strip(), path).compressed)
    except ValidationError:
        raise ConfigError(f"{prefix}: {what} {value!r} is not a valid IP address", field=path) from None
    if address.version != subnet.version or not subnet.first <= int(address) <= subnet.last:
        raise ConfigError(f"{prefix}: {what} {value} is outside the subnet {subnet}", field=path)
    return address


def _parse_gateway(
    settings: Mapping[str, Any], subnet: netaddr.IPNetwork, prefix: str, path: str
) -> netaddr.IPAddress | None:
    if "gateway" in settings:
        value = settings["gateway"]
        if value is None or value is False:
            return None
        return _parse_address_in(value, subnet, prefix, path, "gateway")
    if _is_point_to_point(subnet):
        return None
    return netaddr.IPAddress(subnet.first + 1, subnet.version)  # the seed: .1 is the gateway


def _parse_reserved(value: object, subnet: netaddr.IPNetwork, prefix: str, path: str) -> tuple[netaddr.IPRange, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{prefix}: reserved must be a list of addresses, CIDRs or first-last ranges", field=path)
    result = []
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        if not isinstance(item, str):
            raise ConfigError(f"{prefix}: reserved entry {item!r} is not a string", field=item_path)
        try:
            if "-" in item:
                first, last = (part.strip() for part in item.split("-", 1))
                span = netaddr.IPRange(first, last)
            elif "/" in item:
                cidr = netaddr.IPNetwork(item.strip())
                span = netaddr.IPRange(cidr.first, cidr.last)
            else:
                address = netaddr.IPAddress(item.strip())
                span = netaddr.IPRange(address, address)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            raise ConfigError(
                f"{prefix}: reserved entry {item!r} is not an address, CIDR or range", field=item_path
            ) from None
        if span.version != subnet.version or span.first < subnet.first or span.last > subnet.last:
            raise ConfigError(f"{prefix}: reserved entry {item!r} is outside the subnet {subnet}", field=item_path)
        result.append(span)
    return tuple(result)


def _parse_nodes(
    value: object, subnet: netaddr.IPNetwork, gateway: netaddr.IPAddress | None, prefix: str, path: str
) -> tuple[Node, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{prefix}: nodes must be a list of {{host, name, ...}} mappings", field=path)
    nodes: list[Node] = []
    names: set[str] = set()
    hosts: dict[str, str] = {}
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{prefix}: node #{index + 1} must be a mapping with host and name", field=item_path)
        missing = [key for key in _NODE_REQUIRED if key not in item]
        if missing:
            raise ConfigError(f"{prefix}: node #{index + 1} is missing {', '.join(missing)}", field=item_path)
        try:
            name = validate_host_id(item["name"], "name")
        except ValidationError as exc:
            raise ConfigError(f"{prefix}: node #{index + 1}: {exc.message}", field=f"{item_path}.name") from None
        host = str(_parse_address_in(item["host"], subnet, f"{prefix}: node {name!r}", f"{item_path}.host", "host"))
        if name in names:
            raise ConfigError(f"{prefix}: duplicate node name {name!r}", field=f"{item_path}.name")
        if host in hosts:
            raise ConfigError(
                f"{prefix}: node {name!r} has the same host {host} as node {hosts[host]!r}", field=f"{item_path}.host"
            )
        if gateway is not None and host == str(gateway):
            raise ConfigError(f"{prefix}: node {name!r} has the gateway's address {host}", field=f"{item_path}.host")
        ssh_user = item.get("ssh_user")
        if ssh_user is not None and (not isinstance(ssh_user, str) or not ssh_user.strip()):
            raise ConfigError(
                f"{prefix}: node {name!r}: ssh_user must be a non-empty string", field=f"{item_path}.ssh_user"
            )
        extra = {str(key): val for key, val in item.items() if key not in ("host", "name", "ssh_user")}
        try:
            json.dumps(extra)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{prefix}: node {name!r}: extra keys must be plain strings, numbers, lists or mappings",
                field=item_path,
            ) from None
        names.add(name)
        hosts[host] = name
        nodes.append(Node(name, host, ssh_user, extra))
    return tuple(nodes)


# --------------------------------------------------------------------------- allocation


@dataclass(frozen=True, slots=True)
class Allocation:
    """An address handed to ``owner`` in ``network``."""

    owner: str
    network: str
    ip: str
    prefixlen: int

    @property
    def key(self) -> str:
        return f"{self.network}/{self.owner}"

    def to_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "network": self.network, "ip": self.ip, "prefixlen": self.prefixlen}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        return cls(str(data["owner"]), str(data["network"]), str(data["ip"]), int(data["prefixlen"]))


def validate_owner(value: object) -> str:
    """Owners are free-form names (a service, a host, ``service@host``), printable, no '/'."""
    if not isinstance(value, str):
        raise ValidationError(f"owner must be a string, not {type(value).__name__}", field="owner")
    if not value or len(value) > _MAX_OWNER:
        raise ValidationError(f"owner must be 1-{_MAX_OWNER} characters", field="owner")
    if not value.isprintable() or "/" in value or value != value.strip():
        raise ValidationError(
            f"owner {value!r} is invalid: no '/', control characters or surrounding spaces", field="owner"
        )
    return value


class _Pool:
    """The free addresses of one network.

    Everything below ``cursor`` is in use except the addresses in ``freed`` (a min-heap,
    lazily cleaned); the lowest free address is ``freed[0]`` if any, else the first
    unused address at or above ``cursor``. Each address is passed by the cursor once, so
    allocating a whole subnet is linear.
    """

    def __init__(self, network: Network) -> None:
        self.network = network
        self.first = network.subnet.first
        self.last = network.subnet.last
        self.reserved = network.reserved_ranges()
        self.used: dict[int, str] = {}  # address -> owner
        self.cursor = self.first
        self.freed: list[int] = []
        self._reserved_index = 0

    def is_reserved(self, value: int) -> bool:
        return any(first <= value <= last for first, last in self.reserved)

    def take(self) -> int:
        while self.freed:
            value = heapq.heappop(self.freed)
            if value not in self.used:
                return value
        value = self.cursor
        reserved = self.reserved
        index = self._reserved_index
        while value <= self.last:
            while index < len(reserved) and reserved[index][1] < value:
                index += 1
            if index < len(reserved) and reserved[index][0] <= value:
                value = reserved[index][1] + 1
                continue
            if value in self.used:
                value += 1
                continue
            break
        self._reserved_index = index
        if value > self.last:
            self.cursor = value
            raise PoolExhausted(
                f"network {self.network.name!r} ({self.network.subnet}) has no free address left",
                details={"network": self.network.name, "subnet": str(self.network.subnet), "allocated": len(self.used)},
            )
        self.cursor = value + 1
        return value

    def give_back(self, value: int) -> None:
        self.used.pop(value, None)
        if value < self.cursor:
            heapq.heappush(self.freed, value)

    def free_count(self) -> int:
        reserved = sum(last - first + 1 for first, last in self.reserved)
        return (self.last - self.first + 1) - reserved - len(self.used)


class NetworkManager:
    """IP allocation inside the configured networks, persisted in ``store``.

    ``allocate_ip(owner, network)`` returns the owner's address in that network, handing
    out the lowest free one the first time. Safe from any thread; a call that returns
    has been committed to the store.
    """

    def __init__(self, config: NetworkConfig, store: Store | None = None) -> None:
        self.config = config
        self.store: Store = store if store is not None else MemoryStore()
        self._lock = threading.Lock()
        self._pools = {name: _Pool(network) for name, network in config.networks.items()}
        self._by_key: dict[str, Allocation] = {}
        self._orphans: list[dict[str, Any]] = []
        self._load()

    def _load(self) -> None:
        for key, value in self.store.scan(_ALLOCATIONS):
            try:
                allocation = Allocation.from_dict(value)
            except (KeyError, TypeError, ValueError, AttributeError):
                self._orphans.append({"key": key, "allocation": value, "reason": "unreadable record"})
                continue
            pool = self._pools.get(allocation.network)
            reason = None
            if pool is None:
                reason = f"network {allocation.network!r} is no longer configured"
            elif not pool.network.contains(allocation.ip):
                reason = f"{allocation.ip} is outside {allocation.network}'s subnet {pool.network.subnet}"
            else:
                value_int = int(netaddr.IPAddress(allocation.ip))
                if value_int in pool.used:
                    reason = f"{allocation.ip} is also allocated to {pool.used[value_int]!r}"
                elif pool.is_reserved(value_int):
                    reason = f"{allocation.ip} is now reserved (network, gateway, broadcast, node or reserved range)"
            if reason is not None:
                self._orphans.append({"key": key, "allocation": allocation.to_dict(), "reason": reason})
                continue
            pool.used[int(netaddr.IPAddress(allocation.ip))] = allocation.owner
            self._by_key[allocation.key] = allocation
        # The pools' cursors start at the first address and walk past what is loaded here.

    def detect(self, *, netns: str | None = None) -> Topology:
        """The host's topology, matched against the configured networks."""
        return detect_topology(self.config, netns=netns)

    def allocate_ip(self, owner: str, network: str | Location, *, ip: str | None = None) -> Allocation:
        """The owner's address in ``network`` (a name, or a location with one network).

        ``ip`` asks for a specific address; it fails with ``Conflict`` if another owner
        has it or it is reserved.
        """
        return self.allocate_many([owner], network, ip=ip)[0]

    def allocate_many(
        self, owners: Sequence[str], network: str | Location, *, ip: str | None = None
    ) -> list[Allocation]:
        """Allocate for several owners with one durable commit (all or nothing)."""
        owners = [validate_owner(owner) for owner in owners]
        if ip is not None and len(owners) != 1:
            raise ValidationError("a specific ip can be requested for one owner only", field="ip")
        target = self.config.resolve(network)
        pool = self._pools[target.name]
        results: list[Allocation] = []
        new: list[Allocation] = []
        with self._lock:
            try:
                for owner in owners:
                    existing = self._by_key.get(f"{target.name}/{owner}")
                    if existing is not None:
                        if ip is not None and existing.ip != _canonical(ip, target):
                            raise Conflict(
                                f"{owner!r} already holds {existing.ip} in {target.name!r}; release it first",
                                details={"owner": owner, "network": target.name, "ip": existing.ip},
                            )
                        results.append(existing)
                        continue
                    value = self._take_specific(pool, owner, ip) if ip is not None else pool.take()
                    pool.used[value] = owner
                    allocation = Allocation(
                        owner, target.name, str(netaddr.IPAddress(value, target.subnet.version)), target.prefixlen
                    )
                    self._by_key[allocation.key] = allocation
                    new.append(allocation)
                    results.append(allocation)
                    self.store.put(_ALLOCATIONS, allocation.key, allocation.to_dict())
            except BaseException:
                self._undo(new)
                raise
        if new:
            try:
                self.store.commit()
            except BaseException:
                with self._lock:
                    self._undo(new)
                raise
        return results

    def _take_specific(self, pool: _Pool, owner: str, ip: str) -> int:
        value = int(netaddr.IPAddress(_canonical(ip, pool.network)))
        if pool.is_reserved(value):
            raise Conflict(
                f"{ip} is reserved in {pool.network.name!r} (network, gateway, broadcast, node or reserved range)",
                details={"ip": ip, "network": pool.network.name},
            )
        holder = pool.used.get(value)
        if holder is not None:
            raise Conflict(
                f"{ip} in {pool.network.name!r} is already allocated to {holder!r}",
                details={"ip": ip, "network": pool.network.name, "owner": holder},
            )
        return value

    def _undo(self, allocations: list[Allocation]) -> None:
        for allocation in allocations:
            pool = self._pools[allocation.network]
            pool.give_back(int(netaddr.IPAddress(allocation.ip)))
            self._by_key.pop(allocation.key, None)
            self.store.delete(_ALLOCATIONS, allocation.key)

    def release_ip(self, owner: str, network: str | Location | None = None) -> list[Allocation]:
        """Release the owner's address (in ``network``, or in every network).

        Returns what was released; releasing an owner without addresses returns ``[]``
        (releasing is idempotent, like a ``state: absent``).
        """
        owner = validate_owner(owner)
        names = [self.config.resolve(network).name] if network is not None else list(self._pools)
        released: list[Allocation] = []
        with self._lock:
            for name in names:
                allocation = self._by_key.pop(f"{name}/{owner}", None)
                if allocation is None:
                    continue
                self._pools[name].give_back(int(netaddr.IPAddress(allocation.ip)))
                self.store.delete(_ALLOCATIONS, allocation.key)
                released.append(allocation)
        if released:
            self.store.commit()
        return released

    def get_allocation(self, owner: str, network: str | Location) -> Allocation:
        target = self.config.resolve(network)
        allocation = self._by_key.get(f"{target.name}/{owner}")
        if allocation is None:
            raise NotFound(
                f"{owner!r} has no address in {target.name!r}", details={"owner": owner, "network": target.name}
            )
        return allocation

    def allocations(self, network: str | Location | None = None) -> list[Allocation]:
        """Current allocations, ordered by network then address."""
        name = self.config.resolve(network).name if network is not None else None
        with self._lock:
            items = [a for a in self._by_key.values() if name is None or a.network == name]
        order = {net: index for index, net in enumerate(self._pools)}
        return sorted(items, key=lambda a: (order[a.network], int(netaddr.IPAddress(a.ip))))

    def owner_of(self, ip: str) -> Allocation | None:
        network = self.config.classify(ip)
        if network is None:
            return None
        with self._lock:
            owner = self._pools[network.name].used.get(int(netaddr.IPAddress(ip)))
            return self._by_key.get(f"{network.name}/{owner}") if owner is not None else None

    def free_count(self, network: str | Location) -> int:
        target = self.config.resolve(network)
        with self._lock:
            return self._pools[target.name].free_count()

    def orphaned_allocations(self) -> list[dict[str, Any]]:
        """Stored allocations that no longer fit the configuration (kept, never reused)."""
        return list(self._orphans)


def _canonical(ip: str, network: Network) -> str:
    try:
        address = netaddr.IPAddress(validate_ip(ip, "ip").compressed)
    except ValidationError as exc:
        raise ValidationError(exc.message, field="ip") from None
    if not network.contains(address):
        raise ValidationError(f"ip {ip} is outside network {network.name!r} ({network.subnet})", field="ip")
    return str(address)


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True, slots=True)
class DetectedNetwork:
    """One address found on one interface of this host."""

    interface: str
    location: Location
    address: str  # ip/prefixlen as configured on the interface
    subnet: str
    network: str | None = None  # the configured network it belongs to
    peers_allowed_ips: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "interface": self.interface,
            "location": self.location.value,
            "address": self.address,
            "subnet": self.subnet,
            "network": self.network,
        }
        if self.location is Location.WIREGUARD:
            data["peers_allowed_ips"] = list(self.peers_allowed_ips)
        return data


@dataclass(frozen=True, slots=True)
class Topology:
    """What :func:`detect_topology` found; ``to_dict`` is stable for equal topologies."""

    networks: tuple[DetectedNetwork, ...]
    missing: tuple[str, ...] = ()  # configured networks this host has no address in
    warnings: tuple[str, ...] = ()

    def by_location(self, location: Location | str) -> list[DetectedNetwork]:
        location = Location(location)
        return [item for item in self.networks if item.location is location]

    def to_dict(self) -> dict[str, Any]:
        return {
            "networks": [item.to_dict() for item in self.networks],
            "missing": list(self.missing),
            "warnings": list(self.warnings),
        }


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
    addresses: list[str] = []
    allowed: list[str] = []
    section: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _SECTION.match(line)
        if match:
            section = match.group("name").strip().lower()
            if section not in ("interface", "peer"):
                raise ConfigError(
                    f"{source}: line {number}: unknown section [{match.group('name')}]", field="config_path"
                )
            continue
        key, separator, value = line.partition("=")
        if not separator:
            raise ConfigError(f"{source}: line {number}: expected 'Key = Value'", field="config_path")
        key = key.strip().lower()
        if section is None:
            raise ConfigError(f"{source}: line {number}: {key!r} is outside any section", field="config_path")
        if key in ("privatekey", "presharedkey"):
            continue
        target = addresses if (section, key) == ("interface", "address") else None
        if (section, key) == ("peer", "allowedips"):
            target = allowed
        if target is None:
            continue
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                netaddr.IPNetwork(item)
            except (netaddr.AddrFormatError, ValueError):
                raise ConfigError(
                    f"{source}: line {number}: {item!r} is not an address or CIDR", field="config_path"
                ) from None
            target.append(item)
    return WireGuardConfig(tuple(addresses), tuple(allowed))


def _run(command: list[str], netns: str | None) -> subprocess.CompletedProcess[str]:
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except FileNotFoundError:
        raise InternalError(f"{command[0]} is not installed (it is needed to detect the topology)") from None
    except subprocess.TimeoutExpired:
        raise InternalError(f"{' '.join(command)} did not answer within 10 s") from None


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


def _wireguard_peers(netns: str | None, warnings: list[str]) -> tuple[set[str], dict[str, list[str]]]:
    """The WireGuard interface names ``wg`` knows, and each one's peers' AllowedIPs."""
    if shutil.which("wg") is None:
        return set(), {}
    result = _run(["wg", "show", "all", "dump"], netns)
    if result.returncode != 0:
        warnings.append(f"wg show failed: {result.stderr.strip() or result.returncode}")
        return set(), {}
    names: set[str] = set()
    peers: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        fields = line.split("\t")
        # interface lines have 5 fields (name, private key, public key, port, fwmark);
        # peer lines 9 (name, public key, psk, endpoint, allowed ips, handshake, rx, tx, keepalive).
        if len(fields) == 5:
            names.add(fields[0])
            peers.setdefault(fields[0], [])
        elif len(fields) == 9:
            names.add(fields[0])
            allowed = fields[4]
            if allowed and allowed != "(none)":
                peers.setdefault(fields[0], []).extend(item for item in allowed.split(",") if item)
    return names, peers


def detect_topology(config: NetworkConfig | None = None, *, netns: str | None = None) -> Topology:
    """The local, LAN and WireGuard networks this host (or network namespace) is on.

    An interface is WireGuard when its link kind is ``wireguard`` (kernel), when ``wg``
    knows it (wireguard-go runs as a tun device), or when its address lies in a
    configured wireguard network. Each address is matched to a configured network.
    """
    config = config if config is not None else NetworkConfig()
    warnings: list[str] = []
    wg_names, wg_peers = _wireguard_peers(netns, warnings)
    file_peers: dict[str, list[str]] = {}
    for network in config.by_location(Location.WIREGUARD):
        if network.config_path is None:
            continue
        try:
            text = network.config_path.read_text(encoding="utf-8")
            parsed = parse_wireguard_config(text, source=str(network.config_path))
        except FileNotFoundError:
            warnings.append(f"network {network.name!r}: {network.config_path} does not exist")
            continue
        except (OSError, UnicodeDecodeError) as exc:
            warnings.append(f"network {network.name!r}: cannot read {network.config_path}: {exc.__class__.__name__}")
            continue
        except ConfigError as exc:
            warnings.append(f"network {network.name!r}: {exc.message}")
            continue
        file_peers[network.name] = list(parsed.peers_allowed_ips)
    found: list[DetectedNetwork] = []
    for interface in _interfaces(netns):
        name = str(interface.get("ifname", "?"))
        kind = (interface.get("linkinfo") or {}).get("info_kind")
        is_wireguard = kind == "wireguard" or name in wg_names
        is_loopback = interface.get("link_type") == "loopback" or "LOOPBACK" in interface.get("flags", [])
        for info in interface.get("addr_info", []):
            local, prefixlen = info.get("local"), info.get("prefixlen")
            if local is None or prefixlen is None or info.get("scope") == "link":
                continue
            try:
                cidr = netaddr.IPNetwork(f"{local}/{prefixlen}")
            except (netaddr.AddrFormatError, ValueError):
                warnings.append(f"interface {name}: cannot read address {local}/{prefixlen}")
                continue
            configured = config.classify(str(cidr.ip))
            if is_loopback or cidr.ip.is_loopback():
                location = Location.LOCAL
            elif is_wireguard or (configured is not None and configured.type is Location.WIREGUARD):
                location = Location.WIREGUARD
            else:
                location = Location.LAN
            peers: list[str] = []
            if location is Location.WIREGUARD:
                peers = wg_peers.get(name) or (file_peers.get(configured.name, []) if configured else [])
            found.append(
                DetectedNetwork(
                    interface=name,
                    location=location,
                    address=f"{cidr.ip}/{cidr.prefixlen}",
                    subnet=str(cidr.cidr),
                    network=configured.name if configured is not None else None,
                    peers_allowed_ips=tuple(sorted(set(peers))),
                )
            )
    found.sort(key=lambda item: (item.location.value, item.interface, item.address))
    present = {item.network for item in found}
    missing = tuple(name for name in config.networks if name not in present)
    return Topology(tuple(found), missing, tuple(warnings))
