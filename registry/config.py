"""The server configuration file (``svcreg.yaml``) and the first-run bootstrap (``svcreg init``).

::

    listen: "127.0.0.1:9443"          # host:port; [::1]:9443 for IPv6
    db: "registry.db"                  # relative paths are relative to this file's directory
    networks: "services.yaml"          # optional
    tls:                               # required: there is no plaintext mode
      cert: "tls/server.crt"
      key: "tls/server.key"
      client_ca: "tls/ca.crt"          # optional: enables client certificates (mTLS)
    tokens:
      - {name: admin, role: admin, hash: "sha256:..."}
    limits: {max_message_size: 1048576, max_connections: 1000, ...}
    event_retention: 10000
    synchronous: FULL

Read with ``yaml.safe_load`` only. Every error is a :class:`ConfigError` naming the file,
the field and the value (never a token).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from .auth import Role, TokenEntry, TokenRegistry, generate_token, hash_token
from .exceptions import ConfigError
from .tls import (
    generate_ca,
    generate_server_certificate,
    write_file_atomically,
)

__all__ = [
    "CONFIG_FILE_NAME",
    "SYNCHRONOUS_LEVELS",
    "InitResult",
    "Limits",
    "ServerConfig",
    "TlsFiles",
    "add_token",
    "default_config_dir",
    "init_directory",
]

CONFIG_FILE_NAME: Final = "svcreg.yaml"
SYNCHRONOUS_LEVELS: Final = ("OFF", "NORMAL", "FULL", "EXTRA")
DEFAULT_LISTEN: Final = "127.0.0.1:9443"

_TOP_LEVEL_KEYS: Final = (
    "listen",
    "db",
    "networks",
    "tls",
    "tokens",
    "limits",
    "event_retention",
    "synchronous",
    "deploy",
)
_DEPLOY_KEYS: Final = (
    "packages_dir",
    "work_dir",
    "known_hosts",
    "host_key_checking",
    "ssh_user",
    "ssh_key",
    "install_base",
    "max_jobs",
    "timeout",
    "keep_artifacts",
    "max_package_size",
)
_TLS_KEYS: Final = ("cert", "key", "client_ca")
_HOSTNAME: Final = re.compile(
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*"
)

_HEADER: Final = """\
# svcreg server configuration (docs/security.md). Relative paths are relative to this file.
# Tokens are stored as hashes only; `svcreg token create` appends one and rewrites this file.
"""


# --- small validators -------------------------------------------------------------------------------


def _unknown_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(str(key) for key in data if key not in allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown keys {', '.join(unknown)} (allowed: {', '.join(allowed)})",
            field=f"{where}.{unknown[0]}" if where != "config" else unknown[0],
        )


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, not {type(value).__name__}", field=where)
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} {value!r} must be a non-empty string", field=where)
    return value


def _path(value: Any, where: str, base_dir: Path) -> Path:
    path = Path(_string(value, where)).expanduser()
    return path if path.is_absolute() else base_dir / path


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where} {value!r} must be a positive integer", field=where)
    return value


def _positive_seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{where} {value!r} must be a positive number of seconds", field=where)
    return value


def _check_listen(value: Any) -> str:
    """``host:port``; an IPv6 host goes in brackets: ``[::1]:9443``."""
    text = _string(value, "listen")
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit():
        raise ConfigError(f"listen {text!r} is not host:port (use [::1]:9443 for IPv6)", field="listen")
    if not 1 <= int(port) <= 65535:
        raise ConfigError(f"listen {text!r}: port {port} is not in 1-65535", field="listen")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ConfigError(f"listen {text!r}: {host} is not an IPv6 address", field="listen") from None
    elif ":" in host:
        raise ConfigError(f"listen {text!r}: put an IPv6 address in brackets, e.g. [::1]:{port}", field="listen")
    elif not _HOSTNAME.fullmatch(host):
        raise ConfigError(f"listen {text!r}: {host!r} is not a hostname or IP address", field="listen")
    return text


# --- the configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-server limits (docs/protocol.md#limits); every value must be positive."""

    max_message_size: int = 1_048_576
    max_connections: int = 1000
    max_subscriptions_per_connection: int = 16
    send_queue: int = 1000
    handshake_timeout: float = 10
    ping_interval: float = 20
    ping_timeout: float = 20

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.type == "int":
                _positive_int(value, f"limits.{item.name}")
            else:
                _positive_seconds(value, f"limits.{item.name}")

    def to_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        """Raises ConfigError: unknown keys or a value that is not positive."""
        data = _mapping(data, "limits")
        _unknown_keys(data, tuple(item.name for item in dataclasses.fields(cls)), "limits")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class DeployConfig:
    """The ``deploy:`` section: where packages come from and how the registry reaches hosts over SSH.

    ``deploy_package`` requests name a file in ``packages_dir`` (nothing outside it can be
    deployed). Host keys are checked against ``known_hosts`` (default ``<config dir>/known_hosts``;
    fill it with ``ssh-keyscan`` after checking the fingerprints). Node variables in the networks
    file (``ssh_user``, ``ssh_key``, ``ssh_port``, ``install_base``) override the defaults here.
    """

    packages_dir: Path
    work_dir: Path
    known_hosts: Path
    host_key_checking: bool = True
    ssh_user: str = "root"
    ssh_key: Path | None = None
    install_base: str = "/opt"
    max_jobs: int = 4
    timeout: int = 3600
    keep_artifacts: bool = False
    max_package_size: int = 256 * 1024 * 1024

    @classmethod
    def default(cls, base_dir: Path) -> DeployConfig:
        return cls(
            packages_dir=base_dir / "packages", work_dir=base_dir / "deploys", known_hosts=base_dir / "known_hosts"
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: Path) -> DeployConfig:
        data = _mapping(data, "deploy")
        _unknown_keys(data, _DEPLOY_KEYS, "deploy")
        default = cls.default(base_dir)
        host_key_checking = data.get("host_key_checking", True)
        keep_artifacts = data.get("keep_artifacts", False)
        for name, value in (("host_key_checking", host_key_checking), ("keep_artifacts", keep_artifacts)):
            if not isinstance(value, bool):
                raise ConfigError(f"deploy.{name} {value!r} must be true or false", field=f"deploy.{name}")
        install_base = _string(data.get("install_base", default.install_base), "deploy.install_base")
        if not install_base.startswith("/"):
            raise ConfigError(
                f"deploy.install_base {install_base!r} must be an absolute path", field="deploy.install_base"
            )
        return cls(
            packages_dir=_path(data.get("packages_dir", "packages"), "deploy.packages_dir", base_dir),
            work_dir=_path(data.get("work_dir", "deploys"), "deploy.work_dir", base_dir),
            known_hosts=_path(data.get("known_hosts", "known_hosts"), "deploy.known_hosts", base_dir),
            host_key_checking=host_key_checking,
            ssh_user=_string(data.get("ssh_user", default.ssh_user), "deploy.ssh_user"),
            ssh_key=_path(data["ssh_key"], "deploy.ssh_key", base_dir) if data.get("ssh_key") is not None else None,
            install_base=install_base,
            max_jobs=_positive_int(data.get("max_jobs", default.max_jobs), "deploy.max_jobs"),
            timeout=_positive_int(data.get("timeout", default.timeout), "deploy.timeout"),
            keep_artifacts=keep_artifacts,
            max_package_size=_positive_int(
                data.get("max_package_size", default.max_package_size), "deploy.max_package_size"
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "packages_dir": str(self.packages_dir),
            "work_dir": str(self.work_dir),
            "known_hosts": str(self.known_hosts),
            "host_key_checking": self.host_key_checking,
            "ssh_user": self.ssh_user,
            "install_base": self.install_base,
            "max_jobs": self.max_jobs,
            "timeout": self.timeout,
            "keep_artifacts": self.keep_artifacts,
            "max_package_size": self.max_package_size,
        }
        if self.ssh_key is not None:
            data["ssh_key"] = str(self.ssh_key)
        return data


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the server's TLS files are (absolute); :class:`registry.tls.TlsServerConfig` loads them."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def to_dict(self) -> dict[str, str]:
        paths = {"cert": str(self.cert), "key": str(self.key)}
        if self.client_ca is not None:
            paths["client_ca"] = str(self.client_ca)
        return paths


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """A validated ``svcreg.yaml``; every path is absolute. Build with :meth:`from_file` or :meth:`from_dict`."""

    tls: TlsFiles
    db: Path
    listen: str = DEFAULT_LISTEN
    networks: Path | None = None
    token_entries: tuple[TokenEntry, ...] = ()
    limits: Limits = field(default_factory=Limits)
    event_retention: int = 10_000
    synchronous: str = "FULL"
    deploy: DeployConfig | None = None  # None: DeployConfig.default(the config file's folder)

    @property
    def tokens(self) -> TokenRegistry:
        """A new :class:`TokenRegistry` over the configured tokens."""
        return TokenRegistry(self.token_entries)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ServerConfig:
        """Read and validate a config file; relative paths in it are relative to its directory.

        Raises:
            ConfigError: the file is missing, unreadable, not YAML, or invalid (the message names the file).
        """
        path = Path(path).absolute()
        data = _read_yaml(path)
        try:
            return cls.from_dict(data, base_dir=path.parent)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc.message}", field=exc.field) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str | os.PathLike[str]) -> ServerConfig:
        """Validate the parsed file; ``base_dir`` anchors relative paths.

        Raises:
            ConfigError: unknown keys, a bad listen address, no ``tls`` section, a limit that is
                not positive, a bad token entry or a duplicate token name, a bad ``synchronous``.
        """
        base = Path(base_dir).absolute()
        data = _mapping(data, "config")
        _unknown_keys(data, _TOP_LEVEL_KEYS, "config")
        if data.get("tls") is None:
            raise ConfigError(
                "tls is missing: TLS is required (there is no plaintext mode); give tls.cert and tls.key, "
                "or run `svcreg init` to create them",
                field="tls",
            )
        tls = _mapping(data["tls"], "tls")
        _unknown_keys(tls, _TLS_KEYS, "tls")
        for required in ("cert", "key"):
            if required not in tls:
                raise ConfigError(f"tls.{required} is missing", field=f"tls.{required}")
        tls_files = TlsFiles(
            cert=_path(tls["cert"], "tls.cert", base),
            key=_path(tls["key"], "tls.key", base),
            client_ca=_path(tls["client_ca"], "tls.client_ca", base) if tls.get("client_ca") is not None else None,
        )
        tokens = data.get("tokens")
        tokens = [] if tokens is None else tokens
        if not isinstance(tokens, list):
            raise ConfigError(f"tokens must be a list, not {type(tokens).__name__}", field="tokens")
        entries = tuple(TokenEntry.from_dict(item, where=f"tokens[{index}]") for index, item in enumerate(tokens))
        TokenRegistry(entries)  # refuses duplicate names
        synchronous = data.get("synchronous", "FULL")
        if not isinstance(synchronous, str) or synchronous.upper() not in SYNCHRONOUS_LEVELS:
            raise ConfigError(
                f"synchronous {synchronous!r} is not one of {', '.join(SYNCHRONOUS_LEVELS)}", field="synchronous"
            )
        return cls(
            tls=tls_files,
            db=_path(data.get("db", "registry.db"), "db", base),
            listen=_check_listen(data.get("listen", DEFAULT_LISTEN)),
            networks=_path(data["networks"], "networks", base) if data.get("networks") is not None else None,
            token_entries=entries,
            limits=Limits.from_dict(data.get("limits") or {}),
            event_retention=_positive_int(data.get("event_retention", 10_000), "event_retention"),
            synchronous=synchronous.upper(),
            deploy=DeployConfig.from_dict(data.get("deploy") or {}, base),
        )

    def to_dict(self) -> dict[str, Any]:
        """The file's form (with absolute paths): ``from_dict(config.to_dict(), base_dir=...) == config``."""
        data: dict[str, Any] = {"listen": self.listen, "db": str(self.db)}
        if self.networks is not None:
            data["networks"] = str(self.networks)
        data["tls"] = self.tls.to_dict()
        data["tokens"] = [entry.to_dict() for entry in self.token_entries]
        data["limits"] = self.limits.to_dict()
        data["event_retention"] = self.event_retention
        data["synchronous"] = self.synchronous
        if self.deploy is not None:
            data["deploy"] = self.deploy.to_dict()
        return data


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist (create one with `svcreg init`)", field="config"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}", field="config") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}", field="config") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}", field="config")
    return data


