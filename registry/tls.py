"""TLS for the registry: server and client contexts (standard :mod:`ssl`).

The API is TLS only. :class:`TlsServerConfig` builds the server's context (TLS >= 1.2,
no renegotiation, no compression, OpenSSL's default secure ciphers) and, with a client
CA, accepts client certificates (mTLS) without requiring them, so a client may
authenticate with a certificate or a bearer token. :class:`TlsClientConfig` builds the
client's context: verification on unless ``verify=False`` is asked for explicitly.

Certificates are made and their files checked in :mod:`registry.pki`; this module does
not import ``cryptography``, so clients stay light.

Private keys never appear in an exception, a repr or a log line: errors name the file.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .exceptions import ConfigError

__all__ = [
    "TlsClientConfig",
    "TlsServerConfig",
    "client_identity",
]

log = logging.getLogger(__name__)

_MINIMUM_TLS_VERSION: Final = ssl.TLSVersion.TLSv1_2
_EXPIRY_WARNING: Final = datetime.timedelta(days=30)

StrPath = str | os.PathLike[str]


def _warn_if_readable_by_others(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning("private key %s is readable by group or others (mode %o); chmod 600 it", path, mode & 0o777)


def _warn_if_expiring(expires: datetime.datetime, path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if expires <= now:
        log.warning("certificate %s expired on %s: clients will refuse it", path, expires.date())
    elif expires - now < _EXPIRY_WARNING:
        log.warning("certificate %s expires on %s (in %d days)", path, expires.date(), (expires - now).days)


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = _MINIMUM_TLS_VERSION
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


# --- server ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsServerConfig:
    """The server's certificate chain, key and optional client CA. Build with :meth:`from_files`."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_files(cls, cert: StrPath, key: StrPath, *, client_ca: StrPath | None = None) -> TlsServerConfig:
        """Check the files now, so a bad certificate stops ``svcreg serve`` before it listens.

        Args:
            cert: PEM certificate chain, the server's certificate first.
            key: its unencrypted PEM private key.
            client_ca: PEM CA certificate(s) that sign client certificates; enables mTLS.

        Raises:
            ConfigError: a file is missing or unreadable, is not PEM, or the key does not
                belong to the certificate.
        """
        # Imported here: only a server reads certificates, and clients must not pay for cryptography.
        from .pki import check_server_files

        config = cls(Path(cert), Path(key), Path(client_ca) if client_ca is not None else None)
        expires = check_server_files(config.cert, config.key, client_ca=config.client_ca)
        _warn_if_readable_by_others(config.key)
        _warn_if_expiring(expires, config.cert)
        config.ssl_context()
        return config

    def ssl_context(self) -> ssl.SSLContext:
        """A new server-side context. Files are read again, so renewed certificates are picked up.

        Raises:
            ConfigError: as :meth:`from_files`.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _harden(context)
        # No TLS 1.3 session tickets: they arrive right after the handshake, and websockets' sync
        # client reads and writes its SSLSocket from two threads, which on Python 3.11 sometimes
        # loses the upgrade response (about 1 connection in 800 hung for the open timeout).
        # Resumption buys nothing here: clients hold one long-lived connection.
        context.num_tickets = 0
        try:
            context.load_cert_chain(self.cert, self.key)
        except FileNotFoundError as exc:
            raise ConfigError(f"TLS file {exc.filename or self.cert} does not exist", field="tls") from None
        except (OSError, ssl.SSLError):
            # OpenSSL's reason is left out on purpose: only the file names are safe to show.
            raise ConfigError(
                f"cannot load the certificate {self.cert} with the key {self.key}: not PEM, or they do not match",
                field="tls",
            ) from None
        if self.client_ca is None:
            context.verify_mode = ssl.CERT_NONE
        else:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"client CA {self.client_ca} cannot be loaded: {getattr(exc, 'strerror', None) or 'not PEM'}",
                    field="tls.client_ca",
                ) from None
            # Optional, not required: a client without a certificate can still send a token.
            context.verify_mode = ssl.CERT_OPTIONAL
        return context


def client_identity(peercert: Mapping[str, Any] | None) -> str | None:
    """The subject common name of a verified client certificate, else ``None``.

    ``peercert`` is :meth:`ssl.SSLSocket.getpeercert` (or the transport's ``"peercert"``):
    the standard library fills it only for a certificate that passed verification against
    the client CA, and gives ``None`` or ``{}`` otherwise.
    """
    if not peercert:
        return None
    for relative_name in peercert.get("subject", ()):
        for key, value in relative_name:
            if key == "commonName" and value:
                return str(value)
    return None


# --- client ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsClientConfig:
    """How a client checks the registry (and, optionally, proves who it is).

    Args:
        ca_file: PEM CA certificate(s) to trust instead of the system roots (a private CA).
        cert: PEM client certificate for mTLS (may also hold the key).
        key: its PEM private key.
        verify: ``False`` turns off certificate and hostname checks. Never the default; logs a warning.
    """

    ca_file: StrPath | None = None
    cert: StrPath | None = None
    key: StrPath | None = None
    verify: bool = field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        if self.key is not None and self.cert is None:
            raise ConfigError("a client key was given without a client certificate", field="cert")
        if not self.verify:
            log.warning("TLS certificate verification is OFF: the registry's identity is not checked")

    @classmethod
    def default(cls) -> TlsClientConfig:
        """Verify against the system's trusted roots."""
        return cls()

    def ssl_context(self) -> ssl.SSLContext:
        """A new client-side context: TLS >= 1.2, hostname and certificate checked unless ``verify=False``.

        Raises:
            ConfigError: the CA file or the client certificate/key cannot be loaded.
        """
        if self.verify:
            try:
                context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
            except FileNotFoundError:
                raise ConfigError(f"CA file {self.ca_file} does not exist", field="ca_file") from None
            except (OSError, ssl.SSLError):
                raise ConfigError(f"CA file {self.ca_file} cannot be loaded (not PEM?)", field="ca_file") from None
            context.check_hostname = True
            context.verify_mode = ssl.CERT_REQUIRED
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        _harden(context)
        if self.cert is not None:
            try:
                context.load_cert_chain(self.cert, self.key)
            except FileNotFoundError as exc:
                raise ConfigError(f"client TLS file {exc.filename or self.cert} does not exist", field="cert") from None
            except (OSError, ssl.SSLError):
                raise ConfigError(
                    f"cannot load the client certificate {self.cert} with the key {self.key or self.cert}: "
                    "not PEM, encrypted, or they do not match",
                    field="cert",
                ) from None
        return context
