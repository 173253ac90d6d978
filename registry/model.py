"""The service model: plain, immutable data with validation and a JSON round-trip.

Every class here validates on construction and raises :class:`ValidationError`
naming the field and the value. ``to_dict``/``from_dict`` give the wire shape used by
the store, the events and the WebSocket API::

    {"service_name": "postgres", "host_id": "docker-host", "location": "local",
     "state": "running", "endpoints": [{"name": "db", "port": 5432, "protocol": "tcp"}],
     "network_info": {"ip": "127.0.0.1", "hostname": null, "network": null}, ...}

An instance is identified by ``(service_name, host_id)``: one service may run on many
hosts.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import math
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final

from .exceptions import ValidationError

__all__ = [
    "BOOKKEEPING_FIELDS",
    "CONTENT_FIELDS",
    "SERVICE_FIELDS",
    "Endpoint",
    "EndpointRecord",
    "InstanceKey",
    "Location",
    "NetworkInfo",
    "ServiceEntry",
    "ServiceState",
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


# Lookups by value that also accept the members themselves (a StrEnum hashes as its str).
_LOCATIONS: dict[str, Location] = {member.value: member for member in Location}
_STATES: dict[str, ServiceState] = {member.value: member for member in ServiceState}


# --- field validators -------------------------------------------------------------

_SERVICE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HOST_ID = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.:-]{0,251}[A-Za-z0-9])?")
_NETWORK_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_ENDPOINT_NAME = re.compile(r"[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?")
_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")

_PROTOCOLS = frozenset({"tcp", "udp"})
_MAX_TAGS = 64
_MAX_TAG_LENGTH = 255
_MAX_METADATA_KEYS = 64
_MAX_METADATA_VALUE = 4096
_MAX_VERSION_LENGTH = 128
_MAX_ENDPOINTS = 64
_MAX_SECONDS = 7 * 24 * 3600.0


def _require_str(value: object, field_name: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{field_name} must be a string, got {type(value).__name__} {value!r}", field=field_name)
    return value


def _validate_pattern(value: object, field_name: str, pattern: re.Pattern[str], rule: str) -> str:
    text = _require_str(value, field_name)
    if not pattern.fullmatch(text):
        raise ValidationError(
            f"{field_name} {text!r} is invalid: use {rule}, starting and ending with a letter or digit",
            field=field_name,
        )
    return text


def validate_service_name(value: object, field_name: str = "service_name") -> str:
    return _validate_pattern(value, field_name, _SERVICE_NAME, "1-63 lowercase letters, digits and '-'")


def validate_host_id(value: object, field_name: str = "host_id") -> str:
    return _validate_pattern(value, field_name, _HOST_ID, "1-253 letters, digits, '-', '_', '.', ':'")


def validate_network_name(value: object, field_name: str = "network") -> str:
    return _validate_pattern(value, field_name, _NETWORK_NAME, "1-63 letters, digits, '-', '_', '.'")


def validate_ip(value: object, field_name: str = "ip") -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse an IP address; unspecified (0.0.0.0, ::) and multicast addresses are refused."""
    return ipaddress.ip_address(_ip_facts(value, field_name)[0])


