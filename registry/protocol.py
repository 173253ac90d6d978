"""The wire format, sans-I/O: JSON text frames in, typed messages out, and back.

Nothing here touches a socket. The server and every client flavour (asyncio, trio,
blocking) encode and decode through this module, so there is one codec, tested
without a network. docs/protocol.md is the human description of the same rules.

Frames::

    request   {"id": "7", "type": "request", "action": "get_service", "params": {...}}
    response  {"id": "7", "type": "response", "result": ...}
    error     {"id": "7" | null, "type": "error",
               "error": {"code": ..., "message": ..., "details": {...}, "class": "ServiceNotFound"}}
    event     {"type": "event", "subscription": "sub-3", "event": "ServiceRegistered",
               "revision": 42, "timestamp": 1700000000.0, "data": {...}}
    job       {"type": "job", "job": "job-1-a1b2c3", "event": "progress" | "finished", "data": {...}}
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec

from .auth import Role
from .events import Event, EventType
from .exceptions import (
    ConfigError,
    ProtocolError,
    RegistryError,
    ServiceNotFound,
    StoreError,
    SubscriptionClosed,
    SubscriptionLagged,
    UnknownAction,
    ValidationError,
    error_from_wire,
)
from .frames import RequestError, read_frame, readable_id
from .model import (
    Allocation,
    DeployJob,
    Endpoint,
    EndpointRecord,
    Location,
    NetworkInfo,
    NetworkSummary,
    ServiceEntry,
    ServiceState,
    Topology,
)
from .paging import MAX_PAGE, Page
from .query import QUERY_FIELDS, ServiceQuery
from .schema import convert, shown

__all__ = [
    "ACTIONS",
    "MAX_ID_LENGTH",
    "ActionSpec",
    "AllocateParams",
    "AuthenticateParams",
    "ClientCodec",
    "DeployParams",
    "DeployTarget",
    "Delivery",
    "ErrorMessage",
    "EventMessage",
    "InstanceParams",
    "JobMessage",
    "JobParams",
    "NetworkParams",
    "NoParams",
    "RegisterParams",
    "ReleaseParams",
    "Request",
    "RequestError",
    "Response",
    "Route",
    "SetStateParams",
    "SubscribeParams",
    "UnsubscribeParams",
    "decode_params",
    "decode_request",
    "encode_error",
    "encode_event",
    "encode_job",
    "encode_response",
]

MAX_ID_LENGTH: Final = 128

# --- params: one struct per action; msgspec checks types, unknown keys and bounds -------------

_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
_Path = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern="^[^\x00]+$")]  # no NUL: not a path
# Revisions and counts fit in 64 bits; a bound keeps 10**400 a bad_request instead of an OverflowError.
_Revision = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every action's params."""


class NoParams(_Params, frozen=True):
    pass


class AuthenticateParams(_Params, frozen=True):
    token: Annotated[str, msgspec.Meta(max_length=4096)]


class InstanceParams(_Params, frozen=True):
    """One instance: by name, on one host (or the best one)."""

    service_name: _Name
    host_id: _Name | None = None


class SetStateParams(_Params, frozen=True):
    service_name: _Name
    state: ServiceState
    host_id: _Name | None = None


class SubscribeParams(_Params, frozen=True):
    events: Annotated[list[EventType], msgspec.Meta(max_length=64)] | None = None
    since_revision: _Revision | None = None
    filter: ServiceQuery | None = None


class UnsubscribeParams(_Params, frozen=True):
    subscription: _Id


class NetworkParams(_Params, frozen=True):
    network: _Name | None = None


# Paging (registry.paging, docs/protocol.md#paging): optional on the three list actions.
_Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)]
_Cursor = Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]


class PagedServiceQuery(ServiceQuery, frozen=True, forbid_unknown_fields=True):
    """``list_services`` / ``list_endpoints``: a query, and optionally one page of the answer."""

    limit: _Limit | None = None
    cursor: _Cursor | None = None

    @property
    def query(self) -> ServiceQuery:
        """The filter alone."""
        return ServiceQuery(**{name: getattr(self, name) for name in QUERY_FIELDS})


class PagedNetworkParams(NetworkParams, frozen=True):
    limit: _Limit | None = None
    cursor: _Cursor | None = None


