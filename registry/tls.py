"""TLS for the registry: server and client contexts (standard :mod:`ssl`) and a small CA.

The API is TLS only. :class:`TlsServerConfig` builds the server's context (TLS >= 1.2,
no renegotiation, no compression, OpenSSL's default secure ciphers) and, with a client
CA, accepts client certificates (mTLS) without requiring them, so a client may
authenticate with a certificate or a bearer token. :class:`TlsClientConfig` builds the
client's context: verification on unless ``verify=False`` is asked for explicitly.

:func:`generate_ca`, :func:`generate_server_certificate` and
:func:`generate_client_certificate` make the EC P-256 certificates ``svcreg init`` writes.

Private keys never appear in an exception, a repr or a log line: errors name the file.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import secrets
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .exceptions import ConfigError, ValidationError

__all__ = [
    "CertificateBundle",
    "TlsClientConfig",
    "TlsServerConfig",
    "client_identity",
    "generate_ca",
    "generate_client_certificate",
    "generate_server_certificate",
    "write_file_atomically",
]

log = logging.getLogger(__name__)

_MINIMUM_TLS_VERSION: Final = ssl.TLSVersion.TLSv1_2

# Certificates start a little in the past so a peer whose clock is slightly behind accepts them.
_CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
_EXPIRY_WARNING: Final = datetime.timedelta(days=30)

StrPath = str | os.PathLike[str]

# ASCII labels (IDNA A-labels for international names), underscores tolerated, optional leading wildcard.
_DNS_NAME: Final = re.compile(
    r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*"
)


# --- reading and checking PEM files ---------------------------------------------------------------


def _read(path: Path, what: str, where: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist", field=where) from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}", field=where) from None


def _load_certificates(path: Path, what: str, where: str) -> list[x509.Certificate]:
    data = _read(path, what, where)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise ConfigError(f"{what} {path} holds no PEM certificate", field=where)
    return certificates


def _parse_private_key(data: bytes) -> PrivateKeyTypes:
    """Raises TypeError for an encrypted key, ValueError for anything else that is not a usable key."""
    try:
        return serialization.load_pem_private_key(data, password=None)
    except UnsupportedAlgorithm:
        raise ValueError("unsupported key type") from None


def _load_private_key(path: Path, where: str) -> PrivateKeyTypes:
    data = _read(path, "private key", where)
    # Nothing from the file or from the parser's message goes into these errors.
    try:
        return _parse_private_key(data)
    except TypeError:
        raise ConfigError(
            f"private key {path} is encrypted; svcreg needs an unencrypted key (protect it with mode 0600)",
            field=where,
        ) from None
    except ValueError:
        raise ConfigError(f"private key {path} is not a PEM private key", field=where) from None


def _public_bytes(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _warn_if_readable_by_others(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning("private key %s is readable by group or others (mode %o); chmod 600 it", path, mode & 0o777)


def _warn_if_expiring(certificate: x509.Certificate, path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    expires = certificate.not_valid_after_utc
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
        config = cls(Path(cert), Path(key), Path(client_ca) if client_ca is not None else None)
        leaf = _load_certificates(config.cert, "certificate", "tls.cert")[0]
        private_key = _load_private_key(config.key, "tls.key")
        if _public_bytes(leaf.public_key()) != _public_bytes(private_key.public_key()):
            raise ConfigError(
                f"private key {config.key} does not belong to the certificate {config.cert}", field="tls.key"
            )
        if config.client_ca is not None:
            _load_certificates(config.client_ca, "client CA", "tls.client_ca")
        _warn_if_readable_by_others(config.key)
        _warn_if_expiring(leaf, config.cert)
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


# --- certificate generation -------------------------------------------------------------------------


def write_file_atomically(path: StrPath, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: a reader sees the old file or the new one, never half of one.

    The temporary file is created with ``mode`` (``os.open``), so a secret is never readable
    by others, not even for an instant; the umask can only narrow it.
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@dataclass(frozen=True, slots=True)
class CertificateBundle:
    """A PEM certificate and its PEM private key (the key is left out of the repr)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def common_name(self) -> str:
        names = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""

    def write(self, cert_path: StrPath, key_path: StrPath) -> None:
        """Write both files atomically: the key with mode 0600, the certificate 0644."""
        write_file_atomically(key_path, self.key_pem, mode=0o600)
        write_file_atomically(cert_path, self.cert_pem, mode=0o644)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _validity(days: int, not_before: datetime.datetime | None) -> tuple[datetime.datetime, datetime.datetime]:
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise ValidationError(f"days {days!r} must be a positive number of days", field="days")
    start = not_before if not_before is not None else datetime.datetime.now(datetime.UTC) - _CLOCK_SKEW
    if start.tzinfo is None:
        raise ValidationError(f"not_before {start!r} must be timezone-aware", field="not_before")
    return start, start + datetime.timedelta(days=days)