_LOOPBACK_V6 = bytes(15) + b"\x01"


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> tuple[str, bool] | str:
    """(canonical text, is loopback), or the reason the text is not a usable address.

    ``inet_pton`` is strict (no leading zeros, no short forms, no zone ids) and ~20x
    faster than ``ipaddress``; this runs for every entry loaded from the store.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, text)
        except (OSError, ValueError):
            continue
        if not any(packed):
            return "unspecified"
        if packed[0] == 0xFF or (family == socket.AF_INET and 224 <= packed[0] <= 239):
            return "multicast"
        loopback = packed[0] == 127 if family == socket.AF_INET else packed == _LOOPBACK_V6
        return socket.inet_ntop(family, packed), loopback
    return "invalid"


def _ip_facts(value: object, field_name: str) -> tuple[str, bool]:
    """(canonical text, is loopback) of a service address, or a ValidationError."""
    text = _require_str(value, field_name)
    facts = _parse_ip(text)
    if isinstance(facts, tuple):
        return facts
    if facts == "invalid":
        raise ValidationError(f"{field_name} {text!r} is not a valid IP address", field=field_name)
    raise ValidationError(f"{field_name} {text!r} cannot be a service address ({facts})", field=field_name)


def _validate_hostname(value: object) -> str:
    hostname = _require_str(value, "network_info.hostname")
    labels = hostname.rstrip(".").split(".")
    if len(hostname) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels):
        raise ValidationError(
            f"network_info.hostname {hostname!r} is not a valid DNS hostname", field="network_info.hostname"
        )
    return hostname


def _validate_seconds(value: object, field_name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(
            f"{field_name} must be a number of seconds, got {type(value).__name__} {value!r}", field=field_name
        )
    seconds = float(value)
    if not (math.isfinite(seconds) and 0 < seconds <= _MAX_SECONDS):
        raise ValidationError(
            f"{field_name} {value!r} is out of range (0 < seconds <= {_MAX_SECONDS:.0f})", field=field_name
        )
    return seconds


def _validate_revision(value: object, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"{field_name} must be a non-negative integer, got {value!r}", field=field_name)
    return value


def _check_keys(data: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    if data.keys() <= allowed:
        return
    unknown = sorted(map(str, set(data) - allowed))
    prefix = "" if where == "service" else f"{where}."
    raise ValidationError(
        f"{where}: unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(allowed))}",
        field=prefix + unknown[0],
    )


def _require_mapping(data: object, where: str) -> Mapping[str, Any]:
    if type(data) is dict:  # the common case, without the slow ABC check
        return data
    if not isinstance(data, Mapping):
        raise ValidationError(f"{where} must be an object, got {type(data).__name__}", field=where)
    return data


# --- the data classes ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A named port a service listens on."""

    name: str
    port: int
    protocol: str = "tcp"

    def __post_init__(self) -> None:
        name = _require_str(self.name, "endpoints.name")
        if not _ENDPOINT_NAME.fullmatch(name):
            raise ValidationError(
                f"endpoint name {name!r} is invalid: use 1-63 lowercase letters, digits, '-' and '_'",
                field="endpoints.name",
            )
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValidationError(
                f"endpoint {name!r}: port {self.port!r} is out of range (1-65535)", field="endpoints.port"
            )
        if self.protocol not in _PROTOCOLS:
            raise ValidationError(
                f"endpoint {name!r}: protocol {self.protocol!r} is not one of {', '.join(sorted(_PROTOCOLS))}",
                field="endpoints.protocol",
            )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "protocol": self.protocol}

    @classmethod
    def from_dict(cls, data: object) -> Endpoint:
        mapping = _require_mapping(data, "endpoints[]")
        _check_keys(mapping, _ENDPOINT_KEYS, "endpoints[]")
        if "name" not in mapping or "port" not in mapping:
            raise ValidationError("an endpoint needs both 'name' and 'port'", field="endpoints")
        name, port, protocol = mapping["name"], mapping["port"], mapping.get("protocol", "tcp")
        if type(name) is str and type(port) is int and type(protocol) is str:
            return _shared_endpoint(name, port, protocol)
        return cls(name, port, protocol)


_ENDPOINT_KEYS = frozenset({"name", "port", "protocol"})


@functools.lru_cache(maxsize=4096)
def _shared_endpoint(name: str, port: int, protocol: str) -> Endpoint:
    """Endpoints are immutable: instances loaded from the store share them (memory, speed)."""
    return Endpoint(name, port, protocol)