class RegisterParams(_Params, frozen=True):
    # The entry is checked by the model (ServiceEntry.from_dict), which names the field.
    service: dict[str, Any]


_Owner = Annotated[str, msgspec.Meta(min_length=1, max_length=320)]  # a service name, '@', a host id


class AllocateParams(_Params, frozen=True):
    owner: _Owner
    network: _Name
    ip: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None


class ReleaseParams(_Params, frozen=True):
    owner: _Owner
    network: _Name | None = None


class DeployTarget(_Params, frozen=True):
    """A host to deploy to; unset fields come from the registry's deploy configuration."""

    host: _Name
    ssh_user: Annotated[str, msgspec.Meta(max_length=255)] | None = None
    ssh_key: _Path | None = None
    install_base: _Path | None = None
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 22
    name: _Name | None = None
    # the configured network the instance is in, when host (the SSH address) is outside it:
    # the registry allocates the instance's address there
    network: _Name | None = None


class DeployParams(_Params, frozen=True):
    """Where to deploy: ``node`` (a node name), ``target`` or ``targets`` (names or targets)."""

    package: _Path
    node: _Name | None = None
    target: DeployTarget | None = None
    targets: Annotated[list[_Name | DeployTarget], msgspec.Meta(max_length=1000)] | None = None
    env: dict[str, str | int | float] | None = None
    keep_releases: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None


class JobParams(_Params, frozen=True):
    job: _Id


@dataclass(frozen=True, slots=True)
class ActionSpec:
    role: Role | None  # None: allowed before authentication
    params: type[msgspec.Struct] = NoParams


ACTIONS: Final[Mapping[str, ActionSpec]] = {
    "ping": ActionSpec(None),
    "authenticate": ActionSpec(None, AuthenticateParams),
    "list_services": ActionSpec(Role.READ, PagedServiceQuery),
    "get_service": ActionSpec(Role.READ, InstanceParams),
    "list_endpoints": ActionSpec(Role.READ, PagedServiceQuery),
    "subscribe": ActionSpec(Role.READ, SubscribeParams),
    "unsubscribe": ActionSpec(Role.READ, UnsubscribeParams),
    "list_networks": ActionSpec(Role.READ),
    "get_topology": ActionSpec(Role.READ),
    "list_allocations": ActionSpec(Role.READ, PagedNetworkParams),
    "register_service": ActionSpec(Role.WRITE, RegisterParams),
    "remove_service": ActionSpec(Role.WRITE, InstanceParams),
    "set_state": ActionSpec(Role.WRITE, SetStateParams),
    "heartbeat": ActionSpec(Role.WRITE, InstanceParams),
    "allocate_ip": ActionSpec(Role.WRITE, AllocateParams),
    "release_ip": ActionSpec(Role.WRITE, ReleaseParams),
    "deploy_package": ActionSpec(Role.ADMIN, DeployParams),
    "watch_job": ActionSpec(Role.READ, JobParams),
    "get_job": ActionSpec(Role.READ, JobParams),
    "list_jobs": ActionSpec(Role.READ),
}


def decode_params(action: str, params: Mapping[str, Any]) -> Any:
    """``params`` (as sent) as the action's struct; a null param is an absent one.

    Raises:
        ValidationError: naming ``params.<field>``; secrets (the token, env values) are never quoted.
    """
    given = {key: value for key, value in params.items() if value is not None}
    env = given.get("env")
    secret: Collection[str] = {"token", *env} if isinstance(env, Mapping) else {"token"}
    return convert(given, ACTIONS[action].params, path="params", secret=secret)


# --- messages -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A checked request: ``params`` as sent, ``args`` the same decoded into the action's struct."""

    id: str
    action: str
    params: Mapping[str, Any]
    args: Any = None

    @property
    def spec(self) -> ActionSpec:
        return ACTIONS[self.action]


@dataclass(frozen=True, slots=True)
class Response:
    id: str
    result: Any
    next_cursor: str | None = None  # beside the result of a paged list action, when more remain


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    id: str | None
    error: RegistryError


@dataclass(frozen=True, slots=True)
class EventMessage:
    subscription: str
    event: Event


@dataclass(frozen=True, slots=True)
class JobMessage:
    """Progress of a deploy job (``event`` "progress"), or its end (``event`` "finished", ``data`` the summary)."""

    job: str
    event: str
    data: dict[str, Any]


