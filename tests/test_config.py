"""svcreg.yaml (registry.config): parsing, validation and the error paths, on real files in tmp_path."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from registry.auth import Role, hash_token
from registry.config import Limits, ServerConfig, default_config_dir
from registry.exceptions import ConfigError

VALID: dict[str, Any] = {
    "listen": "127.0.0.1:9443",
    "db": "registry.db",
    "networks": "services.yaml",
    "tls": {"cert": "tls/server.crt", "key": "tls/server.key", "client_ca": "tls/ca.crt"},
    "tokens": [
        {"name": "admin", "role": "admin", "hash": hash_token("svcreg_admin")},
        {"name": "ci", "role": "write", "hash": hash_token("svcreg_ci")},
    ],
    "limits": {
        "max_message_size": 1048576,
        "max_connections": 1000,
        "max_subscriptions_per_connection": 16,
        "send_queue": 1000,
        "handshake_timeout": 10,
        "ping_interval": 20,
        "ping_timeout": 20,
    },
    "event_retention": 10000,
    "synchronous": "FULL",
}


def valid(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    data.update(changes)
    return data


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- reading ---------------------------------------------------------------------------------------


def test_valid_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "svcreg.yaml"
    path.write_text(yaml.safe_dump(VALID))
    config = ServerConfig.from_file(path)
    assert config.listen == "127.0.0.1:9443"
    assert (config.host, config.port) == ("127.0.0.1", 9443)
    assert config.db == tmp_path / "registry.db"
    assert config.networks == tmp_path / "services.yaml"
    assert config.tls.cert == tmp_path / "tls" / "server.crt"
    assert config.tls.client_ca == tmp_path / "tls" / "ca.crt"
    assert config.limits == Limits()
    assert config.synchronous == "FULL"
    assert config.tokens.authenticate("svcreg_ci").role is Role.WRITE
    again = ServerConfig.from_dict(config.to_dict(), base_dir="/somewhere/else")
    assert again == config
    assert config.allowed_origins == ()
    with_ui = ServerConfig.from_dict(valid(ui={"allowed_origins": ["https://ops.example:8443"]}), base_dir=tmp_path)
    assert with_ui.allowed_origins == ("https://ops.example:8443",)
    assert ServerConfig.from_dict(with_ui.to_dict(), base_dir=tmp_path) == with_ui
    assert yaml.safe_load(yaml.safe_dump(config.to_dict())) == config.to_dict()


def test_minimal_file_gets_the_defaults(tmp_path: Path) -> None:
    config = ServerConfig.from_dict({"tls": {"cert": "/etc/svcreg/c.pem", "key": "k.pem"}}, base_dir=tmp_path)
    assert config.listen == "127.0.0.1:9443"
    assert config.db == tmp_path / "registry.db"
    assert config.networks is None
    assert config.tls.cert == Path("/etc/svcreg/c.pem")
    assert config.tls.client_ca is None
    assert config.token_entries == ()
    assert config.limits == Limits(max_message_size=1048576, send_queue=1000, ping_timeout=20)
    assert (config.event_retention, config.synchronous) == (10000, "FULL")


def test_ipv6_listen_and_case_insensitive_synchronous(tmp_path: Path) -> None:
    config = ServerConfig.from_dict(valid(listen="[::1]:9443", synchronous="normal"), base_dir=tmp_path)
    assert (config.host, config.port, config.synchronous) == ("::1", 9443, "NORMAL")


def test_relative_paths_follow_the_file_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "svcreg.yaml").write_text(yaml.safe_dump(VALID))
    monkeypatch.chdir(tmp_path)
    config = ServerConfig.from_file("etc/svcreg.yaml")
    assert config.db == tmp_path / "etc" / "registry.db"


def error_for(data: Any, tmp_path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        ServerConfig.from_dict(data, base_dir=tmp_path)
    return caught.value


def without(key: str) -> dict[str, Any]:
    data = valid()
    del data[key]
    return data


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        (valid(listne="x"), "listne", "listne: unknown field (expected some of: "),
        (valid(tls={**VALID["tls"], "ca": "x"}), "tls.ca", "tls.ca: unknown field"),
        (valid(limits={"max_conections": 5}), "limits.max_conections", "limits.max_conections: unknown field"),
        (valid(listen="9443"), "listen", "'9443' is not host:port"),
        (valid(listen="localhost:"), "listen", "'localhost:' is not host:port"),
        (valid(listen=":9443"), "listen", "':9443' is not host:port"),
        (valid(listen="localhost:https"), "listen", "is not host:port"),
        (valid(listen="127.0.0.1:0"), "listen", "port 0 is not in 1-65535"),
        (valid(listen="127.0.0.1:70000"), "listen", "port 70000 is not in 1-65535"),
        (valid(listen="::1:9443"), "listen", "put an IPv6 address in brackets"),
        (valid(listen="[nope]:9443"), "listen", "[nope] is not an IPv6 address"),
        (valid(listen="bad host:9443"), "listen", "'bad host' is not a hostname"),
        (valid(listen=9443), "listen", "listen: must be a string, got 9443"),
        (without("tls"), "tls", "TLS is required"),
        (valid(tls=None), "tls", "TLS is required"),
        (valid(tls="tls/"), "tls", "tls: must be an object or null, got 'tls/'"),
        (valid(tls={"cert": "c.pem"}), "tls.key", "tls.key: is required"),
        (valid(tls={"cert": "", "key": "k"}), "tls.cert", "tls.cert: must be a string in the allowed format, got ''"),
        (
            valid(limits={"max_connections": 0}),
            "limits.max_connections",
            "limits.max_connections: must be an integer >= 1, got 0",
        ),
        (valid(limits={"send_queue": -5}), "limits.send_queue", "limits.send_queue: must be an integer >= 1, got -5"),
        (valid(limits={"send_queue": 1.5}), "limits.send_queue", "must be an integer, got 1.5"),
        (valid(limits={"max_message_size": True}), "limits.max_message_size", "must be an integer, got True"),
        (valid(limits={"ping_timeout": 0}), "limits.ping_timeout", "limits.ping_timeout: must be a number > 0"),
        (
            valid(limits={"ping_interval": float("inf")}),
            "limits.ping_interval",
            "must be a number <= 31536000.0, got inf",
        ),
        (valid(limits={"handshake_timeout": "10"}), "limits.handshake_timeout", "must be a number, got '10'"),
        (valid(event_retention=0), "event_retention", "event_retention: must be an integer >= 1, got 0"),
        (valid(synchronous="FAST"), "synchronous", "'FAST' is not one of OFF, NORMAL, FULL, EXTRA"),
        (valid(synchronous=2), "synchronous", "synchronous: must be a string, got 2"),
        (valid(tokens={"admin": "x"}), "tokens", "tokens: must be an array or null, got"),
        (
            valid(tokens=[{"name": "a", "role": "superuser", "hash": hash_token("t")}]),
            "tokens[0].role",
            "'superuser' is not one of read, write, admin",
        ),
        (
            valid(tokens=[VALID["tokens"][0], {"name": "b", "role": "read", "hash": "sha1:abc"}]),
            "tokens[1].hash",
            "tokens[1].hash of token 'b' is not 'sha256:'",
        ),
        (
            valid(tokens=[VALID["tokens"][0], {**VALID["tokens"][1], "name": "admin"}]),
            "tokens",
            "token name 'admin' is used twice",
        ),
        (["listen"], None, "input: must be an object, got ['listen']"),
        (valid(ui={"allowed_origin": []}), "ui.allowed_origin", "ui.allowed_origin: unknown field"),
        (valid(ui={"allowed_origins": "https://a"}), "ui.allowed_origins", "must be an array, got 'https://a'"),
        (
            valid(ui={"allowed_origins": ["https://ops.example", "https://ops.example/ui"]}),
            "ui.allowed_origins[1]",
            "allowed origin 'https://ops.example/ui' must look like https://host[:port] (no path)",
        ),
    ],
)
def test_validation_errors_name_the_field(data: Any, field: str | None, message: str, tmp_path: Path) -> None:
    error = error_for(data, tmp_path)
    assert message in error.message
    assert error.field == field


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "svcreg.yaml"
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(path))} does not exist .*svcreg init"):
        ServerConfig.from_file(path)
    path.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line 2, column 1"):
        ServerConfig.from_file(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping, not list"):
        ServerConfig.from_file(path)
    path.write_text(yaml.safe_dump(valid(synchronous="FAST")))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: synchronous: 'FAST'") as caught:
        ServerConfig.from_file(path)
    assert caught.value.field == "synchronous"


def test_yaml_tags_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "svcreg.yaml"
    path.write_text("listen: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ServerConfig.from_file(path)


def test_limits_validate_when_built_in_code() -> None:
    assert Limits(handshake_timeout=0.3).handshake_timeout == 0.3
    with pytest.raises(ConfigError, match=r"limits\.max_connections: must be an integer >= 1, got -1"):
        Limits(max_connections=-1)


def test_default_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVCREG_HOME", str(tmp_path / "home"))
    assert default_config_dir() == tmp_path / "home"
    monkeypatch.delenv("SVCREG_HOME")
    monkeypatch.chdir(tmp_path)
    assert default_config_dir() == tmp_path / "var" / "svcreg"


def test_the_deploy_section_resolves_its_paths_and_keeps_its_defaults(tmp_path: Path) -> None:
    deploy = {"packages_dir": "/srv/packages", "ssh_key": "keys/deploy", "max_jobs": 2, "host_key_checking": False}
    config = ServerConfig.from_dict(valid(deploy=deploy), base_dir=tmp_path)
    assert config.deploy is not None
    assert config.deploy.packages_dir == Path("/srv/packages")
    assert config.deploy.ssh_key == tmp_path / "keys" / "deploy"
    assert config.deploy.work_dir == tmp_path / "deploys"
    assert (config.deploy.max_jobs, config.deploy.host_key_checking, config.deploy.install_base) == (2, False, "/opt")
    assert ServerConfig.from_dict(config.to_dict(), base_dir="/elsewhere") == config


@pytest.mark.parametrize(
    ("deploy", "field", "message"),
    [
        ({"install_base": "opt"}, "deploy.install_base", "deploy.install_base: 'opt' must be an absolute path"),
        ({"max_jobs": 0}, "deploy.max_jobs", "deploy.max_jobs: must be an integer >= 1, got 0"),
        ({"keep_artifacts": "yes"}, "deploy.keep_artifacts", "must be true or false, got 'yes'"),
        ({"ssh_user": " "}, "deploy.ssh_user", "deploy.ssh_user: must be a string"),
        ({"work_dirs": "x"}, "deploy.work_dirs", "deploy.work_dirs: unknown field"),
    ],
)
def test_deploy_errors_name_the_field(deploy: dict[str, Any], field: str, message: str, tmp_path: Path) -> None:
    error = error_for(valid(deploy=deploy), tmp_path)
    assert message in error.message
    assert error.field == field


def test_null_sections_mean_the_defaults(tmp_path: Path) -> None:
    config = ServerConfig.from_dict(valid(limits=None, tokens=None, deploy=None, networks=None), base_dir=tmp_path)
    assert (config.limits, config.token_entries, config.networks) == (Limits(), (), None)
    assert config.deploy is not None and config.deploy.packages_dir == tmp_path / "packages"


def test_a_token_hash_is_never_quoted(tmp_path: Path) -> None:
    secret = "svcreg_pasted_by_mistake"
    error = error_for(valid(tokens=[{"name": "a", "role": "read", "hash": [secret]}]), tmp_path)
    assert error.field == "tokens[0].hash"
    assert secret not in error.message