@dataclass(frozen=True, slots=True)
class NetworkInfo:
    """Where an instance can be reached: its IP, optional hostname and network name."""

    ip: str
    hostname: str | None = None
    network: str | None = None
    _loopback: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Normalise the address ("::0001" -> "::1") so equality and lookups are exact.
        ip, loopback = _ip_facts(self.ip, "network_info.ip")
        object.__setattr__(self, "ip", ip)
        object.__setattr__(self, "_loopback", loopback)
        if self.hostname is not None:
            _validate_hostname(self.hostname)
        if self.network is not None:
            validate_network_name(self.network, "network_info.network")

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.ip)

    @property
    def is_loopback(self) -> bool:
        return self._loopback

    def to_dict(self) -> dict[str, Any]:
        return {"ip": self.ip, "hostname": self.hostname, "network": self.network}

    @classmethod
    def from_dict(cls, data: object) -> NetworkInfo:
        mapping = _require_mapping(data, "network_info")
        _check_keys(mapping, _NETWORK_INFO_KEYS, "network_info")
        if "ip" not in mapping:
            raise ValidationError("network_info.ip is required", field="network_info.ip")
        ip, hostname, network = mapping["ip"], mapping.get("hostname"), mapping.get("network")
        if (
            type(ip) is str
            and (hostname is None or type(hostname) is str)
            and (network is None or type(network) is str)
        ):
            return _shared_network_info(ip, hostname, network)
        return cls(ip, hostname, network)


_NETWORK_INFO_KEYS = frozenset({"ip", "hostname", "network"})


@functools.lru_cache(maxsize=4096)
def _shared_network_info(ip: str, hostname: str | None, network: str | None) -> NetworkInfo:
    """Many services share a host's address: entries loaded from the store share one object."""
    return NetworkInfo(ip, hostname, network)


def _is_sequence(value: object) -> bool:
    if type(value) is list or type(value) is tuple:  # the common cases, without the slow ABC check
        return True
    return not isinstance(value, (str, bytes, Mapping)) and isinstance(value, Iterable)


def _freeze_endpoints(value: object) -> tuple[Endpoint, ...]:
    if not _is_sequence(value):
        raise ValidationError(f"endpoints must be a list, got {type(value).__name__}", field="endpoints")
    endpoints = tuple(item if isinstance(item, Endpoint) else Endpoint.from_dict(item) for item in value)
    if len(endpoints) > _MAX_ENDPOINTS:
        raise ValidationError(f"too many endpoints ({len(endpoints)} > {_MAX_ENDPOINTS})", field="endpoints")
    names = [endpoint.name for endpoint in endpoints]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValidationError(f"endpoint name {duplicate!r} is used twice", field="endpoints")
    return endpoints


def _freeze_tags(value: object) -> tuple[str, ...]:
    if not _is_sequence(value):
        raise ValidationError(f"tags must be a list of strings, got {type(value).__name__}", field="tags")
    tags: dict[str, None] = {}
    for tag in value:
        text = _require_str(tag, "tags")
        if not 1 <= len(text) <= _MAX_TAG_LENGTH:
            raise ValidationError(f"tag {text!r} must be 1-{_MAX_TAG_LENGTH} characters", field="tags")
        tags[text] = None
    if len(tags) > _MAX_TAGS:
        raise ValidationError(f"too many tags ({len(tags)} > {_MAX_TAGS})", field="tags")
    return tuple(tags)


_EMPTY_METADATA: Mapping[str, str] = MappingProxyType({})


def _freeze_metadata(value: object) -> Mapping[str, str]:
    mapping = _require_mapping(value, "metadata")
    if len(mapping) > _MAX_METADATA_KEYS:
        raise ValidationError(f"too many metadata keys ({len(mapping)} > {_MAX_METADATA_KEYS})", field="metadata")
    for key, item in mapping.items():
        if not isinstance(key, str) or not _METADATA_KEY.fullmatch(key):
            raise ValidationError(
                f"metadata key {key!r} is invalid: use 1-128 letters, digits, '_', '.', '-'", field="metadata"
            )
        if not isinstance(item, str):
            raise ValidationError(
                f"metadata[{key!r}] must be a string, got {type(item).__name__} {item!r}", field=f"metadata.{key}"
            )
        if len(item) > _MAX_METADATA_VALUE:
            raise ValidationError(
                f"metadata[{key!r}] is longer than {_MAX_METADATA_VALUE} characters", field=f"metadata.{key}"
            )
    return MappingProxyType(dict(mapping))


