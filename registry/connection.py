"""Where and how a client connects: the registry URL, :class:`ConnectionSettings`, and the
handshake and connection errors every client flavour shares (TLS only, a refused token is
:class:`Unauthorized`, anything else on the way is :class:`ConnectionFailed`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .exceptions import ConnectionFailed, Forbidden, Unauthorized, ValidationError
from .tls import TlsClientConfig

__all__ = [
    "ConnectionSettings",
    "closed_error",
    "connect_options",
    "connecting",
    "no_answer",
    "registry_url",
]


def registry_url(addr: str) -> str:
    """``host:port`` or ``wss://host:port/`` -> a ``wss://`` URL; ``ws://`` is refused."""
    if addr.startswith("wss://"):
        return addr
    if addr.startswith(("ws://", "http://")):
        raise ValidationError(f"{addr!r}: svcreg only speaks TLS; use wss://", field="url")
    if addr.startswith("https://"):
        return "wss://" + addr.removeprefix("https://")
    return f"wss://{addr}/"


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """Where and how to connect; ``from_env`` reads SVCREG_URL, SVCREG_CA, SVCREG_TOKEN..."""

    url: str
    tls: TlsClientConfig
    token: str | None = None
    timeout: float = 10.0
    max_message_size: int = 16 * 2**20

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ConnectionSettings:
        env = os.environ if environ is None else environ
        url = overrides.pop("url", None) or env.get("SVCREG_URL")
        if not url:
            raise ValidationError("no registry URL: pass --url or set SVCREG_URL", field="url")
        tls = overrides.pop("tls", None) or TlsClientConfig(
            ca_file=env.get("SVCREG_CA") or None,
            cert=env.get("SVCREG_CLIENT_CERT") or None,
            key=env.get("SVCREG_CLIENT_KEY") or None,
        )
        token = overrides.pop("token", None) or env.get("SVCREG_TOKEN") or None
        return cls(registry_url(url), tls, token, **overrides)

    @classmethod
    def for_address(
        cls, addr: str, tls: TlsClientConfig | None = None, *, token: str | None = None, timeout: float = 10.0
    ) -> ConnectionSettings:
        """Settings for ``host:port`` or a ``wss://`` URL (system CAs unless ``tls`` says otherwise)."""
        return cls(registry_url(addr), tls or TlsClientConfig.default(), token, timeout)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def __repr__(self) -> str:  # never show the token
        return f"ConnectionSettings(url={self.url!r}, token={'***' if self.token else None})"


_CONNECT_ERRORS: Final = (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed)


def connect_options(settings: ConnectionSettings) -> dict[str, Any]:
    """The options every flavour's ``connect`` takes, from the settings."""
    return {
        "ssl": settings.tls.ssl_context(),
        "additional_headers": settings.headers(),
        "open_timeout": settings.timeout,
        "max_size": settings.max_message_size,
    }


@contextlib.contextmanager
def connecting(url: str) -> Iterator[None]:
    """Turn a failed handshake into our error; a refused token is not a network problem."""
    try:
        yield
    except _CONNECT_ERRORS as exc:
        if isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403):
            error_class = Unauthorized if exc.response.status_code == 401 else Forbidden
            raise error_class(f"{url} refused the connection: {_describe(exc)}") from None
        raise ConnectionFailed(f"cannot connect to {url}: {_describe(exc)}") from None


def closed_error(url: str, exc: BaseException | None = None) -> ConnectionFailed:
    """The connection is gone; ``exc`` (the close frame, an unreadable frame) says why, when known."""
    return ConnectionFailed(f"the connection to {url} closed" + (f": {_describe(exc)}" if exc is not None else ""))


def no_answer(action: str, settings: ConnectionSettings) -> ConnectionFailed:
    return ConnectionFailed(f"{action}: no answer from {settings.url} in {settings.timeout} s")


def _describe(exc: BaseException) -> str:
    """What went wrong, for a message: the close code and reason, the HTTP status, the error."""
    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd or exc.sent
        return f"code {frame.code} {frame.reason!r}" if frame else "no close frame"
    if isinstance(exc, InvalidStatus):
        body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
        return f"HTTP {exc.response.status_code} {body}".strip()
    return str(exc) or type(exc).__name__
