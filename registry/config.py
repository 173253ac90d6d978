"""The server configuration file, ``svcreg.yaml``.

::

    listen: "127.0.0.1:9443"          # host:port; [::1]:9443 for IPv6
    db: "registry.db"                  # relative paths are relative to this file's directory
    networks: "services.yaml"          # optional
    tls:                               # required: there is no plaintext mode
      cert: "tls/server.crt"
      key: "tls/server.key"
      client_ca: "tls/ca.crt"          # optional: enables client certificates (mTLS)
      client_default_role: read        # optional: the role of a certificate whose CN names no token
    tokens:
      - {name: admin, role: admin, hash: "sha256:..."}
      - {name: inventory, role: read, hash: "sha256:...", visibility: all}   # sees every instance
    limits: {max_message_size: 1048576, max_connections: 1000, ...}
    event_retention: 10000
    synchronous: FULL
    deploy: {packages_dir: packages, known_hosts: known_hosts, ...}   # optional (docs/packages.md)

The file's shape is declared once, as msgspec structs (``_ConfigFile`` and its sections), and
read with :func:`registry.schema.convert`; :class:`ServerConfig` is the same settings with
every path made absolute and the tokens parsed. Read with ``yaml.safe_load`` only. Every
error is a :class:`ConfigError` naming the file, the field (``limits.max_connections``) and
the value (never a token). ``svcreg init`` and ``svcreg token create`` are in :mod:`registry.setup`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
import yaml

from .auth import Role, TokenEntry, TokenRegistry
from .exceptions import ConfigError, ValidationError
from .schema import FieldError, convert

__all__ = [
    "CONFIG_FILE_NAME",
    "DEFAULT_LISTEN",
    "SYNCHRONOUS_LEVELS",
    "DeployConfig",
    "Limits",
    "ServerConfig",
    "TlsFiles",
    "default_config_dir",
    "is_hostname",
    "read_config_data",
]

CONFIG_FILE_NAME: Final = "svcreg.yaml"
SYNCHRONOUS_LEVELS: Final = ("OFF", "NORMAL", "FULL", "EXTRA")
DEFAULT_LISTEN: Final = "127.0.0.1:9443"

_HOSTNAME: Final = re.compile(
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*"
)
# A year: any sane timeout is far below it, and it keeps `inf` (which YAML reads from .inf) out.
_MAX_SECONDS: Final = 365 * 24 * 3600.0

_Count = Annotated[int, msgspec.Meta(ge=1)]
_Seconds = Annotated[float, msgspec.Meta(gt=0, le=_MAX_SECONDS)]
_Text = Annotated[str, msgspec.Meta(pattern=r"\S")]
"""A string that is not blank: paths, names."""


def is_hostname(text: str) -> bool:
    """A DNS name (labels of letters, digits, '-', '_'), as ``listen`` and certificates accept."""
    return _HOSTNAME.fullmatch(text) is not None


def _check_listen(text: str) -> None:
    """``host:port``; an IPv6 host goes in brackets: ``[::1]:9443``."""
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit():
        raise FieldError("listen", f"{text!r} is not host:port (use [::1]:9443 for IPv6)")
    if not 1 <= int(port) <= 65535:
        raise FieldError("listen", f"{text!r}: port {port} is not in 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise FieldError("listen", f"{text!r}: {host} is not an IPv6 address") from None
    elif ":" in host:
        raise FieldError("listen", f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:{port}")
    elif not is_hostname(host):
        raise FieldError("listen", f"{text!r}: {host!r} is not a hostname or IP address")


def _absolute(base_dir: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base_dir / path


# --- sections ---------------------------------------------------------------------------------------


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-server limits (docs/protocol.md#limits); every value must be positive."""

    max_message_size: _Count = 1_048_576
    max_connections: _Count = 1000
    max_pending: _Count = 100
    max_pending_per_address: _Count = 20
    max_subscriptions_per_connection: _Count = 16
    send_queue: _Count = 1000
    send_buffer_bytes: _Count = 4_194_304
    handshake_timeout: _Seconds = 10.0
    ping_interval: _Seconds = 20.0
    ping_timeout: _Seconds = 20.0

    def __post_init__(self) -> None:
        # Limits built in code (embedders, tests) meet the bounds declared above, as the file's do;
        # for the file's, msgspec has already checked them and this finds nothing.
        for info in msgspec.structs.fields(self):
            convert(getattr(self, info.name), info.type, path=f"limits.{info.name}", error=ConfigError)

    def to_dict(self) -> dict[str, int | float]:
        return msgspec.structs.asdict(self)