def _coerce_enum(enum_cls: type[enum.StrEnum], value: object, field_name: str) -> Any:
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum_cls)
        raise ValidationError(f"{field_name} {value!r} is not one of {choices}", field=field_name) from None


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """One instance of a service on one host.

    ``create_revision``/``mod_revision`` and ``updated_at`` are set by the registry;
    values passed in by callers are ignored on ``add_or_update``.
    """

    service_name: str
    host_id: str
    location: Location
    network_info: NetworkInfo
    state: ServiceState = ServiceState.RUNNING
    endpoints: tuple[Endpoint, ...] = ()
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY_METADATA)
    ttl_seconds: float | None = None
    deregister_after_seconds: float | None = None
    version: str | None = None
    create_revision: int = 0
    mod_revision: int = 0
    updated_at: float | None = None

    def __post_init__(self) -> None:
        # This runs for every entry loaded from the store and every write: common
        # shapes take the fast branch; anything unusual goes through the validators,
        # which produce the error messages.
        set_field = object.__setattr__
        name, host_id = self.service_name, self.host_id
        if type(name) is not str or not _SERVICE_NAME.fullmatch(name):
            validate_service_name(name)
        if type(host_id) is not str or not _HOST_ID.fullmatch(host_id):
            validate_host_id(host_id)
        location = _LOCATIONS.get(self.location) if isinstance(self.location, str) else None
        set_field(self, "location", location or _coerce_enum(Location, self.location, "location"))
        state = _STATES.get(self.state) if isinstance(self.state, str) else None
        set_field(self, "state", state or _coerce_enum(ServiceState, self.state, "state"))
        network_info = self.network_info
        if type(network_info) is not NetworkInfo:
            set_field(self, "network_info", NetworkInfo.from_dict(network_info))
        endpoints = self.endpoints
        if not (type(endpoints) is tuple and all(type(e) is Endpoint for e in endpoints)):
            set_field(self, "endpoints", _freeze_endpoints(endpoints))
        if type(self.tags) is not tuple or self.tags:
            set_field(self, "tags", _freeze_tags(self.tags))
        metadata = self.metadata
        if not metadata and (type(metadata) is dict or isinstance(metadata, Mapping)):
            set_field(self, "metadata", _EMPTY_METADATA)
        elif type(metadata) is not MappingProxyType:
            set_field(self, "metadata", _freeze_metadata(metadata))
        if self.ttl_seconds is not None:
            set_field(self, "ttl_seconds", _validate_seconds(self.ttl_seconds, "ttl_seconds"))
        if self.deregister_after_seconds is not None:
            seconds = _validate_seconds(self.deregister_after_seconds, "deregister_after_seconds")
            set_field(self, "deregister_after_seconds", seconds)
        if self.version is not None:
            version = _require_str(self.version, "version")
            if not 1 <= len(version) <= _MAX_VERSION_LENGTH:
                raise ValidationError(
                    f"version {version!r} must be 1-{_MAX_VERSION_LENGTH} characters", field="version"
                )
        if type(self.create_revision) is not int or self.create_revision < 0:
            _validate_revision(self.create_revision, "create_revision")
        if type(self.mod_revision) is not int or self.mod_revision < 0:
            _validate_revision(self.mod_revision, "mod_revision")
        updated_at = self.updated_at
        if updated_at is not None and (isinstance(updated_at, bool) or not isinstance(updated_at, (int, float))):
            raise ValidationError(f"updated_at must be a timestamp, got {updated_at!r}", field="updated_at")
        self._check_location()

    def _check_location(self) -> None:
        is_loopback = self.network_info.is_loopback
        if self.location is Location.LOCAL and not is_loopback:
            raise ValidationError(
                f"location 'local' needs a loopback address (127.0.0.0/8 or ::1), got {self.network_info.ip}",
                field="network_info.ip",
            )
        if self.location is not Location.LOCAL and is_loopback:
            raise ValidationError(
                f"location {self.location.value!r} cannot use the loopback address {self.network_info.ip}; "
                "use location 'local'",
                field="network_info.ip",
            )

    @property
    def key(self) -> InstanceKey:
        return (self.service_name, self.host_id)

    def evolve(self, **changes: Any) -> ServiceEntry:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def stamped(self, *, create_revision: int, mod_revision: int, updated_at: float) -> ServiceEntry:
        """A copy carrying the registry's bookkeeping; skips re-validating the content.

        The registry stamps every write; re-running every validator for three
        integers it computed itself would be most of the cost of a write.
        """
        _validate_revision(create_revision, "create_revision")
        _validate_revision(mod_revision, "mod_revision")
        copy = object.__new__(ServiceEntry)
        for slot in _CONTENT_SLOTS:
            slot.__set__(copy, slot.__get__(self))
        _REVISION_SLOTS[0].__set__(copy, create_revision)
        _REVISION_SLOTS[1].__set__(copy, mod_revision)
        _REVISION_SLOTS[2].__set__(copy, float(updated_at))
        return copy

    def to_dict(self) -> dict[str, Any]:
        return {
            "service_name": self.service_name,
            "host_id": self.host_id,
            "location": self.location.value,
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
    def from_dict(cls, data: object) -> ServiceEntry:
        """Build an entry from its wire/store form; unknown fields are refused."""
        mapping = _require_mapping(data, "service")
        _check_keys(mapping, SERVICE_FIELDS, "service")
        missing = [name for name in ("service_name", "host_id", "location", "network_info") if name not in mapping]
        if missing:
            raise ValidationError(f"service is missing required field(s): {', '.join(missing)}", field=missing[0])
        if None in (mapping.get(key, 0) for key in _DEFAULTED):
            mapping = {key: value for key, value in mapping.items() if value is not None or key not in _DEFAULTED}
        return cls(**mapping)


SERVICE_FIELDS = frozenset(ServiceEntry.__dataclass_fields__)
BOOKKEEPING_FIELDS: Final = frozenset({"create_revision", "mod_revision", "updated_at"})
"""Set by the registry on every write; a caller's values are ignored."""
CONTENT_FIELDS: Final = tuple(name for name in ServiceEntry.__dataclass_fields__ if name not in BOOKKEEPING_FIELDS)
"""What a caller says about an instance: an update that changes none of these is a heartbeat."""
_REQUIRED_FIELDS = frozenset({"service_name", "host_id", "location", "network_info"})
# (slot descriptor, field name, default) for every field, in declaration order.
_SLOT_DEFAULTS = tuple(
    (
        getattr(ServiceEntry, name),
        name,
        spec.default_factory() if spec.default_factory is not MISSING else spec.default,
    )
    for name, spec in ServiceEntry.__dataclass_fields__.items()
)


def entry_from_record(data: object) -> ServiceEntry:
    """:meth:`ServiceEntry.from_dict` for the store's own records, about twice as fast.

    Loading a large store is dominated by building entries: this skips the keyword
    packing and the dataclass ``__init__`` and fills the slots directly, then runs the
    same validation (``__post_init__``). Anything unusual takes the ``from_dict`` path,
    which produces the precise error.
    """
    if type(data) is not dict or not data.keys() <= SERVICE_FIELDS or not data.keys() >= _REQUIRED_FIELDS:
        return ServiceEntry.from_dict(data)
    entry = object.__new__(ServiceEntry)
    get = data.get
    for slot, name, default in _SLOT_DEFAULTS:
        value = get(name, default)
        slot.__set__(entry, default if value is None and name in _DEFAULTED else value)
    entry.__post_init__()
    return entry


# The slot descriptors, to copy an entry without the frozen __setattr__ (see stamped()).
_CONTENT_SLOTS = tuple(
    getattr(ServiceEntry, name)
    for name in ServiceEntry.__dataclass_fields__
    if name not in ("create_revision", "mod_revision", "updated_at")
)
_REVISION_SLOTS = (ServiceEntry.create_revision, ServiceEntry.mod_revision, ServiceEntry.updated_at)
# Fields where null on the wire means "the default" (the others take null as a value).
_DEFAULTED = ("state", "endpoints", "tags", "metadata", "create_revision", "mod_revision")


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
