"""The service model: plain, immutable data, declared once as msgspec structs.

``Endpoint``, ``NetworkInfo`` and ``ServiceEntry`` are frozen :class:`msgspec.Struct` s:
the wire and the store decode straight into them (``msgspec.json.decode(frame,
type=ServiceEntry)``, :func:`registry.schema.convert`), and msgspec checks types, unknown
fields and the bounds in the annotations. What no type can express (address
normalisation, loopback against location, duplicate endpoint names, tag folding, metadata
keys) is checked once, in ``__post_init__``. ``to_dict``/``from_dict`` give the wire shape
used by the store, the events and the WebSocket API::

    {"service_name": "postgres", "host_id": "docker-host", "location": "local",
     "state": "running", "endpoints": [{"name": "db", "port": 5432, "protocol": "tcp"}],
     "network_info": {"ip": "127.0.0.1", "hostname": null, "network": null}, ...}

Python callers may also construct entries directly, with plain values
(``ServiceEntry("api", "h", "local", {"ip": "::1"})``): calling the class converts its
arguments exactly as decoding would, so a bad value raises the same
:class:`~registry.exceptions.ValidationError`, naming the field.

An instance is identified by ``(service_name, host_id)``: one service may run on many
hosts.
"""

from __future__ import annotations

import copy
import enum
import functools
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, NoReturn, TypedDict, cast

import msgspec
from msgspec.structs import force_setattr

from .exceptions import ValidationError
from .schema import FieldError, convert, shown

__all__ = [
    "BOOKKEEPING_FIELDS",
    "Allocation",
    "CONTENT_FIELDS",
    "SERVICE_FIELDS",
    "ConvertingMeta",
    "DeployJob",
    "DetectedNetwork",
    "Endpoint",
    "EndpointRecord",
    "InstanceKey",
    "Location",
    "NetworkInfo",
    "NetworkSummary",
    "Record",
    "ServiceEntry",
    "ServiceState",
    "Topology",
    "instance_owner",
    "owner_instance",
    "validate_host_id",
    "validate_ip",
    "validate_network_name",
    "validate_service_name",
]

InstanceKey = tuple[str, str]
"""``(service_name, host_id)``: what identifies one service instance."""


class Location(enum.StrEnum):
    """Where a service runs relative to its callers; ordered nearest first."""

    LOCAL = "local"
    LAN = "lan"
    WIREGUARD = "wireguard"

    @property
    def distance(self) -> int:
        """0 for local, 1 for LAN, 2 for WireGuard: used to prefer the nearest instance."""
        return _LOCATION_DISTANCE[self]


_LOCATION_DISTANCE = {Location.LOCAL: 0, Location.LAN: 1, Location.WIREGUARD: 2}


class ServiceState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


# --- bounds a type can express ------------------------------------------------------

_MAX_SECONDS: Final = 7 * 24 * 3600.0
_Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
_Seconds = Annotated[float, msgspec.Meta(gt=0, le=_MAX_SECONDS)]
_Revision = Annotated[int, msgspec.Meta(ge=0)]
_Tag = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
_Version = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_MetadataValue = Annotated[str, msgspec.Meta(max_length=4096)]
_Tags = Annotated[tuple[_Tag, ...], msgspec.Meta(max_length=64)]
_Metadata = Annotated[Mapping[str, _MetadataValue], msgspec.Meta(max_length=64)]


# --- rules no type can express ----------------------------------------------------------


_SERVICE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HOST_ID = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.:-]{0,251}[A-Za-z0-9])?")
_NETWORK_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_ENDPOINT_NAME = re.compile(r"[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?")
_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")

_SERVICE_NAME_RULE: Final = "1-63 lowercase letters, digits and '-'"
_HOST_ID_RULE: Final = "1-253 letters, digits, '-', '_', '.', ':'"
_NETWORK_NAME_RULE: Final = "1-63 letters, digits, '-', '_', '.'"
_ENDPOINT_NAME_RULE: Final = "1-63 lowercase letters, digits, '-' and '_'"