# --- server side ----------------------------------------------------------------------


class _Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: _Id
    type: Literal["request"]
    action: str
    params: dict[str, Any] | None = None


def decode_request(frame: str | bytes) -> Request:
    """Parse and check one request frame, params included.

    Raises:
        RequestError: not JSON, not a request, bad id, bad params (code ``bad_request``).
        UnknownAction: a well-formed request for an action that does not exist; its
            ``details["id"]`` is the request id.
    """
    message = read_frame(frame, actions=ACTIONS)
    if not isinstance(message, dict):
        raise RequestError("a request must be a JSON object", request_id=None)
    request_id = readable_id(message, MAX_ID_LENGTH)
    raw_action = message.get("action")
    action = raw_action if isinstance(raw_action, str) and raw_action in ACTIONS else None
    try:
        envelope = convert(message, _Envelope)
        spec = ACTIONS.get(envelope.action)
        if spec is None:
            error = UnknownAction(
                f"unknown action {shown(envelope.action)}; actions are: {', '.join(sorted(ACTIONS))}",
                details={"action": envelope.action[:64]},
            )
            error.details["id"] = request_id
            raise error
        params = envelope.params or {}
        return Request(envelope.id, envelope.action, params, decode_params(envelope.action, params))
    except RequestError:
        raise
    except ValidationError as exc:
        raise RequestError(exc.message, request_id=request_id, field=exc.field, action=action) from None


# The model's structs go out as msgspec encodes them (their to_dict() has the same content:
# tests/test_protocol.py checks it); every other object with to_dict() goes through it.
_NATIVE: Final = (ServiceEntry, Endpoint, NetworkInfo)


def _default(value: object) -> Any:
    """What msgspec cannot encode itself: objects with ``to_dict()``, subclasses of the JSON types
    (Ansible hands the client tagged strings and dicts)."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, list | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_ENCODER: Final = msgspec.json.Encoder(enc_hook=_default)


def _plain(value: Any) -> Any:
    """``value`` with ``to_dict()`` applied where msgspec would otherwise encode a dataclass or
    struct field by field (a result, or the items of a list result)."""
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value] if any(map(_own_form, value)) else value
    return value.to_dict() if _own_form(value) else value


def _own_form(value: object) -> bool:
    return hasattr(value, "to_dict") and not isinstance(value, _NATIVE)


def _dumps(message: Mapping[str, Any]) -> bytes:
    """One frame's UTF-8 JSON (sent as a text frame). NaN and infinities become null."""
    try:
        return _ENCODER.encode(message)
    except OverflowError as exc:  # an integer beyond 64 bits
        raise TypeError(f"not JSON serialisable: {exc}") from None


def encode_response(request_id: str, result: Any) -> bytes:
    """A response frame; objects with ``to_dict()`` are serialised through it. A :class:`Page`
    is its items as the result, with ``next_cursor`` beside it when more remain."""
    if isinstance(result, Page):
        message = {"id": request_id, "type": "response", "result": _plain(result.items)}
        if result.next_cursor is not None:
            message["next_cursor"] = result.next_cursor
        return _dumps(message)
    return _dumps({"id": request_id, "type": "response", "result": _plain(result)})


# Classes that share their parent's wire code (ServiceNotFound is a not_found). An error frame names the
# most specific of them in "class", so a client raises what the library raises; the code stays authoritative.
_SUBCLASSES: Final[Mapping[str, type[RegistryError]]] = {
    cls.__name__: cls
    for cls in (ServiceNotFound, SubscriptionClosed, SubscriptionLagged, ConfigError, ProtocolError, StoreError)
}


def encode_error(request_id: str | None, error: RegistryError) -> bytes:
    wire = error.to_dict()
    name = next((cls.__name__ for cls in type(error).__mro__ if _SUBCLASSES.get(cls.__name__) is cls), None)
    if name is not None:
        wire["class"] = name
    return _dumps({"id": request_id, "type": "error", "error": wire})


def _decode_error(error: Mapping[str, Any]) -> RegistryError:
    details = error.get("details")
    base = error_from_wire(
        str(error.get("code", "internal")),
        str(error.get("message", "no message")),
        details if isinstance(details, dict) else None,
    )
    name = error.get("class")
    refined = _SUBCLASSES.get(name) if isinstance(name, str) else None
    if refined is None or not issubclass(refined, type(base)):
        return base  # unknown, or not a subclass of the code's class: the code wins
    specific = refined.__new__(refined)
    specific.args = base.args
    specific.__dict__.update(base.__dict__)
    return specific


