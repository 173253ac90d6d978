"""The first run and the tokens: ``svcreg init`` (:func:`init_directory`), ``svcreg token create`` (:func:`add_token`).

Secrets (keys, tokens, the config with token hashes) are written atomically with mode 0600,
in directories with mode 0700.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from .auth import Role, TokenEntry, generate_token, hash_token
from .config import (
    CONFIG_FILE_NAME,
    DEFAULT_LISTEN,
    Limits,
    ServerConfig,
    default_config_dir,
    is_hostname,
    read_config_data,
)
from .exceptions import ConfigError
from .pki import generate_ca, generate_server_certificate, write_file_atomically

__all__ = ["InitResult", "add_token", "client_environment", "init_directory", "read_env_file"]

_HEADER: Final = """\
# svcreg server configuration (docs/security.md). Relative paths are relative to this file.
# Tokens are stored as hashes only; `svcreg token create` appends one and rewrites this file.
"""

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


def _dump_config(data: Mapping[str, Any]) -> bytes:
    return (_HEADER + yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False)).encode("utf-8")


# --- client.env -----------------------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines, as in ``client.env`` (``#`` starts a comment line)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, separator, value = line.strip().partition("=")
        if separator and not key.startswith("#"):
            values[key.strip()] = value.strip()
    return values


def client_environment(environ: Mapping[str, str], *, url: str | None = None) -> dict[str, str]:
    """``environ`` completed from the ``client.env`` that ``svcreg init`` wrote in :func:`default_config_dir`.

    The file is read only when no URL is given (``url`` or ``SVCREG_URL``), and it never
    overrides a variable that is set.
    """
    completed = dict(environ)
    env_file = default_config_dir() / "client.env"
    if not completed.get("SVCREG_URL") and not url and env_file.is_file():
        completed.update({key: value for key, value in read_env_file(env_file).items() if key not in completed})
    return completed


# --- tokens -------------------------------------------------------------------------------------------


def add_token(config_path: str | os.PathLike[str], name: str, role: Role | str, *, sees_all: bool = False) -> str:
    """Append a new token for ``name`` to the config file and return the plain token (show it once).
    ``sees_all``: the token sees every instance (``visibility: all``), whatever its role.

    The file is validated first, then rewritten atomically with mode 0600 (comments are not
    kept). A running server picks the token up on a reload (``SIGHUP``).

    Raises:
        ConfigError: the file is invalid, or the name is taken.
        ValidationError: a bad role.
    """
    path = Path(config_path).absolute()
    raw = read_config_data(path)
    tokens = ServerConfig.from_file(path).tokens
    try:
        entry, token = tokens.add(name, role if isinstance(role, Role) else Role.parse(role), sees_all=sees_all)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", field=exc.field) from None
    raw["tokens"] = [*(raw.get("tokens") or []), entry.to_dict()]
    write_file_atomically(path, _dump_config(raw), mode=0o600)
    return token


# --- svcreg init ----------------------------------------------------------------------------------------


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
    # An odd local hostname is skipped rather than failing init; a bad explicit one is an error (registry.pki).
    candidates = [this_host] if is_hostname(this_host) else []
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
