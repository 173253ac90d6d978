"""The networks file: the ``networks:`` section of ``services.yaml`` (the seed's format).

The file's shape is declared once as msgspec structs (:class:`ServicesFile`,
:class:`NetworkSettings`, :class:`NodeSettings`); the checks no type can express (a CIDR
without host bits, an address inside its subnet, unique nodes) live in their
``__post_init__``. :class:`NetworkConfig` holds the result as :class:`Network` and
:class:`Node` values (netaddr objects) and answers lookups; it also refuses what only the
whole file can show (overlapping subnets, a node name used in two networks).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
import netaddr
import yaml

from ..exceptions import ConfigError, NotFound, ValidationError
from ..model import Location, validate_host_id, validate_ip, validate_network_name
from ..schema import FieldError, convert, shown

__all__ = ["Network", "NetworkConfig", "NetworkSettings", "Node", "NodeSettings", "ServicesFile"]


# --------------------------------------------------------------------------- runtime values


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
    release_on_remove: bool = True
    """False: an instance's address stays allocated to it after removal (a sticky address)."""

    def contains(self, ip: str | netaddr.IPAddress) -> bool:
        try:
            address = ip if isinstance(ip, netaddr.IPAddress) else netaddr.IPAddress(ip)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            return False
        return bool(address.version == self.subnet.version and self.subnet.first <= int(address) <= self.subnet.last)

    @property
    def prefixlen(self) -> int:
        return int(self.subnet.prefixlen)

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
        if not self.release_on_remove:
            data["release_on_remove"] = False
        return data


def _is_point_to_point(subnet: netaddr.IPNetwork) -> bool:
    """/31 and /32 (RFC 3021), /127 and /128: every address is usable, no gateway."""
    return int(subnet.prefixlen) >= (31 if subnet.version == 4 else 127)


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


# --------------------------------------------------------------------------- the file's shape


class NodeSettings(msgspec.Struct, frozen=True):
    """A node's own keys. Unknown keys are allowed: they are the node's host variables
    (read beside this struct by :func:`_host_vars`)."""

    host: str
    name: str
    ssh_user: Annotated[str, msgspec.Meta(pattern=r"\S")] | None = None

    def __post_init__(self) -> None:
        validate_host_id(self.name, "name")


_NODE_FIELDS: Final = frozenset(info.encode_name for info in msgspec.structs.fields(NodeSettings))


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A network's settings as netaddr values, checked."""

    subnet: netaddr.IPNetwork
    gateway: netaddr.IPAddress | None
    reserved: tuple[netaddr.IPRange, ...]
    hosts: tuple[str, ...]  # each node's address, canonical, in node order


class NetworkSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, dict=True):
    """One network in ``services.yaml``. ``dict=True`` only lets :attr:`parsed` be cached."""

    type: Location
    subnet: str
    nodes: tuple[NodeSettings, ...] | None = None
    config_path: str | None = None
    # absent: the subnet's first host address (the seed's convention); null or false: none
    gateway: str | Literal[False] | msgspec.UnsetType | None = msgspec.UNSET
    reserved: tuple[str, ...] | None = None
    description: str | None = None
    release_on_remove: bool = True

    def __post_init__(self) -> None:
        # Parsing here makes a bad value fail inside convert(), which adds the path to it.
        parsed = self.parsed
        if self.type is Location.LOCAL and not parsed.subnet.is_loopback():
            raise FieldError(
                "subnet",
                f"a local network must be a loopback subnet (127.0.0.0/8 or ::1/128), not {parsed.subnet}",
            )
        if self.config_path is not None:
            if self.type is not Location.WIREGUARD:
                raise FieldError("config_path", "config_path is only for wireguard networks")
            if not self.config_path.strip():
                raise FieldError("config_path", "config_path must be a file path")

    @functools.cached_property
    def parsed(self) -> _Parsed:
        subnet = _parse_subnet(self.subnet)
        gateway = _parse_gateway(self.gateway, subnet)
        reserved = tuple(
            _parse_reserved(item, subnet, f"reserved[{index}]") for index, item in enumerate(self.reserved or ())
        )
        return _Parsed(subnet, gateway, reserved, _node_hosts(self.nodes or (), subnet, gateway))

    def to_network(self, name: str, host_vars: Sequence[Mapping[str, Any]]) -> Network:
        """The runtime form; ``host_vars`` are the nodes' extra keys, in node order."""
        parsed = self.parsed
        nodes = tuple(
            Node(node.name, host, node.ssh_user, extra)
            for node, host, extra in zip(self.nodes or (), parsed.hosts, host_vars, strict=True)
        )
        config_path = Path(self.config_path) if self.config_path is not None else None
        return Network(
            name,
            self.type,
            parsed.subnet,
            nodes,
            config_path,
            parsed.gateway,
            parsed.reserved,
            self.description,
            self.release_on_remove,
        )