def _dump_config(data: Mapping[str, Any]) -> bytes:
    return (_HEADER + yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False)).encode("utf-8")


def default_config_dir() -> Path:
    """Where ``svcreg`` looks for ``svcreg.yaml`` and ``client.env``: ``$SVCREG_HOME``, else ``./var/svcreg``.

    The fallback is relative to the current directory (so a checkout is self-contained); the
    result is always absolute.
    """
    home = os.environ.get("SVCREG_HOME")
    if home:
        return Path(home).expanduser().absolute()
    return Path.cwd() / "var" / "svcreg"


def add_token(config_path: str | os.PathLike[str], name: str, role: Role | str) -> str:
    """Append a new token for ``name`` to the config file and return the plain token (show it once).

    The file is validated first, then rewritten atomically with mode 0600 (comments are not
    kept). A running server picks the token up when it restarts.

    Raises:
        ConfigError: the file is invalid, or the name is taken.
        ValidationError: a bad role.
    """
    path = Path(config_path).absolute()
    raw = dict(_read_yaml(path))
    config = ServerConfig.from_file(path)
    tokens = config.tokens
    try:
        entry, token = tokens.add(name, role if isinstance(role, Role) else Role.parse(role))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", field=exc.field) from None
    raw["tokens"] = [*(raw.get("tokens") or []), entry.to_dict()]
    write_file_atomically(path, _dump_config(raw), mode=0o600)
    return token


