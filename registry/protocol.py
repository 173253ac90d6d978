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

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

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
    error_from_wire,
)

__all__ = [
    "ACTIONS",
    "MAX_ID_LENGTH",
    "ActionSpec",
    "ClientCodec",
    "ErrorMessage",
    "EventMessage",
    "JobMessage",
    "Param",
    "Request",
    "Response",
    "decode_request",
    "encode_error",
    "encode_event",
    "encode_job",
    "encode_response",
]

MAX_ID_LENGTH: Final = 128


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of an action: its JSON type and whether it must be given."""

    kind: type | tuple[type, ...]
    required: bool = False

    def describe(self) -> str:
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        return " or ".join(_JSON_NAMES[kind] for kind in kinds)


_JSON_NAMES: Final = {str: "string", int: "integer", bool: "boolean", list: "array", dict: "object", float: "number"}


@dataclass(frozen=True, slots=True)
class ActionSpec:
    role: Role | None  # None: allowed before authentication
    params: Mapping[str, Param] = field(default_factory=dict)


_FILTERS: Final = {name: Param(str) for name in ("service_name", "host_id", "location", "state", "network", "tag")}

ACTIONS: Final[Mapping[str, ActionSpec]] = {
    "ping": ActionSpec(None),
    "authenticate": ActionSpec(None, {"token": Param(str, required=True)}),
    "list_services": ActionSpec(Role.READ, _FILTERS),
    "get_service": ActionSpec(Role.READ, {"service_name": Param(str, required=True), "host_id": Param(str)}),
    "list_endpoints": ActionSpec(Role.READ, _FILTERS),
    "subscribe": ActionSpec(Role.READ, {"events": Param(list), "since_revision": Param(int), "filter": Param(dict)}),
    "unsubscribe": ActionSpec(Role.READ, {"subscription": Param(str, required=True)}),
    "list_networks": ActionSpec(Role.READ),
    "get_topology": ActionSpec(Role.READ),
    "list_allocations": ActionSpec(Role.READ, {"network": Param(str)}),
    "register_service": ActionSpec(Role.WRITE, {"service": Param(dict, required=True)}),
    "remove_service": ActionSpec(Role.WRITE, {"service_name": Param(str, required=True), "host_id": Param(str)}),
    "set_state": ActionSpec(
        Role.WRITE,
        {"service_name": Param(str, required=True), "state": Param(str, required=True), "host_id": Param(str)},
    ),
    "heartbeat": ActionSpec(Role.WRITE, {"service_name": Param(str, required=True), "host_id": Param(str)}),
    "allocate_ip": ActionSpec(Role.WRITE, {"owner": Param(str, required=True), "network": Param(str, required=True)}),
    "release_ip": ActionSpec(Role.WRITE, {"owner": Param(str, required=True), "network": Param(str)}),
    "deploy_package": ActionSpec(
        Role.ADMIN,
        {
            "package": Param(str, required=True),
            "node": Param(str),
            "target": Param(dict),
            "targets": Param(list),
            "env": Param(dict),
            "keep_releases": Param(int),
        },
    ),
    "watch_job": ActionSpec(Role.READ, {"job": Param(str, required=True)}),
    "get_job": ActionSpec(Role.READ, {"job": Param(str, required=True)}),
    "list_jobs": ActionSpec(Role.READ),
}


# --- messages -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    id: str
    action: str
    params: Mapping[str, Any]

    @property
    def spec(self) -> ActionSpec:
        return ACTIONS[self.action]


@dataclass(frozen=True, slots=True)
class Response:
    id: str
    result: Any


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


class RequestError(ProtocolError):
    """A frame that is not a valid request; ``request_id`` is its id when one could be read."""

    def __init__(self, message: str, *, request_id: str | None, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.request_id = request_id


# --- server side ----------------------------------------------------------------------


def _loads(frame: str | bytes) -> Any:
    try:
        return json.loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the frame is not valid JSON: {exc}", request_id=None) from None


def decode_request(frame: str | bytes) -> Request:
    """Parse and check one request frame.

    Raises:
        RequestError: not JSON, not a request, bad id, bad params (code ``bad_request``).
        UnknownAction: a well-formed request for an action that does not exist; its
            ``details["id"]`` is the request id.
    """
    message = _loads(frame)
    if not isinstance(message, dict):
        raise RequestError("a request must be a JSON object", request_id=None)
    raw_id = message.get("id")
    request_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID_LENGTH else None
    if request_id is None:
        problem = "is missing" if raw_id is None else f"must be a string of 1-{MAX_ID_LENGTH} characters"
        raise RequestError(f"the request id {problem}", request_id=None, field="id")
    if message.get("type") != "request":
        raise RequestError(f"type must be 'request', got {message.get('type')!r}", request_id=request_id, field="type")
    unknown = set(message) - {"id", "type", "action", "params"}
    if unknown:
        raise RequestError(
            f"unknown request field(s): {', '.join(sorted(unknown))}", request_id=request_id, field="request"
        )
    action = message.get("action")
    if not isinstance(action, str):
        raise RequestError("action must be a string", request_id=request_id, field="action")
    spec = ACTIONS.get(action)
    if spec is None:
        error = UnknownAction(
            f"unknown action {action!r}; actions are: {', '.join(sorted(ACTIONS))}", details={"action": action}
        )
        error.details["id"] = request_id
        raise error
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RequestError("params must be an object", request_id=request_id, field="params")
    _check_params(action, spec, params, request_id)
    return Request(request_id, action, params)


def _check_params(action: str, spec: ActionSpec, params: dict[str, Any], request_id: str) -> None:
    unknown = set(params) - set(spec.params)
    if unknown:
        allowed = ", ".join(sorted(spec.params)) or "none"
        raise RequestError(
            f"{action}: unknown param(s) {', '.join(sorted(unknown))}; allowed: {allowed}",
            request_id=request_id,
            field=f"params.{sorted(unknown)[0]}",
        )
    for name, param in spec.params.items():
        if name not in params or params[name] is None:
            if param.required:
                raise RequestError(
                    f"{action}: param {name!r} is required", request_id=request_id, field=f"params.{name}"
                )
            continue
        value = params[name]
        # bool is an int in Python, never in our protocol.
        if not isinstance(value, param.kind) or (isinstance(value, bool) and param.kind is not bool):
            raise RequestError(
                f"{action}: param {name!r} must be {param.describe()}, got {_json_type(value)} {value!r}"[:300],
                request_id=request_id,
                field=f"params.{name}",
            )


def _json_type(value: object) -> str:
    return "null" if value is None else _JSON_NAMES.get(type(value), type(value).__name__)


def _dumps(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), allow_nan=False, default=_default)


def _default(value: object) -> Any:
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_response(request_id: str, result: Any) -> str:
    """A response frame; objects with ``to_dict()`` are serialised through it."""
    return _dumps({"id": request_id, "type": "response", "result": result})


# Classes that share their parent's wire code (ServiceNotFound is a not_found). An error frame names the
# most specific of them in "class", so a client raises what the library raises; the code stays authoritative.
_SUBCLASSES: Final[Mapping[str, type[RegistryError]]] = {
    cls.__name__: cls
    for cls in (ServiceNotFound, SubscriptionClosed, SubscriptionLagged, ConfigError, ProtocolError, StoreError)
}


def encode_error(request_id: str | None, error: RegistryError) -> str:
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


def encode_job(job: str, event: str, data: Mapping[str, Any]) -> str:
    return _dumps({"type": "job", "job": job, "event": event, "data": data})


def encode_event(subscription: str, event: Event) -> str:
    return _dumps(
        {
            "type": "event",
            "subscription": subscription,
            "event": event.type.value,
            "revision": event.revision,
            "timestamp": event.timestamp,
            "data": event.data,
        }
    )


# --- client side ------------------------------------------------------------------------


class ClientCodec:
    """The client half: numbers requests and turns frames into typed messages.

    Thread-safe for ``encode_request`` (ids come from an atomic counter).
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def encode_request(self, action: str, params: Mapping[str, Any] | None = None) -> tuple[str, str]:
        """``(request id, frame)`` for an action; unknown actions fail here, before sending."""
        if action not in ACTIONS:
            raise UnknownAction(f"unknown action {action!r}", details={"action": action})
        request_id = str(next(self._ids))
        clean = {key: value for key, value in (params or {}).items() if value is not None}
        return request_id, _dumps({"id": request_id, "type": "request", "action": action, "params": clean})

    def decode(self, frame: str | bytes) -> Response | ErrorMessage | EventMessage | JobMessage:
        """One frame from the server.

        Raises:
            ProtocolError: the server sent something that is not a valid frame.
        """
        try:
            message = json.loads(frame)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"the server sent invalid JSON: {exc}") from None
        if not isinstance(message, dict):
            raise ProtocolError("the server sent a frame that is not an object")
        kind = message.get("type")
        try:
            if kind == "response":
                return Response(str(message["id"]), message.get("result"))
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