def _common_name(value: str, where: str) -> x509.Name:
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        raise ValidationError(f"{where} {value!r} must be 1 to 64 characters", field=where)
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def _load_issuer(ca: CertificateBundle) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    certificate = ca.certificate
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ValidationError(f"certificate {ca.common_name!r} is not a CA certificate", field="ca")
    try:
        key = _parse_private_key(ca.key_pem)
    except (TypeError, ValueError):
        raise ValidationError(
            f"the key of CA {ca.common_name!r} is not an unencrypted PEM private key", field="ca"
        ) from None
    if not isinstance(key, CertificateIssuerPrivateKeyTypes):
        raise ValidationError(f"the key of CA {ca.common_name!r} cannot sign certificates", field="ca")
    if _public_bytes(key.public_key()) != _public_bytes(certificate.public_key()):
        raise ValidationError(f"the CA key does not belong to the CA certificate {ca.common_name!r}", field="ca")
    return certificate, key


def _issue(
    ca: CertificateBundle,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    *,
    days: int,
    not_before: datetime.datetime | None,
    names: list[x509.GeneralName] | None = None,
) -> CertificateBundle:
    issuer, issuer_key = _load_issuer(ca)
    start, end = _validity(days, not_before)
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(issuer_key, hashes.SHA256())
    return CertificateBundle(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def generate_ca(
    common_name: str = "svcreg CA", *, days: int = 3650, not_before: datetime.datetime | None = None
) -> CertificateBundle:
    """A self-signed CA (EC P-256) that may sign leaf certificates only (path length 0).

    Raises:
        ValidationError: a bad common name or ``days``.
    """
    subject = _common_name(common_name, "common_name")
    start, end = _validity(days, not_before)
    key = _new_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateBundle(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _subject_alternative_names(hostnames: Iterable[str], ips: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for hostname in hostnames:
        if not isinstance(hostname, str) or len(hostname) > 253 or not _DNS_NAME.fullmatch(hostname):
            raise ValidationError(f"hostname {hostname!r} is not an ASCII DNS name", field="hostnames")
        names.append(x509.DNSName(hostname))
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ValidationError(f"ip {ip!r} is not an IP address", field="ips") from None
    return names


def generate_server_certificate(
    ca: CertificateBundle,
    *,
    hostnames: list[str],
    ips: list[str],
    days: int = 825,
    not_before: datetime.datetime | None = None,
) -> CertificateBundle:
    """A server certificate signed by ``ca``, valid for ``hostnames`` and ``ips`` (serverAuth).

    ``not_before`` (timezone-aware) moves the validity window, e.g. into the past for tests.

    Raises:
        ValidationError: no names at all, a bad hostname or IP, bad ``days``, or ``ca`` is not a CA.
    """
    names = _subject_alternative_names(hostnames, ips)
    if not names:
        raise ValidationError("a server certificate needs at least one hostname or IP", field="hostnames")
    common_name = hostnames[0] if hostnames else ips[0]
    return _issue(
        ca,
        _common_name(common_name, "hostnames"),
        ExtendedKeyUsageOID.SERVER_AUTH,
        days=days,
        not_before=not_before,
        names=names,
    )


def generate_client_certificate(
    ca: CertificateBundle,
    common_name: str,
    *,
    days: int = 825,
    not_before: datetime.datetime | None = None,
) -> CertificateBundle:
    """A client certificate signed by ``ca`` (clientAuth); ``common_name`` is the principal's name.

    Raises:
        ValidationError: a bad common name or ``days``, or ``ca`` is not a CA.
    """
    return _issue(
        ca,
        _common_name(common_name, "common_name"),
        ExtendedKeyUsageOID.CLIENT_AUTH,
        days=days,
        not_before=not_before,
    )