def encode_job(job: str, event: str, data: Mapping[str, Any]) -> bytes:
    return _dumps({"type": "job", "job": job, "event": event, "data": data})


def encode_event(subscription: str, event: Event) -> bytes:
    """The event frame for ``subscription``. The event's part is encoded once and shared by every
    subscription it goes to (a change fanned out to a thousand subscribers is encoded once)."""
    return b'{"type":"event","subscription":%b,%b' % (_ENCODER.encode(subscription), _event_body(event))


def _event_body(event: Event) -> bytes:
    """``"event":...,"revision":...,"timestamp":...,"data":...}``: the frame after the subscription."""
    cached = _EVENT_BODIES.get(id(event))
    if cached is not None and cached[0] is event:
        return cached[1]
    body = _dumps(event.to_dict())  # "event", "revision", "timestamp", "data", in that order
    if len(_EVENT_BODIES) >= _EVENT_BODIES_KEPT:
        _EVENT_BODIES.clear()  # a burst's worth: recent events are the ones being fanned out
    _EVENT_BODIES[id(event)] = (event, body[1:])  # the event is kept with it: its id cannot be reused meanwhile
    return body[1:]


_EVENT_BODIES: Final[dict[int, tuple[Event, bytes]]] = {}
_EVENT_BODIES_KEPT: Final = 1024


# --- client side ------------------------------------------------------------------------


class Route(enum.Enum):
    """Where a frame from the server goes."""

    REPLY = "reply"  # to the caller waiting for request ``key``
    EVENTS = "events"  # to the connection's event stream (``key``: the subscription, "" if unknown)
    JOB = "job"  # to the watchers of job ``key``


@dataclass(frozen=True, slots=True)
class Delivery:
    """A frame, routed: ``item`` is a result (converted for its action), an :class:`Event`, a
    :class:`JobMessage`, or a :class:`RegistryError` for the receiver to raise."""

    route: Route
    key: str
    item: Any


def _entries(result: Any) -> list[ServiceEntry]:
    return [ServiceEntry.from_dict(item) for item in result]


def _endpoints(result: Any) -> list[EndpointRecord]:
    return [
        EndpointRecord(
            item["service_name"],
            item["host_id"],
            item["endpoint"],
            item["protocol"],
            item["ip"],
            item["port"],
            Location(item["location"]),
            ServiceState(item["state"]),
        )
        for item in result
    ]


def _allocations(result: Any) -> list[Allocation]:
    return [Allocation.from_dict(item) for item in result]


def _topology(result: Any) -> Topology:
    """``{"revision", "topology"}``: the topology (empty while none was detected) at that revision."""
    recorded = result["topology"]
    topology = Topology.from_dict(recorded) if recorded is not None else Topology()
    return dataclasses.replace(topology, revision=int(result["revision"]))


# How the result of an action becomes typed; the others (ping, authenticate, subscribe,
# unsubscribe) stay plain JSON values.
_RESULTS: Final[Mapping[str, Callable[[Any], Any]]] = {
    "list_services": _entries,
    "get_service": ServiceEntry.from_dict,
    "list_endpoints": _endpoints,
    "register_service": ServiceEntry.from_dict,
    "remove_service": ServiceEntry.from_dict,
    "set_state": ServiceEntry.from_dict,
    "heartbeat": ServiceEntry.from_dict,
    "allocate_ip": Allocation.from_dict,
    "release_ip": _allocations,
    "list_allocations": _allocations,
    "get_topology": _topology,
    "list_networks": lambda result: [NetworkSummary.from_dict(item) for item in result],
    "deploy_package": DeployJob.from_dict,
    "get_job": DeployJob.from_dict,
    "watch_job": DeployJob.from_dict,
    "list_jobs": lambda result: [DeployJob.from_dict(item) for item in result],
}