class _TlsFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cert: _Text
    key: _Text
    client_ca: _Text | None = None
    # The role of a client certificate whose CN names no token entry; unset: such a certificate signs in nobody.
    client_default_role: Literal["read", "write", "admin"] | None = None


class TlsFiles(msgspec.Struct, frozen=True, kw_only=True):
    """Where the server's TLS files are (absolute); :class:`registry.tls.TlsServerConfig` loads them."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def to_dict(self) -> dict[str, str]:
        paths = {"cert": str(self.cert), "key": str(self.key)}
        if self.client_ca is not None:
            paths["client_ca"] = str(self.client_ca)
        return paths


class _TokenFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``tokens`` item; :meth:`TokenEntry.from_dict` checks the name, the role and the hash."""

    name: str
    role: str
    hash: str
    visibility: Literal["network", "all"] = "network"


class _DeploySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``deploy:`` settings that are not paths: the same in the file and in :class:`DeployConfig`."""

    host_key_checking: bool = True
    ssh_user: _Text = "root"
    install_base: _Text = "/opt"
    max_jobs: _Count = 4
    timeout: _Count = 3600
    keep_artifacts: bool = False
    max_package_size: _Count = 256 * 1024 * 1024


class _DeployFile(_DeploySettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    packages_dir: _Text = "packages"
    work_dir: _Text = "deploys"
    known_hosts: _Text = "known_hosts"
    ssh_key: _Text | None = None

    def __post_init__(self) -> None:
        if not self.install_base.startswith("/"):
            raise FieldError("install_base", f"{self.install_base!r} must be an absolute path")

    def resolve(self, base_dir: Path) -> DeployConfig:
        settings = msgspec.structs.asdict(self)
        for name in ("packages_dir", "work_dir", "known_hosts", "ssh_key"):
            if settings[name] is not None:
                settings[name] = _absolute(base_dir, settings[name])
        return DeployConfig(**settings)


class DeployConfig(_DeploySettings, frozen=True, kw_only=True):
    """The ``deploy:`` section: where packages come from and how the registry reaches hosts over SSH.

    ``deploy_package`` requests name a file in ``packages_dir`` (nothing outside it can be
    deployed). Host keys are checked against ``known_hosts`` (default ``<config dir>/known_hosts``;
    fill it with ``ssh-keyscan`` after checking the fingerprints). Node variables in the networks
    file (``ssh_user``, ``ssh_key``, ``ssh_port``, ``install_base``) override the defaults here.
    """

    packages_dir: Path
    work_dir: Path
    known_hosts: Path
    ssh_key: Path | None = None

    @classmethod
    def default(cls, base_dir: Path) -> DeployConfig:
        """The settings of a file without a ``deploy:`` section, its paths relative to ``base_dir``."""
        return _DeployFile().resolve(base_dir)

    def to_dict(self) -> dict[str, Any]:
        return {
            name: str(value) if isinstance(value, Path) else value
            for name, value in msgspec.structs.asdict(self).items()
            if value is not None
        }


class _UiFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``ui:`` section: browser origins, besides the server's own, that may open the WebSocket."""

    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from .webui import normalize_origins  # the Origin rules live with the Origin check

        try:
            normalize_origins(self.allowed_origins)
        except ValidationError as exc:
            raise FieldError(exc.field, exc.message) from None


class _Settings(msgspec.Struct, frozen=True, kw_only=True):
    """The top-level settings that are neither paths nor sections: the same in the file and in :class:`ServerConfig`."""

    listen: _Text = DEFAULT_LISTEN
    event_retention: _Count = 10_000
    synchronous: str = "FULL"

    def __post_init__(self) -> None:
        _check_listen(self.listen)
        if self.synchronous.upper() not in SYNCHRONOUS_LEVELS:
            raise FieldError("synchronous", f"{self.synchronous!r} is not one of {', '.join(SYNCHRONOUS_LEVELS)}")


