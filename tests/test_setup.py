"""`svcreg init` and `svcreg token create` (registry.setup), on real files in tmp_path."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from registry.auth import Role, hash_token
from registry.config import ServerConfig
from registry.exceptions import ConfigError, Unauthorized, ValidationError
from registry.setup import add_token, init_directory
from registry.tls import TlsClientConfig, TlsServerConfig, client_identity

from .test_config import mode, without

# --- svcreg init --------------------------------------------------------------------------------------


def test_init_creates_every_file_with_the_right_mode(tmp_path: Path) -> None:
    root = tmp_path / "svcreg"
    result = init_directory(root, hostnames=["registry.example.com", "192.168.1.10"])
    assert result.directory == root
    assert mode(root) == 0o700
    assert mode(root / "tls") == 0o700
    expected = {
        result.config_path: (root / "svcreg.yaml", 0o600),
        result.ca_cert: (root / "tls" / "ca.crt", None),
        result.ca_key: (root / "tls" / "ca.key", 0o600),
        result.server_cert: (root / "tls" / "server.crt", None),
        result.server_key: (root / "tls" / "server.key", 0o600),
        result.token_path: (root / "admin.token", 0o600),
        result.client_env: (root / "client.env", 0o600),
        result.networks_path: (root / "services.yaml", None),
    }
    for path, (where, wanted) in expected.items():
        assert path == where
        assert path.is_file()
        if wanted is not None:
            assert mode(path) == wanted, path
        else:
            assert mode(path) & 0o022 == 0, path  # never writable by others
    assert sorted(path.name for path in root.iterdir()) == [
        "admin.token",
        "client.env",
        "services.yaml",
        "svcreg.yaml",
        "tls",
    ]

    token = result.admin_token
    assert token.startswith("svcreg_")
    assert result.token_path.read_text() == token + "\n"
    assert token not in result.config_path.read_text()
    assert token not in repr(result)
    env = dict(line.split("=", 1) for line in result.client_env.read_text().splitlines() if not line.startswith("#"))
    assert env == {"SVCREG_URL": "wss://127.0.0.1:9443", "SVCREG_CA": str(result.ca_cert), "SVCREG_TOKEN": token}

    raw = yaml.safe_load(result.config_path.read_text())
    assert raw["listen"] == "127.0.0.1:9443"
    assert (raw["db"], raw["networks"]) == ("registry.db", "services.yaml")
    assert raw["tls"] == {"cert": "tls/server.crt", "key": "tls/server.key", "client_ca": "tls/ca.crt"}
    assert raw["tokens"] == [{"name": "admin", "role": "admin", "hash": hash_token(token)}]

    networks = yaml.safe_load(result.networks_path.read_text())
    assert networks == {"networks": {"local": {"type": "local", "subnet": "127.0.0.0/8"}}}
    assert "type: lan" in result.networks_path.read_text()
    assert "type: wireguard" in result.networks_path.read_text()

    server = x509.load_pem_x509_certificate(result.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert dns[0] == "localhost" and "registry.example.com" in dns
    assert socket.gethostname() in dns
    assert ips == ["127.0.0.1", "::1", "192.168.1.10"]


def test_init_then_load_then_a_real_handshake(tmp_path: Path) -> None:
    result = init_directory(tmp_path / "svcreg")
    config = ServerConfig.from_file(result.config_path)
    assert config.tokens.authenticate(result.admin_token).role is Role.ADMIN
    assert config.db == result.directory / "registry.db"
    assert config.tls.client_ca == result.ca_cert
    tls = TlsServerConfig.from_files(config.tls.cert, config.tls.key, client_ca=config.tls.client_ca)
    ca_file = dict(line.split("=", 1) for line in result.client_env.read_text().splitlines()[1:])["SVCREG_CA"]
    client = TlsClientConfig(ca_file=ca_file)

    seen: dict[str, Any] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            raw, _ = listener.accept()
            with tls.ssl_context().wrap_socket(raw, server_side=True) as server_side:
                seen["identity"] = client_identity(server_side.getpeercert())
                server_side.sendall(server_side.recv(5))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(listener.getsockname(), timeout=10) as raw,
            client.ssl_context().wrap_socket(raw, server_hostname="localhost") as client_side,
        ):
            client_side.sendall(b"hello")
            assert client_side.recv(5) == b"hello"
        thread.join(10)
    assert seen == {"identity": None}


def test_init_refuses_a_second_time_and_force_replaces(tmp_path: Path) -> None:
    root = tmp_path / "svcreg"
    first = init_directory(root)
    first_ca = first.ca_cert.read_bytes()
    (root / "registry.db").write_bytes(b"precious")
    (root / "services.yaml").write_text("networks: {}\n")
    with pytest.raises(ConfigError, match=r"is already initialised: .*svcreg\.yaml exists; use --force") as caught:
        init_directory(root)
    assert first.admin_token not in str(caught.value)
    assert first.token_path.read_text() == first.admin_token + "\n"

    second = init_directory(root, force=True)
    assert second.admin_token != first.admin_token
    assert second.ca_cert.read_bytes() != first_ca
    config = ServerConfig.from_file(second.config_path)
    assert config.tokens.authenticate(second.admin_token).name == "admin"
    with pytest.raises(Unauthorized):
        config.tokens.authenticate(first.admin_token)
    assert (root / "registry.db").read_bytes() == b"precious"
    assert (root / "services.yaml").read_text() == "networks: {}\n"
    assert mode(second.ca_key) == mode(second.token_path) == mode(second.config_path) == 0o600


def test_init_into_an_existing_empty_directory(tmp_path: Path) -> None:
    result = init_directory(tmp_path)
    assert result.config_path == tmp_path / "svcreg.yaml"


def test_init_refuses_a_bad_extra_hostname(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="'not a host' is not an ASCII DNS name"):
        init_directory(tmp_path / "svcreg", hostnames=["not a host"])
    assert not (tmp_path / "svcreg" / "svcreg.yaml").exists()


# --- tokens ---------------------------------------------------------------------------------------------


def test_add_token_appends_and_the_new_token_authenticates(tmp_path: Path) -> None:
    result = init_directory(tmp_path / "svcreg")
    before = ServerConfig.from_file(result.config_path)
    token = add_token(result.config_path, "ci", Role.WRITE)
    reader = add_token(result.config_path, "dashboard", "read")
    after = ServerConfig.from_file(result.config_path)
    assert [entry.name for entry in after.token_entries] == ["admin", "ci", "dashboard"]
    assert after.tokens.authenticate(token).role is Role.WRITE
    assert after.tokens.authenticate(reader).role is Role.READ
    assert after.tokens.authenticate(result.admin_token).role is Role.ADMIN
    assert mode(result.config_path) == 0o600
    text = result.config_path.read_text()
    assert token not in text and reader not in text
    assert text.startswith("# svcreg server configuration")
    # Everything else is unchanged, relative paths included.
    assert ServerConfig.from_dict({**after.to_dict(), "tokens": before.to_dict()["tokens"]}, base_dir="/") == before
    assert yaml.safe_load(text)["tls"]["cert"] == "tls/server.crt"
    assert [path.name for path in result.directory.iterdir() if path.name.startswith(".")] == []


def test_add_token_refuses_duplicates_bad_roles_and_bad_files(tmp_path: Path) -> None:
    result = init_directory(tmp_path / "svcreg")
    before = result.config_path.read_bytes()
    with pytest.raises(ConfigError, match=r"svcreg\.yaml: token name 'admin' is used twice"):
        add_token(result.config_path, "admin", Role.READ)
    with pytest.raises(ValidationError, match="role 'root' is not one of"):
        add_token(result.config_path, "x", "root")
    with pytest.raises(ConfigError, match=r"token\.name 'two words'"):
        add_token(result.config_path, "two words", Role.READ)
    assert result.config_path.read_bytes() == before
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(without("tls")))
    with pytest.raises(ConfigError, match="TLS is required"):
        add_token(broken, "x", Role.READ)
    assert "tokens" in yaml.safe_load(broken.read_text())
    assert len(yaml.safe_load(broken.read_text())["tokens"]) == 2


def test_secrets_do_not_reach_the_server_context_errors(tmp_path: Path) -> None:
    result = init_directory(tmp_path / "svcreg")
    other = init_directory(tmp_path / "other")
    with pytest.raises(ConfigError) as caught:
        TlsServerConfig.from_files(result.server_cert, other.server_key)
    key_body = "".join(other.server_key.read_text().splitlines()[1:-1])
    assert key_body[:20] not in str(caught.value)
