"""Set up a molecule scenario's registry home before `svcreg serve` (run by molecule/shared/create.yml).

    registry_setup.py HOME --networks JSON --listen 0.0.0.0:19441 [--hostname 172.18.0.1]... [--client NAME=ROLE]...

* HOME/services.yaml from --networks (the `networks:` mapping of the networks file, as JSON);
* what `svcreg init HOME` does (CA, server certificate, svcreg.yaml, admin token; it keeps that services.yaml).
  The server certificate also covers each --hostname: nodes check it when they connect to the docker gateway
  or to the WireGuard address of the controller;
* `listen` in svcreg.yaml set to --listen;
* for each --client NAME=ROLE: a token entry NAME with ROLE (what `svcreg token create` does; the token itself is
  not kept) and a client certificate with CN=NAME from the registry's CA in HOME/clients/NAME.crt and NAME.key.
  The scenarios authenticate with these certificates only (mTLS: the role is the token entry's of the same
  name), so molecule.yml can name the credentials by path (SVCREG_CLIENT_CERT/KEY) before they exist.

A HOME that already has svcreg.yaml is left as it is (prints "exists"), so create can be re-run.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

from registry.auth import Role
from registry.config import ServerConfig
from registry.pki import CertificateBundle, generate_client_certificate, write_file_atomically
from registry.setup import add_token, init_directory


def _client(text: str) -> tuple[str, Role]:
    name, separator, role = text.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=ROLE")
    return name, Role.parse(role)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", type=Path)
    parser.add_argument("--networks", required=True, type=json.loads, help="the networks mapping, as JSON")
    parser.add_argument("--scenario", default="", help="named in the networks file's header comment")
    parser.add_argument("--listen", required=True, help="host:port for svcreg.yaml")
    parser.add_argument("--hostname", action="append", default=[], help="extra name or IP for the server certificate")
    parser.add_argument("--client", action="append", default=[], type=_client, help="NAME=ROLE (read, write, admin)")
    options = parser.parse_args()

    home: Path = options.home.absolute()
    config_path = home / "svcreg.yaml"
    if config_path.exists():
        print(f"exists: {config_path}")
        return 0
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    header = f"# Written by molecule/shared/create.yml for the scenario {options.scenario}.\n"
    networks = yaml.safe_dump({"networks": options.networks}, sort_keys=False, default_flow_style=False)
    write_file_atomically(home / "services.yaml", (header + networks).encode(), mode=0o644)
    result = init_directory(home, hostnames=options.hostname)
    text = config_path.read_text()
    text, count = re.subn(r"(?m)^listen: .*$", f"listen: {options.listen}", text, count=1)
    if count != 1:
        raise SystemExit(f"{config_path}: no 'listen:' line to change")
    write_file_atomically(config_path, text.encode(), mode=0o600)

    ca = CertificateBundle(result.ca_cert.read_bytes(), result.ca_key.read_bytes())
    clients = home / "clients"
    clients.mkdir(mode=0o700, exist_ok=True)
    for name, role in options.client:
        existing = {entry.name: entry.role for entry in ServerConfig.from_file(config_path).tokens.entries}
        if name not in existing:
            add_token(config_path, name, role)
        elif existing[name] != role:
            raise SystemExit(f"{config_path}: token entry {name!r} has role {existing[name]}, not {role}")
        generate_client_certificate(ca, name).write(clients / f"{name}.crt", clients / f"{name}.key")
    ServerConfig.from_file(config_path)  # what serve will read: fail here, with the file named, if it is wrong
    print(f"initialised: {config_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