class _ConfigFile(_Settings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``svcreg.yaml`` as written: paths relative to the file, tokens as mappings."""

    db: _Text = "registry.db"
    networks: _Text | None = None
    tls: _TlsFile | None = None
    tokens: tuple[_TokenFile, ...] | None = None
    limits: Limits | None = None
    deploy: _DeployFile | None = None
    ui: _UiFile | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tls is None:
            raise FieldError(
                "tls",
                "TLS is required (there is no plaintext mode); give tls.cert and tls.key, "
                "or run `svcreg init` to create them",
            )

    def resolve(self, base_dir: Path) -> ServerConfig:
        """Raises ConfigError: a bad token entry or a duplicate token name."""
        assert self.tls is not None  # __post_init__
        tokens = self.tokens or ()
        entries = tuple(
            TokenEntry.from_dict(msgspec.structs.asdict(item), where=f"tokens[{index}]")
            for index, item in enumerate(tokens)
        )
        TokenRegistry(entries)  # refuses duplicate names
        client_ca = self.tls.client_ca
        return ServerConfig(
            tls=TlsFiles(
                cert=_absolute(base_dir, self.tls.cert),
                key=_absolute(base_dir, self.tls.key),
                client_ca=_absolute(base_dir, client_ca) if client_ca is not None else None,
            ),
            db=_absolute(base_dir, self.db),
            listen=self.listen,
            networks=_absolute(base_dir, self.networks) if self.networks is not None else None,
            token_entries=entries,
            limits=self.limits or Limits(),
            event_retention=self.event_retention,
            synchronous=self.synchronous.upper(),
            deploy=(self.deploy or _DeployFile()).resolve(base_dir),
            allowed_origins=self.ui.allowed_origins if self.ui is not None else (),
            client_default_role=Role.parse(role) if (role := self.tls.client_default_role) is not None else None,
        )


# --- the configuration ------------------------------------------------------------------------------


class ServerConfig(_Settings, frozen=True, kw_only=True):
    """A validated ``svcreg.yaml``; every path is absolute. Build with :meth:`from_file` or :meth:`from_dict`."""

    tls: TlsFiles
    db: Path
    networks: Path | None = None
    token_entries: tuple[TokenEntry, ...] = ()
    limits: Limits = msgspec.field(default_factory=Limits)
    deploy: DeployConfig | None = None  # None: DeployConfig.default(the database's folder)
    allowed_origins: tuple[str, ...] = ()  # ui.allowed_origins
    client_default_role: Role | None = None  # tls.client_default_role

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
        return _load(read_config_data(path), base_dir=path.parent, where=f"{path}: ")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str | os.PathLike[str]) -> ServerConfig:
        """Validate the parsed file; ``base_dir`` anchors relative paths.

        Raises:
            ConfigError: unknown keys, a bad listen address, no ``tls`` section, a limit that is
                not positive, a bad token entry or a duplicate token name, a bad ``synchronous``.
        """
        return _load(data, base_dir=Path(base_dir).absolute(), where="")

    def to_dict(self) -> dict[str, Any]:
        """The file's form (with absolute paths): ``from_dict(config.to_dict(), base_dir=...) == config``."""
        data: dict[str, Any] = {"listen": self.listen, "db": str(self.db)}
        if self.networks is not None:
            data["networks"] = str(self.networks)
        data["tls"] = self.tls.to_dict()
        if self.client_default_role is not None:
            data["tls"]["client_default_role"] = self.client_default_role.label
        data["tokens"] = [entry.to_dict() for entry in self.token_entries]
        data["limits"] = self.limits.to_dict()
        data["event_retention"] = self.event_retention
        data["synchronous"] = self.synchronous
        if self.deploy is not None:
            data["deploy"] = self.deploy.to_dict()
        if self.allowed_origins:
            data["ui"] = {"allowed_origins": list(self.allowed_origins)}
        return data


def _load(data: object, *, base_dir: Path, where: str) -> ServerConfig:
    # A token hash is not quoted: a plain token pasted there by mistake must not reach a log.
    shape = convert(data, _ConfigFile, where=where, error=ConfigError, secret={"hash"})
    try:
        return shape.resolve(base_dir)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc.message}", field=exc.field) from None


def read_config_data(path: Path) -> dict[str, Any]:
    """The parsed YAML of a config file (a mapping), not yet validated.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or not a mapping.
    """
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
    return dict(data)


def default_config_dir() -> Path:
    """Where ``svcreg`` looks for ``svcreg.yaml`` and ``client.env``: ``$SVCREG_HOME``, else ``./var/svcreg``.

    The fallback is relative to the current directory (so a checkout is self-contained); the
    result is always absolute.
    """
    home = os.environ.get("SVCREG_HOME")
    if home:
        return Path(home).expanduser().absolute()
    return Path.cwd() / "var" / "svcreg"