# --- svcreg init ----------------------------------------------------------------------------------------

_SAMPLE_NETWORKS: Final = """\
# The networks svcreg knows about (docs/networks.md describes every key).
# Services only see the instances in their own network segment.
networks:
  local:
    type: local
    subnet: "127.0.0.0/8"

  # A LAN segment, with the hosts Ansible may deploy to:
  # production:
  #   type: lan
  #   subnet: "192.168.1.0/24"
  #   nodes:
  #     - host: "192.168.1.100"
  #       name: "prod-api"
  #       ssh_user: "deploy"

  # A WireGuard overlay:
  # monitoring:
  #   type: wireguard
  #   subnet: "10.0.0.0/24"
  #   config_path: "/etc/wireguard/wg0.conf"
"""


@dataclass(frozen=True, slots=True)
class InitResult:
    """What :func:`init_directory` wrote; ``admin_token`` is the plain token, to print once."""

    directory: Path
    config_path: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    networks_path: Path
    token_path: Path
    client_env: Path
    admin_token: str = field(repr=False)


def _server_names(hostnames: list[str] | None) -> tuple[list[str], list[str]]:
    """The server certificate's DNS names and IPs: loopback, this host's name, and ``hostnames``."""
    names, ips = ["localhost"], ["127.0.0.1", "::1"]
    this_host = socket.gethostname()
    # An odd local hostname is skipped rather than failing init; a bad explicit one is an error (registry.tls).
    candidates = [this_host] if _HOSTNAME.fullmatch(this_host) else []
    for name in [*candidates, *(hostnames or [])]:
        try:
            ip = str(ipaddress.ip_address(name))
        except ValueError:
            if name not in names:
                names.append(name)
        else:
            if ip not in ips:
                ips.append(ip)
    return names, ips


