"""TLS contexts, checked with real handshakes on 127.0.0.1. No mocks."""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from registry.exceptions import ConfigError
from registry.pki import CertificateBundle, generate_ca, generate_client_certificate
from registry.tls import TlsClientConfig, TlsServerConfig, client_identity

from .helpers import Pki, make_pki

TIMEOUT = 10


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@dataclass
class Outcome:
    client_error: BaseException | None = None
    server_error: BaseException | None = None
    identity: str | None = None
    version: str | None = None
    reply: bytes = b""

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.server_error is None and self.reply == b"pong"


def handshake(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, *, server_hostname: str = "localhost"
) -> Outcome:
    """One real connection: the server thread answers b"ping" with b"pong" and records the client's identity.

    The client reads after its handshake: with TLS 1.3 a refused client certificate only shows up then.
    """
    outcome = Outcome()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                raw, _ = listener.accept()
                raw.settimeout(TIMEOUT)
                with server_context.wrap_socket(raw, server_side=True) as tls:
                    outcome.identity = client_identity(tls.getpeercert())
                    outcome.version = tls.version()
                    if tls.recv(4) == b"ping":
                        tls.sendall(b"pong")
            except (OSError, ssl.SSLError) as exc:
                outcome.server_error = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
                client_context.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                tls.sendall(b"ping")
                outcome.reply = tls.recv(4)
        except (OSError, ssl.SSLError) as exc:
            outcome.client_error = exc
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the server side of the handshake hung"
    return outcome


# --- server context ----------------------------------------------------------------------------------


def test_handshake_with_the_private_ca_succeeds(pki: Pki) -> None:
    outcome = handshake(pki.server().ssl_context(), pki.client().ssl_context())
    assert outcome.ok, outcome
    assert outcome.version in {"TLSv1.2", "TLSv1.3"}
    assert outcome.identity is None


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_the_certificate_covers_the_names_and_addresses(pki: Pki, hostname: str) -> None:
    assert handshake(pki.server().ssl_context(), pki.client().ssl_context(), server_hostname=hostname).ok


def test_a_wrong_hostname_is_refused(pki: Pki) -> None:
    outcome = handshake(pki.server().ssl_context(), pki.client().ssl_context(), server_hostname="example.com")
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert "mismatch" in str(outcome.client_error) or "match" in str(outcome.client_error)


def test_a_client_trusting_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    outcome = handshake(pki.server().ssl_context(), other.client().ssl_context())
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in str(outcome.client_error)


def test_the_system_roots_do_not_trust_a_private_ca(pki: Pki) -> None:
    outcome = handshake(pki.server().ssl_context(), TlsClientConfig.default().ssl_context())
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)


def test_an_expired_server_certificate_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    expired = make_pki(tmp_path / "expired", days=1, not_before=long_ago)
    with caplog.at_level(logging.WARNING, logger="registry.tls"):
        server = expired.server()
    assert "server.crt expired on" in caplog.text
    outcome = handshake(server.ssl_context(), expired.client().ssl_context())
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert "expired" in str(outcome.client_error)


def test_a_certificate_near_its_end_logs_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    soon = make_pki(tmp_path / "soon", days=10)
    with caplog.at_level(logging.WARNING, logger="registry.tls"):
        server = soon.server()
    assert re.search(r"server\.crt expires on \S+ \(in [89] days\)", caplog.text)
    assert handshake(server.ssl_context(), soon.client().ssl_context()).ok


def test_a_fresh_certificate_logs_nothing(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="registry.tls"):
        pki.server(client_ca=pki.ca_file)
    assert caplog.text == ""


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_a_tls_1_1_client_is_refused(pki: Pki) -> None:
    server_context = pki.server().ssl_context()
    assert server_context.minimum_version == ssl.TLSVersion.TLSv1_2
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(pki.ca_file)
    # Lower the client's own security level so the refusal can only come from the server.
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    outcome = handshake(server_context, old)
    assert isinstance(outcome.client_error, ssl.SSLError)
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert "unsupported protocol" in str(outcome.server_error).lower()
    assert outcome.reply == b""


def test_a_tls_1_2_client_is_accepted(pki: Pki) -> None:
    client = pki.client().ssl_context()
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    outcome = handshake(pki.server().ssl_context(), client)
    assert outcome.ok, outcome
    assert outcome.version == "TLSv1.2"