class ServicesFile(msgspec.Struct, frozen=True):
    """``services.yaml``. Other top-level sections are left to the tools that own them."""

    networks: dict[str, NetworkSettings] | None = None

    def __post_init__(self) -> None:
        for name in self.networks or {}:
            try:
                validate_network_name(name, "network name")
            except ValidationError as exc:
                raise FieldError("networks", exc.message) from None


def _parse_subnet(text: str) -> netaddr.IPNetwork:
    if "/" not in text:
        raise FieldError("subnet", f"subnet {text!r} is not a CIDR (expected e.g. 192.168.1.0/24)")
    try:
        subnet = netaddr.IPNetwork(text.strip())
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise FieldError("subnet", f"subnet {text!r} is not a valid CIDR") from None
    if subnet.ip != subnet.network:
        raise FieldError("subnet", f"subnet {text!r} has host bits set (did you mean {subnet.cidr}?)")
    return subnet


def _parse_address_in(text: str, subnet: netaddr.IPNetwork, path: str, what: str) -> netaddr.IPAddress:
    try:
        address = netaddr.IPAddress(validate_ip(text.strip(), what).compressed)
    except ValidationError:
        raise FieldError(path, f"{what} {text!r} is not a valid IP address") from None
    if address.version != subnet.version or not subnet.first <= int(address) <= subnet.last:
        raise FieldError(path, f"{what} {text} is outside the subnet {subnet}")
    return address


def _parse_gateway(
    value: str | Literal[False] | msgspec.UnsetType | None, subnet: netaddr.IPNetwork
) -> netaddr.IPAddress | None:
    if isinstance(value, str):
        return _parse_address_in(value, subnet, "gateway", "gateway")
    if value is not msgspec.UNSET or _is_point_to_point(subnet):
        return None
    return netaddr.IPAddress(subnet.first + 1, subnet.version)


def _parse_reserved(text: str, subnet: netaddr.IPNetwork, path: str) -> netaddr.IPRange:
    """An address, a CIDR or a ``first-last`` range, inside the subnet."""
    try:
        if "-" in text:
            first, last = (part.strip() for part in text.split("-", 1))
            span = netaddr.IPRange(first, last)
        elif "/" in text:
            cidr = netaddr.IPNetwork(text.strip())
            span = netaddr.IPRange(cidr.first, cidr.last)
        else:
            address = netaddr.IPAddress(text.strip())
            span = netaddr.IPRange(address, address)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise FieldError(path, f"reserved entry {text!r} is not an address, CIDR or range") from None
    if span.version != subnet.version or span.first < subnet.first or span.last > subnet.last:
        raise FieldError(path, f"reserved entry {text!r} is outside the subnet {subnet}")
    return span