def _invalid(text: str, rule: str) -> str:
    return f"{shown(text)} is invalid: use {rule}, starting and ending with a letter or digit"


def _broken(field: str, text: str, rule: str) -> NoReturn:
    raise FieldError(field, _invalid(text, rule))


def _validate_pattern(value: object, field_name: str, pattern: re.Pattern[str], rule: str) -> str:
    """The public validators: ``field_name`` is prose here (``"network name"``), so the
    message reads ``network name 'x y' is invalid: ...``."""
    text = value if type(value) is str else convert(value, str, path=field_name)
    if not pattern.fullmatch(text):
        raise ValidationError(f"{field_name} {_invalid(text, rule)}", field=field_name)
    return text


def validate_service_name(value: object, field_name: str = "service_name") -> str:
    return _validate_pattern(value, field_name, _SERVICE_NAME, _SERVICE_NAME_RULE)


def validate_host_id(value: object, field_name: str = "host_id") -> str:
    return _validate_pattern(value, field_name, _HOST_ID, _HOST_ID_RULE)


def validate_network_name(value: object, field_name: str = "network") -> str:
    return _validate_pattern(value, field_name, _NETWORK_NAME, _NETWORK_NAME_RULE)


def validate_ip(value: object, field_name: str = "ip") -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse an IP address; unspecified (0.0.0.0, ::) and multicast addresses are refused."""
    text = value if type(value) is str else convert(value, str, path=field_name)
    canonical, problem = _canonical_ip(text)
    if problem is not None:
        raise ValidationError(f"{field_name} {problem}", field=field_name)
    return ipaddress.ip_address(canonical)


@functools.lru_cache(maxsize=4096)
def _canonical_ip(text: str) -> tuple[str, str | None]:
    """``(canonical text, None)``, or ``(text, why it cannot be a service address)``.

    ``inet_pton`` is strict (no leading zeros, no short forms, no zone ids) and ~20x
    faster than ``ipaddress``; this runs for every entry loaded from the store.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, text)
        except (OSError, ValueError):
            continue
        if not any(packed):
            return text, f"{shown(text)} cannot be a service address (unspecified)"
        if packed[0] == 0xFF or (family == socket.AF_INET and 224 <= packed[0] <= 239):
            return text, f"{shown(text)} cannot be a service address (multicast)"
        return socket.inet_ntop(family, packed), None
    return text, f"{shown(text)} is not a valid IP address"


class _FrozenDict(dict[str, str]):
    """Metadata: a dict (so msgspec encodes it) that refuses every change."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("service metadata is immutable: use entry.evolve(metadata=...)")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[type[_FrozenDict], tuple[dict[str, str]]]:
        return (type(self), (dict(self),))

    def __copy__(self) -> _FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _FrozenDict:
        return self  # immutable, and its values are strings


_EMPTY_METADATA: Final = _FrozenDict()


# --- direct construction ---------------------------------------------------------------


class ConvertingMeta(msgspec.StructMeta):
    """Calling the class converts its arguments the way decoding does.

    msgspec checks annotations only when decoding; ``Struct(...)`` would take a str for an
    enum or a port of 0 as given. Here a direct call binds the arguments to the fields and
    converts them like decoded data (str -> enum, dict -> struct, list -> tuple, bounds),
    then ``__post_init__`` checks the rest: one path, one set of messages. Decoding does
    not go through this, so it pays nothing for it.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        names = cls.__struct_fields__
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__} takes at most {len(names)} positional arguments")
        fields = dict(zip(names, args, strict=False))
        if not fields.keys().isdisjoint(kwargs):
            raise TypeError(f"{cls.__name__} got several values for {sorted(fields.keys() & kwargs)}")
        fields.update(kwargs)
        for name, value in fields.items():
            if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
                fields[name] = str(value)  # NetworkInfo(ip=ipaddress.ip_address(...))
        return convert(fields, cast("type[msgspec.Struct]", cls))


# --- the structs ------------------------------------------------------------------------


