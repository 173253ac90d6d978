"""Certificates for the registry: a small CA, server and client certificates, and checks of PEM files.

:func:`generate_ca`, :func:`generate_server_certificate` and
:func:`generate_client_certificate` make the EC P-256 certificates ``svcreg init`` writes;
:func:`check_server_files` checks a server's certificate and key before it listens.
This is the only module that needs ``cryptography``: clients, which only build TLS
contexts (:mod:`registry.tls`), never import it.

Private keys never appear in an exception, a repr or a log line: errors name the file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

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
    "check_server_files",
    "generate_ca",
    "generate_client_certificate",
    "generate_server_certificate",
    "write_file_atomically",
]

StrPath = str | os.PathLike[str]

# Certificates start a little in the past so a peer whose clock is slightly behind accepts them.
_CLOCK_SKEW: Final = datetime.timedelta(minutes=5)

# ASCII labels (IDNA A-labels for international names), underscores tolerated, optional leading wildcard.
_DNS_NAME: Final = re.compile(
    r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*"
)


# --- files ------------------------------------------------------------------------------------------


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


def check_server_files(cert: Path, key: Path, *, client_ca: Path | None = None) -> datetime.datetime:
    """Check that ``cert`` holds a PEM chain, ``key`` its unencrypted key, ``client_ca`` PEM certificates.

    Returns:
        When the server's certificate (the first of the chain) expires.

    Raises:
        ConfigError: a file is missing or unreadable, is not PEM, the key is encrypted or does
            not belong to the certificate (``field`` is ``tls.cert``, ``tls.key`` or ``tls.client_ca``).
    """
    leaf = _load_certificates(cert, "certificate", "tls.cert")[0]
    private_key = _load_private_key(key, "tls.key")
    if _public_bytes(leaf.public_key()) != _public_bytes(private_key.public_key()):
        raise ConfigError(f"private key {key} does not belong to the certificate {cert}", field="tls.key")
    if client_ca is not None:
        _load_certificates(client_ca, "client CA", "tls.client_ca")
    return leaf.not_valid_after_utc


# --- certificate generation -------------------------------------------------------------------------


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
    if not isinstance(key, typing.get_args(CertificateIssuerPrivateKeyTypes)):
        raise ValidationError(f"the key of CA {ca.common_name!r} cannot sign certificates", field="ca")
    if _public_bytes(key.public_key()) != _public_bytes(certificate.public_key()):
        raise ValidationError(f"the CA key does not belong to the CA certificate {ca.common_name!r}", field="ca")
    return certificate, typing.cast(CertificateIssuerPrivateKeyTypes, key)


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