class ClientCodec:
    """The client half: numbers requests, decodes frames and decides where each one goes.

    The clients only move frames and wake whoever waits: :meth:`route` says which caller
    a response belongs to (and converts its result), which subscription an event is for,
    which job a job message is about. It also keeps each subscription's last revision, so
    a client can resume after a reconnect. ``encode_request`` is thread-safe.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._waiting: dict[str, str] = {}  # request id -> action
        self._paged: set[str] = set()  # request ids that asked for one page (a limit or a cursor)
        self._revisions: dict[str, int] = {}

    def encode_request(self, action: str, params: Mapping[str, Any] | None = None) -> tuple[str, bytes]:
        """``(request id, frame)`` for an action; unknown actions fail here, before sending."""
        if action not in ACTIONS:
            raise UnknownAction(f"unknown action {action!r}", details={"action": action})
        request_id = str(next(self._ids))
        clean = {key: value for key, value in (params or {}).items() if value is not None}
        self._waiting[request_id] = action
        if "limit" in clean or "cursor" in clean:
            self._paged.add(request_id)
        return request_id, _dumps({"id": request_id, "type": "request", "action": action, "params": clean})

    def forget(self, request_id: str) -> None:
        """Nobody waits for ``request_id`` any more (answered, timed out, cancelled)."""
        self._waiting.pop(request_id, None)
        self._paged.discard(request_id)

    def last_revision(self, subscription: str) -> int | None:
        """The revision of the last event (or of the subscribe answer) of ``subscription``."""
        return self._revisions.get(subscription)

    def route(self, frame: str | bytes) -> Delivery | None:
        """Where one frame from the server goes; None for an answer nobody waits for.

        Raises:
            ProtocolError: the frame cannot be read; the connection cannot be trusted any more.
        """
        message = self.decode(frame)
        if isinstance(message, EventMessage):
            self._revisions[message.subscription] = message.event.revision
            return Delivery(Route.EVENTS, message.subscription, message.event)
        if isinstance(message, JobMessage):
            return Delivery(Route.JOB, message.job, message)
        if message.id is None:  # about a subscription (e.g. lagged), not a request
            subscription = message.error.details.get("subscription")
            return Delivery(Route.EVENTS, subscription if isinstance(subscription, str) else "", message.error)
        action = self._waiting.pop(message.id, None)
        paged = message.id in self._paged
        self._paged.discard(message.id)
        if action is None:
            return None
        if isinstance(message, ErrorMessage):
            return Delivery(Route.REPLY, message.id, message.error)
        result = self._result(action, message.result)
        if paged and not isinstance(result, RegistryError):
            result = Page(result, message.next_cursor)
        return Delivery(Route.REPLY, message.id, result)

    def _result(self, action: str, result: Any) -> Any:
        try:
            if action == "subscribe":
                self._revisions[result["subscription"]] = result["revision"]
            elif action == "unsubscribe":
                self._revisions.pop(result["unsubscribed"], None)
            convert_result = _RESULTS.get(action)
            return convert_result(result) if convert_result is not None else result
        except (KeyError, TypeError, ValueError) as exc:
            return ProtocolError(f"the server sent a malformed answer to {action}: {exc}")

    def decode(self, frame: str | bytes) -> Response | ErrorMessage | EventMessage | JobMessage:
        """One frame from the server.

        Raises:
            ProtocolError: the server sent something that is not a valid frame.
        """
        try:
            message = msgspec.json.decode(frame)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"the server sent invalid JSON: {exc}") from None
        if not isinstance(message, dict):
            raise ProtocolError("the server sent a frame that is not an object")
        kind = message.get("type")
        try:
            if kind == "response":
                cursor = message.get("next_cursor")
                return Response(str(message["id"]), message.get("result"), cursor if isinstance(cursor, str) else None)
            if kind == "error":
                error = message["error"]
                if not isinstance(error, dict):
                    raise TypeError("error is not an object")
                return ErrorMessage(message.get("id"), _decode_error(error))
            if kind == "event":
                event = Event(
                    EventType(message["event"]),
                    int(message["revision"]),
                    message.get("data") or {},
                    float(message.get("timestamp", 0.0)),
                    str(message["subscription"]),
                )
                return EventMessage(str(message["subscription"]), event)
            if kind == "job":
                data = message.get("data") or {}
                if not isinstance(data, dict):
                    raise TypeError("job data is not an object")
                return JobMessage(str(message["job"]), str(message["event"]), data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"the server sent a malformed {kind} frame: {exc!r}") from None
        raise ProtocolError(f"the server sent a frame of unknown type {kind!r}")