class Endpoint(msgspec.Struct, metaclass=ConvertingMeta, frozen=True, forbid_unknown_fields=True):
    """A named port a service listens on."""

    name: str
    port: _Port
    protocol: Literal["tcp", "udp"] = "tcp"

    def __post_init__(self) -> None:
        if not _ENDPOINT_NAME.fullmatch(self.name):
            _broken("name", self.name, _ENDPOINT_NAME_RULE)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "protocol": self.protocol}

    @classmethod
    def from_dict(cls, data: object, *, path: str = "") -> Endpoint:
        return convert(data, cls, path=path)


class NetworkInfo(msgspec.Struct, metaclass=ConvertingMeta, frozen=True, forbid_unknown_fields=True):
    """Where an instance can be reached: its IP, optional hostname and network name.

    On register, ``ip`` may be left out when the registry can allocate one (a ``network``
    of ``services.yaml``, or a location with one network); a stored entry always has one.
    ``ip`` also takes :mod:`ipaddress` objects.
    """

    ip: str | None = None
    hostname: str | None = None
    network: str | None = None

    def __post_init__(self) -> None:
        if self.ip is not None:
            canonical, problem = _canonical_ip(self.ip)
            if problem is not None:
                raise FieldError("ip", problem)
            # Normalise the address ("::0001" -> "::1") so equality and lookups are exact.
            if canonical != self.ip:
                force_setattr(self, "ip", canonical)
        hostname = self.hostname
        if hostname is not None and (
            len(hostname) > 253 or not all(map(_HOSTNAME_LABEL.fullmatch, hostname.rstrip(".").split(".")))
        ):
            raise FieldError("hostname", f"{shown(hostname)} is not a valid DNS hostname")
        if self.network is not None and not _NETWORK_NAME.fullmatch(self.network):
            _broken("network", self.network, _NETWORK_NAME_RULE)

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        if self.ip is None:
            raise ValueError("this network_info has no ip yet (the registry allocates it on register)")
        return ipaddress.ip_address(self.ip)

    @property
    def is_loopback(self) -> bool:
        # ip is canonical (see __post_init__): 127.0.0.0/8 is "127.*", ::1 has one spelling.
        ip = self.ip
        return ip is not None and (ip.startswith("127.") or ip == "::1")

    def to_dict(self) -> dict[str, Any]:
        return {"ip": self.ip, "hostname": self.hostname, "network": self.network}

    @classmethod
    def from_dict(cls, data: object, *, path: str = "") -> NetworkInfo:
        return convert(data, cls, path=path)