def _node_hosts(
    nodes: Sequence[NodeSettings], subnet: netaddr.IPNetwork, gateway: netaddr.IPAddress | None
) -> tuple[str, ...]:
    """Each node's address, canonical: inside the subnet, not the gateway's, names and hosts unique."""
    names: set[str] = set()
    hosts: dict[str, str] = {}
    for index, node in enumerate(nodes):
        path = f"nodes[{index}]"
        host = str(_parse_address_in(node.host, subnet, f"{path}.host", "host"))
        if node.name in names:
            raise FieldError(f"{path}.name", f"duplicate node name {node.name!r}")
        if host in hosts:
            raise FieldError(f"{path}.host", f"node {node.name!r} has the same host {host} as node {hosts[host]!r}")
        if gateway is not None and host == str(gateway):
            raise FieldError(f"{path}.host", f"node {node.name!r} has the gateway's address {host}")
        names.add(node.name)
        hosts[host] = node.name
    return tuple(hosts)


def _host_vars(node: Mapping[Any, Any], path: str, where: str) -> dict[str, Any]:
    """A node's keys other than its own fields: host variables, plain JSON values only
    (they travel to Ansible as JSON)."""
    extra = {str(key): value for key, value in node.items() if key not in _NODE_FIELDS}
    for key, value in extra.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError, RecursionError):
            raise ConfigError(
                f"{where}{path}.{key}: host variables must be strings, numbers, true/false, null, lists or "
                f"mappings, got {shown(value)}",
                field=f"{path}.{key}",
            ) from None
    return extra


# --------------------------------------------------------------------------- the configuration


class NetworkConfig:
    """The configured networks, keyed by name (in file order)."""

    def __init__(self, networks: Iterable[Network] = (), *, source: str | None = None) -> None:
        self.source = source
        self.networks: dict[str, Network] = {}
        for network in networks:
            if network.name in self.networks:
                raise ConfigError(
                    f"{self._where()}networks.{network.name}: network {network.name!r} is defined twice",
                    field=f"networks.{network.name}",
                )
            self.networks[network.name] = network
        self._check_overlaps()
        self._check_node_names()
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
        """The configuration in ``data`` (``services.yaml`` as loaded; ``None`` is an empty file).

        Raises:
            ConfigError: naming the file and the field (``networks.prod.nodes[1].host``).
        """
        where = f"{source}: " if source else ""
        document = convert({} if data is None else data, ServicesFile, where=where, error=ConfigError)
        if not document.networks:
            return cls(source=source)
        # Host variables are the nodes' keys the struct does not declare: read them from the
        # data, which convert() has accepted, so its networks and nodes are mappings and lists.
        assert isinstance(data, Mapping)
        raw: Mapping[str, Mapping[str, Any]] = data["networks"]
        networks = []
        for name, settings in document.networks.items():
            nodes: Sequence[Mapping[Any, Any]] = raw[name].get("nodes") or ()
            host_vars = [_host_vars(node, f"networks.{name}.nodes[{index}]", where) for index, node in enumerate(nodes)]
            networks.append(settings.to_network(name, host_vars))
        return cls(networks, source=source)

    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    def _check_overlaps(self) -> None:
        items = sorted(self.networks.values(), key=lambda n: (n.subnet.version, n.subnet.first))
        for before, after in itertools.pairwise(items):
            if before.subnet.version == after.subnet.version and after.subnet.first <= before.subnet.last:
                path = f"networks.{after.name}.subnet"
                raise ConfigError(
                    f"{self._where()}{path}: subnet {after.subnet} overlaps network {before.name!r} ({before.subnet})",
                    field=path,
                )

    def _check_node_names(self) -> None:
        """Node names become inventory host names: unique across the file."""
        seen: dict[str, str] = {}
        for network in self.networks.values():
            for index, node in enumerate(network.nodes):
                if node.name in seen:
                    path = f"networks.{network.name}.nodes[{index}].name"
                    used_in = seen[node.name]
                    raise ConfigError(
                        f"{self._where()}{path}: node name {node.name!r} is already used in network {used_in!r}",
                        field=path,
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