def test_server_context_settings(pki: Pki) -> None:
    context = pki.server().ssl_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.verify_mode == ssl.CERT_NONE
    mtls = pki.server(client_ca=pki.ca_file).ssl_context()
    assert mtls.verify_mode == ssl.CERT_OPTIONAL
    # The standard library's default list: forward secrecy only, no SHA-1 MACs, no RC4/3DES/NULL.
    names = {cipher["name"] for cipher in context.get_ciphers()}
    assert names
    for name in names:
        assert name.startswith(("TLS_", "ECDHE-", "DHE-")), name
        assert not name.endswith("-SHA") and not any(weak in name for weak in ("RC4", "DES", "NULL", "MD5")), name


def test_server_accepts_trustme_certificates(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key, ca_file = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    server = TlsServerConfig.from_files(str(cert), str(key))
    assert handshake(server.ssl_context(), TlsClientConfig(ca_file=str(ca_file)).ssl_context()).ok


# --- mTLS ----------------------------------------------------------------------------------------------


def client_files(directory: Path, ca: CertificateBundle, name: str) -> tuple[Path, Path]:
    bundle = generate_client_certificate(ca, name)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    bundle.write(cert, key)
    return cert, key


def test_mtls_client_certificate_gives_its_common_name(pki: Pki) -> None:
    cert, key = client_files(pki.directory, pki.ca, "deployer")
    server = pki.server(client_ca=pki.ca_file).ssl_context()
    outcome = handshake(server, pki.client(cert=cert, key=key).ssl_context())
    assert outcome.ok, outcome
    assert outcome.identity == "deployer"


def test_mtls_without_a_client_certificate_is_still_allowed(pki: Pki) -> None:
    outcome = handshake(pki.server(client_ca=pki.ca_file).ssl_context(), pki.client().ssl_context())
    assert outcome.ok, outcome
    assert outcome.identity is None


def test_mtls_client_certificate_from_another_ca_fails(pki: Pki, tmp_path: Path) -> None:
    stranger_ca = generate_ca("stranger CA")
    cert, key = client_files(tmp_path, stranger_ca, "mallory")
    outcome = handshake(pki.server(client_ca=pki.ca_file).ssl_context(), pki.client(cert=cert, key=key).ssl_context())
    assert not outcome.ok
    assert isinstance(outcome.server_error, ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in str(outcome.server_error)
    assert outcome.identity is None


def test_client_certificate_is_ignored_without_a_client_ca(pki: Pki) -> None:
    cert, key = client_files(pki.directory, pki.ca, "deployer")
    outcome = handshake(pki.server().ssl_context(), pki.client(cert=cert, key=key).ssl_context())
    assert outcome.ok
    assert outcome.identity is None


def test_a_server_certificate_cannot_be_used_as_a_client_certificate(pki: Pki) -> None:
    outcome = handshake(
        pki.server(client_ca=pki.ca_file).ssl_context(), pki.client(cert=pki.cert, key=pki.key).ssl_context()
    )
    assert not outcome.ok
    assert isinstance(outcome.server_error, ssl.SSLCertVerificationError)
    assert "unsuitable certificate purpose" in str(outcome.server_error)


def test_client_identity_reads_the_subject_common_name() -> None:
    peercert = {"subject": ((("countryName", "DE"),), (("commonName", "ci-runner"),))}
    assert client_identity(peercert) == "ci-runner"
    assert client_identity({"subject": ((("organizationName", "x"),),)}) is None
    assert client_identity({}) is None
    assert client_identity(None) is None


# --- errors ----------------------------------------------------------------------------------------------


def assert_no_key_material(error: ConfigError, *keys: Path) -> None:
    text = f"{error} {error!r} {error.to_dict()}"
    assert "PRIVATE KEY" not in text
    for key in keys:
        for line in key.read_text().splitlines():
            if line and not line.startswith("-----"):
                assert line not in text


def test_missing_files_are_named(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"certificate .*nowhere\.crt does not exist") as caught:
        TlsServerConfig.from_files(tmp_path / "nowhere.crt", pki.key)
    assert caught.value.field == "tls.cert"
    with pytest.raises(ConfigError, match=r"private key .*nowhere\.key does not exist") as caught:
        TlsServerConfig.from_files(pki.cert, tmp_path / "nowhere.key")
    assert caught.value.field == "tls.key"
    with pytest.raises(ConfigError, match=r"client CA .*ca\.pem does not exist") as caught:
        TlsServerConfig.from_files(pki.cert, pki.key, client_ca=tmp_path / "ca.pem")
    assert caught.value.field == "tls.client_ca"


def test_a_directory_instead_of_a_key_is_named(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"private key .*tmp.* cannot be read: Is a directory") as caught:
        TlsServerConfig.from_files(pki.cert, tmp_path)
    assert caught.value.field == "tls.key"


def test_unreadable_key_is_named(pki: Pki) -> None:
    pki.key.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(ConfigError, match=r"server\.key cannot be read: Permission denied"):
            TlsServerConfig.from_files(pki.cert, pki.key)
        return
    # Root reads every file: check in a child without the capabilities that let it.
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to test permission errors as root"
    script = (
        "import sys\nfrom registry.exceptions import ConfigError\nfrom registry.tls import TlsServerConfig\n"
        "try:\n    TlsServerConfig.from_files(sys.argv[1], sys.argv[2])\n"
        "except ConfigError as exc:\n    print(exc.message)\n"
    )
    child = subprocess.run(
        [
            setpriv,
            "--bounding-set",
            "-dac_override,-dac_read_search",
            sys.executable,
            "-c",
            script,
            str(pki.cert),
            str(pki.key),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert re.search(r"server\.key cannot be read: Permission denied", child.stdout), child.stdout + child.stderr


def test_files_that_are_not_pem(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"certificate .*junk\.pem holds no PEM certificate"):
        TlsServerConfig.from_files(junk, pki.key)
    with pytest.raises(ConfigError, match=r"private key .*junk\.pem is not a PEM private key"):
        TlsServerConfig.from_files(pki.cert, junk)
    with pytest.raises(ConfigError, match=r"private key .*server\.crt is not a PEM private key"):
        TlsServerConfig.from_files(pki.cert, pki.cert)


def test_a_key_that_does_not_match_the_certificate(pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"server\.key does not belong to the certificate") as caught:
        TlsServerConfig.from_files(pki.cert, other.key)
    assert caught.value.field == "tls.key"
    assert_no_key_material(caught.value, other.key, pki.key)


def test_an_encrypted_key_is_refused_by_name(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="is encrypted") as caught:
        TlsServerConfig.from_files(pki.cert, encrypted)
    assert_no_key_material(caught.value, encrypted, pki.key)


def test_a_readable_key_logs_a_warning(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    pki.key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="registry.tls"):
        pki.server()
    assert "server.key is readable by group or others" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_client_config_errors(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"CA file .*missing\.crt does not exist"):
        TlsClientConfig(ca_file=tmp_path / "missing.crt").ssl_context()
    junk = tmp_path / "junk.crt"
    junk.write_text("junk")
    with pytest.raises(ConfigError, match=r"CA file .*junk\.crt cannot be loaded"):
        TlsClientConfig(ca_file=junk).ssl_context()
    other = make_pki(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"cannot load the client certificate .*server\.crt") as caught:
        pki.client(cert=pki.cert, key=other.key).ssl_context()
    assert_no_key_material(caught.value, other.key, pki.key)
    with pytest.raises(ConfigError, match="key was given without a client certificate"):
        TlsClientConfig(key=pki.key)


# --- client context ----------------------------------------------------------------------------------------


def test_client_context_verifies_by_default(pki: Pki) -> None:
    context = pki.client().ssl_context()
    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    default = TlsClientConfig.default().ssl_context()
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname


def test_verify_false_is_explicit_and_warns(pki: Pki, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        TlsClientConfig(None, None, None, False)  # type: ignore[misc]
    with caplog.at_level(logging.WARNING, logger="registry.tls"):
        insecure = TlsClientConfig(verify=False)
    assert "verification is OFF" in caplog.text
    context = insecure.ssl_context()
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
    other = make_pki(tmp_path / "other")
    assert handshake(other.server().ssl_context(), context, server_hostname="anything").ok


def test_the_light_client_does_not_load_cryptography() -> None:
    code = (
        "import sys, registry.tls; registry.tls.TlsClientConfig().ssl_context(); print('cryptography' in sys.modules)"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert child.stdout.strip() == "False"