class ServiceEntry(msgspec.Struct, metaclass=ConvertingMeta, frozen=True, forbid_unknown_fields=True):
    """One instance of a service on one host.

    ``create_revision``/``mod_revision`` and ``updated_at`` are set by the registry;
    values passed in by callers are ignored on ``add_or_update``.
    """

    service_name: str
    host_id: str
    location: Location | None = None
    network_info: NetworkInfo = msgspec.field(default_factory=NetworkInfo)
    state: ServiceState = ServiceState.RUNNING
    endpoints: Annotated[tuple[Endpoint, ...], msgspec.Meta(max_length=64)] = ()
    tags: _Tags = ()
    metadata: _Metadata = _EMPTY_METADATA
    ttl_seconds: _Seconds | None = None
    deregister_after_seconds: _Seconds | None = None
    version: _Version | None = None
    create_revision: _Revision = 0
    mod_revision: _Revision = 0
    updated_at: float | None = None

    def __post_init__(self) -> None:
        if not _SERVICE_NAME.fullmatch(self.service_name):
            _broken("service_name", self.service_name, _SERVICE_NAME_RULE)
        if not _HOST_ID.fullmatch(self.host_id):
            _broken("host_id", self.host_id, _HOST_ID_RULE)
        is_loopback = self.network_info.is_loopback
        if self.network_info.ip is None:
            pass  # the registry allocates the address, then checks it
        elif self.location is Location.LOCAL and not is_loopback:
            raise FieldError(
                "network_info.ip",
                f"location 'local' needs a loopback address (127.0.0.0/8 or ::1), got {self.network_info.ip}",
            )
        elif self.location is not None and self.location is not Location.LOCAL and is_loopback:
            raise FieldError(
                "network_info.ip",
                f"location {self.location.value!r} cannot use the loopback address {self.network_info.ip}; "
                "use location 'local'",
            )
        if len(self.endpoints) > 1:
            names = [endpoint.name for endpoint in self.endpoints]
            if len(set(names)) != len(names):
                duplicate = next(name for name in names if names.count(name) > 1)
                raise FieldError("endpoints", f"endpoint name {duplicate!r} is used twice")
        if len(set(self.tags)) != len(self.tags):
            force_setattr(self, "tags", tuple(dict.fromkeys(self.tags)))
        self._freeze_metadata()

    def _freeze_metadata(self) -> None:
        metadata = self.metadata
        if type(metadata) is _FrozenDict:
            return
        for key in metadata:
            if not _METADATA_KEY.fullmatch(key):
                raise FieldError("metadata", f"key {shown(key)} is invalid: use 1-128 letters, digits, '_', '.', '-'")
        force_setattr(self, "metadata", _FrozenDict(metadata) if metadata else _EMPTY_METADATA)

    @property
    def key(self) -> InstanceKey:
        return (self.service_name, self.host_id)

    @property
    def ip(self) -> str:
        """The instance's address; every entry the registry holds has one."""
        ip = self.network_info.ip
        if ip is None:
            raise ValueError(f"{self.service_name}@{self.host_id} has no address yet (the registry allocates it)")
        return ip

    @property
    def distance(self) -> int:
        """:attr:`Location.distance` of the location (3 while it is not known yet)."""
        return self.location.distance if self.location is not None else 3

    def evolve(self, **changes: Any) -> ServiceEntry:
        """A copy with some fields changed (validated again)."""
        return convert({**msgspec.structs.asdict(self), **changes}, ServiceEntry)

    def stamped(self, *, create_revision: int, mod_revision: int, updated_at: float) -> ServiceEntry:
        """A copy carrying the registry's bookkeeping; skips re-validating the content.

        The registry stamps every write; re-running every check for three numbers it
        computed itself would be most of the cost of a write.
        """
        given = {"create_revision": create_revision, "mod_revision": mod_revision, "updated_at": updated_at}
        stamped = copy.copy(self)  # a shallow copy does not run __post_init__
        for name, value in convert(given, _BOOKKEEPING).items():
            force_setattr(stamped, name, value)
        return stamped

    def to_dict(self) -> dict[str, Any]:
        return {
            "service_name": self.service_name,
            "host_id": self.host_id,
            "location": self.location.value if self.location is not None else None,
            "state": self.state.value,
            "endpoints": [endpoint.to_dict() for endpoint in self.endpoints],
            "network_info": self.network_info.to_dict(),
            "tags": list(self.tags),
            "metadata": dict(self.metadata),
            "ttl_seconds": self.ttl_seconds,
            "deregister_after_seconds": self.deregister_after_seconds,
            "version": self.version,
            "create_revision": self.create_revision,
            "mod_revision": self.mod_revision,
            "updated_at": self.updated_at,
        }

    def to_record(self) -> dict[str, Any]:
        """The store form: :meth:`to_dict` without null and empty values (they are the
        defaults). Smaller rows make loading a large store markedly faster."""
        record = {
            key: value for key, value in self.to_dict().items() if value is not None and value != [] and value != {}
        }
        record["network_info"] = {key: value for key, value in record["network_info"].items() if value is not None}
        return record

    @classmethod
    def from_dict(cls, data: object, *, path: str = "") -> ServiceEntry:
        """Build an entry from its wire/store form; unknown fields are refused.

        ``null`` for a field with a default (state, endpoints, tags, metadata, revisions)
        means that default, as older clients send it.
        """
        if isinstance(data, Mapping) and any(data.get(name, 0) is None for name in _DEFAULTED):
            data = {key: value for key, value in data.items() if value is not None or key not in _DEFAULTED}
        return convert(data, cls, path=path)


