"""Certificate generation and atomic writes (registry.pki), on real files. No mocks."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registry.exceptions import ValidationError
from registry.pki import (
    CertificateBundle,
    generate_ca,
    generate_client_certificate,
    generate_server_certificate,
    write_file_atomically,
)

from .helpers import Pki, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


# --- certificate generation ------------------------------------------------------------------------------------


def test_generated_certificates_have_the_right_extensions(pki: Pki) -> None:
    ca = pki.ca.certificate
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    server = x509.load_pem_x509_certificate(pki.cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert server.issuer == ca.subject
    client = generate_client_certificate(pki.ca, "worker-1").certificate
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "worker-1"
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]


def test_validity_defaults_and_overrides(pki: Pki) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca = pki.ca.certificate
    assert ca.not_valid_before_utc <= now
    assert ca.not_valid_after_utc - ca.not_valid_before_utc == datetime.timedelta(days=3650)
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    old = generate_client_certificate(pki.ca, "old", days=10, not_before=start).certificate
    assert (old.not_valid_before_utc, old.not_valid_after_utc) == (start, start + datetime.timedelta(days=10))


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"hostnames": [], "ips": []}, "hostnames", "at least one hostname or IP"),
        ({"hostnames": ["bad name"], "ips": []}, "hostnames", "'bad name' is not an ASCII DNS name"),
        ({"hostnames": ["bücher.de"], "ips": []}, "hostnames", "'bücher.de'"),
        ({"hostnames": ["ok"], "ips": ["300.1.1.1"]}, "ips", "'300.1.1.1' is not an IP address"),
        ({"hostnames": ["ok"], "ips": [], "days": 0}, "days", "days 0 must be a positive"),
        (
            {"hostnames": ["ok"], "ips": [], "not_before": datetime.datetime(2020, 1, 1)},
            "not_before",
            "timezone-aware",
        ),
    ],
)
def test_generation_errors_name_the_field(pki: Pki, options: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        generate_server_certificate(pki.ca, **options)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_a_leaf_cannot_sign(pki: Pki) -> None:
    leaf = CertificateBundle(pki.cert.read_bytes(), pki.key.read_bytes())
    with pytest.raises(ValidationError, match="'localhost' is not a CA certificate"):
        generate_client_certificate(leaf, "x")


def test_bundle_repr_hides_the_key(pki: Pki) -> None:
    assert "PRIVATE" not in repr(pki.ca)
    assert b"PRIVATE KEY" in pki.ca.key_pem


# --- files -------------------------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0o002)
    yield
    os.umask(previous)


def test_bundle_write_modes(tmp_path: Path, permissive_umask: None) -> None:
    ca = generate_ca()
    ca.write(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert mode(tmp_path / "ca.key") == 0o600
    assert mode(tmp_path / "ca.crt") == 0o644
    assert (tmp_path / "ca.key").read_bytes() == ca.key_pem
    assert (tmp_path / "ca.crt").read_bytes() == ca.cert_pem


def test_atomic_write_replaces_and_leaves_no_temporary_files(tmp_path: Path, permissive_umask: None) -> None:
    target = tmp_path / "secret"
    target.write_text("old")
    target.chmod(0o644)
    write_file_atomically(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == ["secret"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "directory"
    target.mkdir()
    with pytest.raises(OSError):
        write_file_atomically(target, b"data")
    assert target.is_dir()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["directory"]
