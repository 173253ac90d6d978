"""One exception hierarchy for the whole toolkit.

Every error the registry raises derives from :class:`RegistryError` and carries a
``code``: the wire error code the server sends for it. The mapping is 1:1: each wire
code has exactly one class here, and subclasses (``ServiceNotFound`` is a
``NotFound``) share their parent's code::

    RegistryError                      (abstract base, never raised itself)
    ├── ValidationError                bad_request      bad input: a field, a value, a file
    │   ├── ConfigError                                 services.yaml / config file problems
    │   ├── ProtocolError                               malformed wire message
    │   └── PackageError                                a service package refused (member, reason)
    ├── UnknownAction                  unknown_action
    ├── Unauthorized                   unauthorized
    ├── Forbidden                      forbidden
    ├── NotFound                       not_found
    │   ├── ServiceNotFound
    │   └── SubscriptionClosed                          reading a closed subscription
    ├── Conflict                       conflict
    ├── PoolExhausted                  pool_exhausted
    ├── Compacted                      compacted        resume point older than the retained log
    ├── TooLarge                       too_large
    ├── RateLimited                    rate_limited
    │   └── SubscriptionLagged                          a subscriber fell behind its queue
    └── InternalError                  internal
        ├── StoreError                                  the store cannot be opened or written
        └── ConnectionFailed                            (client side) cannot reach or lost the server

``details`` is a JSON-serialisable dict that travels with the error on the wire; it must
never hold secrets.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ERROR_CODES",
    "Compacted",
    "ConfigError",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "InternalError",
    "NotFound",
    "PackageError",
    "PoolExhausted",
    "ProtocolError",
    "RateLimited",
    "RegistryError",
    "ServiceNotFound",
    "StoreError",
    "SubscriptionClosed",
    "SubscriptionLagged",
    "TooLarge",
    "Unauthorized",
    "UnknownAction",
    "ValidationError",
    "error_class_for_code",
    "error_from_wire",
]


class RegistryError(Exception):
    """Base class of every error raised by the registry."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def to_dict(self) -> dict[str, Any]:
        """The wire form: ``{"code": ..., "message": ..., "details": {...}}``."""
        return {"code": self.code, "message": self.message, "details": dict(self.details)}


class ValidationError(RegistryError, ValueError):
    """Bad input: names the field and the value that was wrong.

    Also a ``ValueError``, so that a validator raising it inside a msgspec struct's
    ``__post_init__`` reaches :mod:`registry.schema` with the path to that struct.
    """

    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, details: dict[str, Any] | None = None) -> None:
        merged = dict(details or {})
        if field is not None:
            merged.setdefault("field", field)
        super().__init__(message, details=merged)
        self.field = field


class ConfigError(ValidationError):
    """A configuration file (services.yaml, server config) is invalid."""


class ProtocolError(ValidationError):
    """A wire message could not be understood."""


class PackageError(ValidationError):
    """A service package is refused: ``details`` names the ``member`` (if any) and the ``reason``."""

    def __init__(self, message: str, *, member: str | None = None, package: str | None = None) -> None:
        details: dict[str, Any] = {}
        if member is not None:
            details["member"] = member
        if package is not None:
            details["package"] = package
        super().__init__(message, details=details)
        self.member = member


class UnknownAction(RegistryError):
    code = "unknown_action"


class Unauthorized(RegistryError):
    code = "unauthorized"


class Forbidden(RegistryError):
    code = "forbidden"


class NotFound(RegistryError):
    code = "not_found"


class ServiceNotFound(NotFound):
    """No instance of the service (on the given host) is registered."""


class SubscriptionClosed(NotFound):
    """The subscription was closed (by its owner or the registry) and has no more events."""


class Conflict(RegistryError):
    code = "conflict"


class PoolExhausted(RegistryError):
    """A network has no free address left."""

    code = "pool_exhausted"


class Compacted(RegistryError):
    """The asked-for revision is older than the oldest event the store retains."""

    code = "compacted"

    def __init__(self, message: str, *, oldest_revision: int, requested_revision: int) -> None:
        super().__init__(
            message,
            details={"oldest_revision": oldest_revision, "requested_revision": requested_revision},
        )
        self.oldest_revision = oldest_revision
        self.requested_revision = requested_revision


class TooLarge(RegistryError):
    code = "too_large"


class RateLimited(RegistryError):
    code = "rate_limited"


class SubscriptionLagged(RateLimited):
    """The subscriber did not keep up: its queue overflowed and it was closed.

    ``last_revision`` is the last revision it received; resume with
    ``since_revision=last_revision``.
    """

    def __init__(self, message: str, *, last_revision: int) -> None:
        super().__init__(message, details={"last_revision": last_revision})
        self.last_revision = last_revision


class InternalError(RegistryError):
    code = "internal"


class StoreError(InternalError):
    """The store cannot be opened (missing, corrupt, foreign) or written."""


class ConnectionFailed(InternalError):
    """Client side: the registry could not be reached, or the connection was lost."""


def _wire_classes() -> dict[str, type[RegistryError]]:
    classes: dict[str, type[RegistryError]] = {}
    for cls in (
        ValidationError,
        UnknownAction,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PoolExhausted,
        Compacted,
        TooLarge,
        RateLimited,
        InternalError,
    ):
        classes[cls.code] = cls
    return classes


ERROR_CODES: dict[str, type[RegistryError]] = _wire_classes()
"""Wire error code -> the exception class that carries it."""


def error_class_for_code(code: str) -> type[RegistryError]:
    """The class for a wire code; unknown codes map to :class:`InternalError`."""
    return ERROR_CODES.get(code, InternalError)


def error_from_wire(code: str, message: str, details: dict[str, Any] | None = None) -> RegistryError:
    """Rebuild the exception a server sent as ``{"code", "message", "details"}``.

    Unknown codes become :class:`InternalError`; the attributes that some classes carry
    (``field``, ``oldest_revision``, ``last_revision``) are restored from ``details``.
    """
    cls = error_class_for_code(code)
    error = cls.__new__(cls)
    RegistryError.__init__(error, message, details=details)
    if isinstance(error, ValidationError):
        error.field = error.details.get("field")
    for name in ("oldest_revision", "requested_revision", "last_revision"):
        if name in error.details:
            setattr(error, name, error.details[name])
    return error