SERVICE_FIELDS: Final = frozenset(ServiceEntry.__struct_fields__)
BOOKKEEPING_FIELDS: Final = frozenset({"create_revision", "mod_revision", "updated_at"})
"""Set by the registry on every write; a caller's values are ignored."""
CONTENT_FIELDS: Final = tuple(name for name in ServiceEntry.__struct_fields__ if name not in BOOKKEEPING_FIELDS)
"""What a caller says about an instance: an update that changes none of these is a heartbeat."""
# The bookkeeping fields with their annotations, to check what stamped() is given.
_BOOKKEEPING: Final = cast(
    "type[dict[str, Any]]",
    TypedDict(  # type: ignore[operator]
        "_Bookkeeping",
        {info.name: info.type for info in msgspec.structs.fields(ServiceEntry) if info.name in BOOKKEEPING_FIELDS},
    ),
)
# Fields where null on the wire means "the default": those whose default is not null.
_DEFAULTED: Final = tuple(
    info.name for info in msgspec.structs.fields(ServiceEntry) if info.default not in (msgspec.NODEFAULT, None)
)


class Record:
    """A typed result that still reads like the JSON object it was: ``result["ip"]``,
    ``dict(result)`` (clients returned plain dicts before 0.2; new code uses the attributes)."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def keys(self) -> Any:
        return self.to_dict().keys()

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


@dataclass(frozen=True, slots=True)
class Allocation(Record):
    """An address handed to ``owner`` in ``network``; ``str()`` is the address (as the seed prints it).

    An instance's own address is owned by ``"<service_name>@<host_id>"``.
    """

    owner: str
    network: str
    ip: str
    prefixlen: int

    def __str__(self) -> str:
        return self.ip

    @property
    def key(self) -> str:
        return f"{self.network}/{self.owner}"

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.ip)

    @property
    def interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        """The address with its prefix (``192.168.1.2/24``), for an interface configuration."""
        return ipaddress.ip_interface(f"{self.ip}/{self.prefixlen}")

    def to_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "network": self.network, "ip": self.ip, "prefixlen": self.prefixlen}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        return cls(str(data["owner"]), str(data["network"]), str(data["ip"]), int(data["prefixlen"]))


@dataclass(frozen=True, slots=True)
class DetectedNetwork(Record):
    """One address found on one interface of this host."""

    interface: str
    location: Location
    address: str  # ip/prefixlen as configured on the interface
    subnet: str
    network: str | None = None  # the configured network it belongs to
    peers_allowed_ips: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectedNetwork:
        return cls(
            str(data["interface"]),
            Location(data["location"]),
            str(data["address"]),
            str(data["subnet"]),
            data.get("network"),
            tuple(data.get("peers_allowed_ips") or ()),
        )

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
class Topology(Record):
    """What :func:`detect_topology` found; ``to_dict`` is stable for equal topologies.

    ``revision`` is set on a client's ``get_topology()`` answer: the registry's revision then.
    """

    networks: tuple[DetectedNetwork, ...] = ()
    missing: tuple[str, ...] = ()  # configured networks this host has no address in
    warnings: tuple[str, ...] = ()
    revision: int | None = field(default=None, compare=False)

    def by_location(self, location: Location | str) -> list[DetectedNetwork]:
        location = Location(location)
        return [item for item in self.networks if item.location is location]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Topology:
        """The wire form back (``get_topology``, ``NetworkTopologyChanged``)."""
        return cls(
            tuple(DetectedNetwork.from_dict(item) for item in data.get("networks") or ()),
            tuple(data.get("missing") or ()),
            tuple(data.get("warnings") or ()),
        )

    def by_network(self, name: str) -> list[DetectedNetwork]:
        return [item for item in self.networks if item.network == name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "networks": [item.to_dict() for item in self.networks],
            "missing": list(self.missing),
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True, slots=True)
class NetworkSummary(Record):
    """A configured network as the API shows it (``list_networks``): plain values, no netaddr."""

    name: str
    type: Location
    subnet: str
    gateway: str | None = None
    nodes: tuple[Mapping[str, Any], ...] = ()
    config_path: str | None = None
    reserved: tuple[str, ...] = ()
    description: str | None = None
    release_on_remove: bool = True

    def __str__(self) -> str:
        return f"{self.name} ({self.type.value} {self.subnet})"

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.subnet)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkSummary:
        return cls(
            str(data["name"]),
            Location(data["type"]),
            str(data["subnet"]),
            data.get("gateway"),
            tuple(data.get("nodes") or ()),
            data.get("config_path"),
            tuple(data.get("reserved") or ()),
            data.get("description"),
            bool(data.get("release_on_remove", True)),
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "type": self.type.value,
            "subnet": self.subnet,
            "gateway": self.gateway,
            "nodes": [dict(node) for node in self.nodes],
        }
        if self.config_path is not None:
            data["config_path"] = self.config_path
        if self.reserved:
            data["reserved"] = list(self.reserved)
        if self.description is not None:
            data["description"] = self.description
        if not self.release_on_remove:
            data["release_on_remove"] = False
        return data


@dataclass(frozen=True, slots=True)
class DeployJob(Record):
    """A deploy job as the API shows it (``deploy_package``, ``get_job``, ``watch_job``, ``list_jobs``).

    ``status`` is ``running``, ``succeeded``, ``failed`` or ``cancelled``; ``events`` are the
    progress events so far (``get_job``/``watch_job`` only).
    """

    id: str
    status: str
    package: Mapping[str, Any]
    targets: tuple[Mapping[str, Any], ...] = ()
    created: float | None = None
    finished: float | None = None
    result: Mapping[str, Any] | None = None
    events: tuple[Mapping[str, Any], ...] | None = None

    def __str__(self) -> str:
        return self.id

    @property
    def done(self) -> bool:
        return self.finished is not None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeployJob:
        events = data.get("events")
        return cls(
            str(data["job"]),
            str(data["status"]),
            dict(data.get("package") or {}),
            tuple(data.get("targets") or ()),
            data.get("created"),
            data.get("finished"),
            data.get("result"),
            tuple(events) if events is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "job": self.id,
            "status": self.status,
            "package": dict(self.package),
            "targets": [dict(target) for target in self.targets],
            "created": self.created,
            "finished": self.finished,
            "result": self.result,
        }
        if self.events is not None:
            data["events"] = list(self.events)
        return data


def instance_owner(service_name: str, host_id: str) -> str:
    """The owner of an instance's address: ``"<service_name>@<host_id>"``."""
    return f"{service_name}@{host_id}"


