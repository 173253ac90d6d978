"""Pack the registry's client side for the node containers (run by molecule/shared/tasks/node-client.yml).

    client_bundle.py OUTDIR --home SVCREG_HOME --url wss://GATEWAY:PORT/ --node NAME [--node NAME]...

The nodes have Debian's python3 (3.11, like the controller's venv) but none of the registry's libraries, and no
way to install them without the internet. So the nodes get the controller's copy, to unpack at /:

OUTDIR/svcreg-client.tar.gz, the same for every node:
    /opt/svcreg/lib/                  `registry` and the libraries it imports, from this Python's environment
                                      (and the collection's module_utils, which registry.package imports)
    /usr/local/bin/svcreg             the svcreg CLI (`services heartbeat --every`: the heartbeat agent;
                                      `topology`: this node's networks as svcreg detects them)
OUTDIR/NAME.tar, one per node:
    /etc/svcreg/client.env            SVCREG_URL (--url), SVCREG_CA, SVCREG_CLIENT_CERT, SVCREG_CLIENT_KEY
    /etc/svcreg/ca.crt, client.crt, client.key   the registry's CA; the node's certificate (CN = NAME,
                                      SVCREG_HOME/clients/NAME.*, made by registry_setup.py)
    /etc/svcreg/services.yaml         the registry's networks file (for svcreg topology)

Compiled extensions (cryptography, websockets' speedups) fit because node and controller are both Debian
bookworm on the same architecture with CPython 3.11; the scenario checks that the client works on the node.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

# What `import registry.cli` and `registry.network.detect_topology` pull in (see the imports in registry/), and
# rich for the CLI's tables (its markdown and syntax highlighting, and their libraries, are not needed).
MODULES = (
    "registry",
    "websockets",
    "msgspec",
    "yaml",
    "_yaml",
    "netaddr",
    "sqlitedict",
    "cryptography",
    "cffi",
    "_cffi_backend",
    "rich",
    # registry.package shares the package format's rules with the collection (its stdlib-only module_utils)
    "ansible_collections.svcreg.registry.plugins.module_utils",
)

_WRAPPER = """\
#!/bin/sh
# {what}, with the settings in /etc/svcreg/client.env (molecule/shared/scripts/client_bundle.py).
set -a
. /etc/svcreg/client.env
set +a
PYTHONPATH=/opt/svcreg/lib exec python3 {run}
"""

COMMANDS = {
    "svcreg": ("The svcreg CLI", '-m registry.cli "$@"'),
}


def _module_path(name: str) -> Path:
    """Where the module or package ``name`` is (a namespace package: its first directory that exists)."""
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations is not None:
        for location in spec.submodule_search_locations:
            if Path(location).is_dir():
                return Path(location)
    elif spec is not None and spec.origin is not None:
        return Path(spec.origin)
    raise SystemExit(f"client_bundle: cannot find module {name!r} in {sys.executable}'s environment")


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if "__pycache__" in Path(info.name).parts:
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _add_directory(archive: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    archive.addfile(_owned_by_root(info))


def _add_file(archive: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    archive.addfile(_owned_by_root(info), io.BytesIO(data))


def _write(path: Path, mode: str, fill: Callable[[tarfile.TarFile], None]) -> None:
    """Write the archive next to ``path`` and rename it into place: a half-written one is never used."""
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, mode, **({"compresslevel": 1} if mode.endswith("gz") else {})) as archive:
        fill(archive)
    partial.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--home", type=Path, required=True, help="the registry's home (SVCREG_HOME)")
    parser.add_argument("--url", required=True, help="the registry's address as the nodes reach it")
    parser.add_argument("--node", action="append", default=[], help="a node name (repeat)")
    options = parser.parse_args()
    options.outdir.mkdir(parents=True, exist_ok=True)

    def common(archive: tarfile.TarFile) -> None:
        for directory in ("opt/svcreg", "opt/svcreg/lib"):
            _add_directory(archive, directory)
        for name in MODULES:
            *parents, _ = name.split(".")
            for depth in range(1, len(parents) + 1):
                _add_directory(archive, "/".join(["opt/svcreg/lib", *parents[:depth]]))
            path = _module_path(name)
            archive.add(path, arcname="/".join(["opt/svcreg/lib", *parents, path.name]), filter=_owned_by_root)
        for command, (what, run) in COMMANDS.items():
            _add_file(archive, f"usr/local/bin/{command}", _WRAPPER.format(what=what, run=run).encode(), 0o755)

    _write(options.outdir / "svcreg-client.tar.gz", "w:gz", common)

    for node in options.node:

        def settings(archive: tarfile.TarFile, node: str = node) -> None:
            _add_directory(archive, "etc/svcreg")
            env = (
                "# The scenario's registry and this node's certificate (molecule/shared/scripts/client_bundle.py)\n"
                f"SVCREG_URL={options.url}\n"
                "SVCREG_CA=/etc/svcreg/ca.crt\n"
                "SVCREG_CLIENT_CERT=/etc/svcreg/client.crt\n"
                "SVCREG_CLIENT_KEY=/etc/svcreg/client.key\n"
            )
            _add_file(archive, "etc/svcreg/client.env", env.encode(), 0o644)
            _add_file(archive, "etc/svcreg/ca.crt", (options.home / "tls" / "ca.crt").read_bytes(), 0o644)
            _add_file(archive, "etc/svcreg/services.yaml", (options.home / "services.yaml").read_bytes(), 0o644)
            clients = options.home / "clients"
            _add_file(archive, "etc/svcreg/client.crt", (clients / f"{node}.crt").read_bytes(), 0o644)
            _add_file(archive, "etc/svcreg/client.key", (clients / f"{node}.key").read_bytes(), 0o600)

        _write(options.outdir / f"{node}.tar", "w", settings)
    print(f"{options.outdir}: svcreg-client.tar.gz and {len(options.node)} node archives")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