def init_directory(
    directory: str | os.PathLike[str], *, hostnames: list[str] | None = None, force: bool = False
) -> InitResult:
    """Create everything a first ``svcreg serve`` needs in ``directory``.

    Writes (directories 0700, secrets 0600): ``tls/ca.crt``, ``tls/ca.key``,
    ``tls/server.crt``, ``tls/server.key`` (for localhost, 127.0.0.1, ::1, this host's name
    and ``hostnames``), ``svcreg.yaml`` (with the admin token's hash), ``admin.token``,
    ``client.env`` (SVCREG_URL, SVCREG_CA, SVCREG_TOKEN) and, unless one exists, a sample
    ``services.yaml``. ``svcreg.yaml`` is written last, so an interrupted init can be re-run.
    An existing ``registry.db`` or ``services.yaml`` is never touched.

    Raises:
        ConfigError: the directory is already initialised (``svcreg.yaml`` exists) and not ``force``.
        ValidationError: a bad extra hostname.
    """
    root = Path(directory).expanduser().absolute()
    config_path = root / CONFIG_FILE_NAME
    if config_path.exists() and not force:
        raise ConfigError(
            f"{root} is already initialised: {config_path} exists; use --force to replace its CA, "
            "certificates, admin token and config (registry.db and services.yaml are kept)",
            field="directory",
        )
    tls_dir = root / "tls"
    for path in (root, tls_dir):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)

    names, ips = _server_names(hostnames)
    ca = generate_ca(f"svcreg CA {socket.gethostname()}"[:64].strip())
    server = generate_server_certificate(ca, hostnames=names, ips=ips)
    ca_cert, ca_key = tls_dir / "ca.crt", tls_dir / "ca.key"
    server_cert, server_key = tls_dir / "server.crt", tls_dir / "server.key"
    ca.write(ca_cert, ca_key)
    server.write(server_cert, server_key)

    networks_path = root / "services.yaml"
    if not networks_path.exists():
        write_file_atomically(networks_path, _SAMPLE_NETWORKS.encode("utf-8"), mode=0o644)

    token = generate_token()
    token_path = root / "admin.token"
    write_file_atomically(token_path, f"{token}\n".encode(), mode=0o600)
    client_env = root / "client.env"
    client_lines = [
        "# svcreg client settings: `set -a; . ./client.env; set +a`, or svcreg reads this file by itself.",
        f"SVCREG_URL=wss://{DEFAULT_LISTEN}",
        f"SVCREG_CA={ca_cert}",
        f"SVCREG_TOKEN={token}",
    ]
    write_file_atomically(client_env, ("\n".join(client_lines) + "\n").encode(), mode=0o600)

    config = {
        "listen": DEFAULT_LISTEN,
        "db": "registry.db",
        "networks": "services.yaml",
        "tls": {"cert": "tls/server.crt", "key": "tls/server.key", "client_ca": "tls/ca.crt"},
        "tokens": [TokenEntry("admin", Role.ADMIN, hash_token(token)).to_dict()],
        "limits": Limits().to_dict(),
        "event_retention": 10_000,
        "synchronous": "FULL",
    }
    write_file_atomically(config_path, _dump_config(config), mode=0o600)
    return InitResult(
        directory=root,
        config_path=config_path,
        ca_cert=ca_cert,
        ca_key=ca_key,
        server_cert=server_cert,
        server_key=server_key,
        networks_path=networks_path,
        token_path=token_path,
        client_env=client_env,
        admin_token=token,
    )