def owner_instance(owner: str) -> InstanceKey | None:
    """:func:`instance_owner` read back: ``(service_name, host_id)``, or None for an owner that names no
    instance (no ``@``)."""
    service, at, host = owner.rpartition("@")
    return (service, host) if at else None


def _location_of(entry: ServiceEntry) -> Location:
    if entry.location is None:
        raise ValueError(f"{entry.service_name}@{entry.host_id} has no location yet (the registry works it out)")
    return entry.location


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    """One endpoint of one instance, flattened for discovery."""

    service_name: str
    host_id: str
    endpoint: str
    protocol: str
    ip: str
    port: int
    location: Location
    state: ServiceState

    @classmethod
    def of(cls, entry: ServiceEntry) -> list[EndpointRecord]:
        """One record per endpoint of ``entry``."""
        return [
            cls(
                entry.service_name,
                entry.host_id,
                endpoint.name,
                endpoint.protocol,
                entry.ip,
                endpoint.port,
                _location_of(entry),
                entry.state,
            )
            for endpoint in entry.endpoints
        ]

    @property
    def address(self) -> str:
        """``ip:port`` (``[ip]:port`` for IPv6), ready for a URL."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "service_name": self.service_name,
            "host_id": self.host_id,
            "endpoint": self.endpoint,
            "protocol": self.protocol,
            "ip": self.ip,
            "port": self.port,
            "location": self.location.value,
            "state": self.state.value,
        }
