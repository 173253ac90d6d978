"""What the ``svcreg`` commands print: JSON for scripts (``--json``), tables and progress for people."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import __version__

if TYPE_CHECKING:
    from rich.console import Console

    from .app import RegistryApp
    from .client import BlockingClient
    from .events import Event
    from .model import ServiceEntry, Topology
    from .package import Package
    from .setup import InitResult

__all__ = [
    "ALLOCATIONS",
    "DEPLOY_RESULT",
    "NETWORKS",
    "PACKAGE",
    "SERVICES",
    "TOPOLOGY",
    "View",
    "describe_event",
    "emit",
    "follow_job",
    "print_deploy_result",
    "print_init",
    "print_new_token",
    "print_serving",
    "print_stopped",
    "print_stopping",
]

Rows = list[list[str]]


class View(NamedTuple):
    """How a command's result becomes a table: its rows, under these headers; ``hint`` (on
    stderr) says why an empty answer may be empty."""

    rows: Callable[[Any], Rows]
    headers: list[str]
    hint: str | None = None


def emit(data: Any, view: View, *, as_json: bool) -> None:
    """JSON for scripts (``as_json``), a table for people (``(none)`` when it has no rows)."""
    if as_json:
        print(json.dumps(data, indent=2, default=lambda value: value.to_dict()))
        return
    rows = view.rows(data)
    if not rows:
        print("(none)")
        if view.hint:
            print(f"svcreg: {view.hint}", file=sys.stderr)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*view.headers, box=None, header_style="bold")
    for row in rows:
        table.add_row(*row)
    Console(soft_wrap=True).print(table)


def _service_rows(entries: ServiceEntry | list[ServiceEntry]) -> Rows:
    return [
        [
            entry.service_name,
            entry.host_id,
            entry.location.value if entry.location is not None else "",
            entry.state.value,
            entry.network_info.ip or "",
            ", ".join(f"{e.name}:{e.port}/{e.protocol}" for e in entry.endpoints),
            str(entry.mod_revision),
        ]
        for entry in (entries if isinstance(entries, list) else [entries])
    ]


def _allocation_rows(items: dict[str, Any] | list[dict[str, Any]]) -> Rows:
    items = items if isinstance(items, list) else [items]
    return [[item["owner"], item["network"], f"{item['ip']}/{item['prefixlen']}"] for item in items]


def _network_rows(answer: dict[str, Any]) -> Rows:
    """The networks of ``{"networks": [...], "topology": {"revision", "topology"}}``, each with what the
    registry host has in it."""
    topology = (answer.get("topology") or {}).get("topology") or {}
    here: dict[str, list[str]] = {}
    for item in topology.get("networks") or ():
        if item.get("network") is not None:
            here.setdefault(item["network"], []).append(f"{item['address']} ({item['interface']})")
    missing = set(topology.get("missing") or ())
    rows = []
    for network in answer["networks"]:
        name = network["name"]
        detected = ", ".join(here.get(name, [])) or ("not on this host" if name in missing else "-")
        rows.append([name, network["type"], network["subnet"], str(len(network.get("nodes") or [])), detected])
    return rows


def _topology_rows(topology: Topology) -> Rows:
    rows = [
        [item.interface, item.location.value, item.address, item.network or "(not configured)"]
        for item in topology.networks
    ]
    rows += [["-", "-", "-", f"{name}: no address on this host"] for name in topology.missing]
    rows += [["-", "-", "-", f"warning: {text}"] for text in topology.warnings]
    return rows


def _package_rows(package: Package) -> Rows:
    manifest = package.manifest
    health = manifest.health
    rows: Rows = [
        ["file", str(package.path)],
        ["name", manifest.name],
        ["version", manifest.version],
        ["description", manifest.description or "-"],
        ["sha256", package.sha256],
        ["size", f"{package.size:,} bytes ({package.unpacked_size:,} unpacked, {len(package.members)} members)"],
        ["endpoints", ", ".join(f"{e.name}:{e.port}/{e.protocol}" for e in manifest.endpoints) or "-"],
        [
            "health",
            "-" if health is None else (f"tcp {health.host}:{health.tcp}" if health.tcp else health.command or ""),
        ],
        ["env", ", ".join(var.name + ("" if var.required else f"={var.default}") for var in manifest.env) or "-"],
        ["start / stop", f"{manifest.start} / {manifest.stop}"],
    ]
    if health is not None:
        rows[7][1] += f" (timeout {health.timeout:g} s)"
    return rows


def _deploy_rows(result: dict[str, Any]) -> Rows:
    """One row per host of a finished deploy job's ``result``."""
    return [
        [host, item["status"], item.get("version") or "-", item.get("rolled_back_to") or "-", item.get("message", "")]
        for host, item in (result.get("hosts") or {}).items()
    ]


SERVICES = View(
    _service_rows,
    ["SERVICE", "HOST", "LOCATION", "STATE", "IP", "ENDPOINTS", "REVISION"],
    "nothing registered is visible to this token: a read or write token sees only the instances of the "
    "network it connects from, and local instances of its own host (an admin token sees all; docs/security.md)",
)
ALLOCATIONS = View(_allocation_rows, ["OWNER", "NETWORK", "IP"])
NETWORKS = View(_network_rows, ["NETWORK", "TYPE", "SUBNET", "NODES", "ON THE REGISTRY HOST"])
TOPOLOGY = View(_topology_rows, ["INTERFACE", "LOCATION", "ADDRESS", "NETWORK"])
PACKAGE = View(_package_rows, ["FIELD", "VALUE"])
DEPLOY_RESULT = View(_deploy_rows, ["HOST", "RESULT", "VERSION", "ROLLED BACK TO", "MESSAGE"])


def print_init(directory: Path, result: InitResult) -> None:
    """What ``svcreg init`` made in ``directory`` (as given), the admin token (shown this once), how to start."""
    print(f"initialised {directory}")
    print(f"  config:   {result.config_path}")
    print(f"  CA:       {result.ca_cert}")
    print(f"  networks: {result.networks_path}")
    print(f"  client:   {result.client_env}  (source it, or svcreg reads it by itself)")
    print()
    print("admin token (shown once; also in admin.token, mode 0600):")
    print(f"  {result.admin_token}")
    print()
    print(f"start the registry:  svcreg serve --config {result.config_path}")


def print_serving(app: RegistryApp) -> None:
    assert app.registry is not None
    revision = app.registry.revision
    loop = "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    print(
        f"svcreg {__version__} serving wss://{app.address}/ (store {app.config.db}, {loop} loop, revision {revision})",
        flush=True,
    )


def print_stopping(app: RegistryApp) -> None:
    print("shutting down: closing connections and the store", flush=True)


def print_stopped(app: RegistryApp) -> None:
    assert app.registry is not None
    print(f"stopped at revision {app.registry.revision}", flush=True)


def print_new_token(token: str, *, name: str, role: str, config_path: Path) -> None:
    """The token on stdout (for scripts), what happened on stderr."""
    print(token)
    print(
        f"token {name!r} ({role}) added to {config_path}; a running server uses it after a reload: "
        "kill -HUP <pid of svcreg serve> (or systemctl reload svcreg)",
        file=sys.stderr,
    )


def print_deploy_result(finished: dict[str, Any], *, as_json: bool) -> None:
    """A finished deploy job: the whole ``finished`` data as JSON, or a row per host (and the error, if it broke)."""
    result = finished.get("result") or {}
    if as_json:
        print(json.dumps(finished, indent=2))
        return
    emit(result, DEPLOY_RESULT, as_json=False)
    if result.get("error"):
        print(f"svcreg: error: the deploy job broke: {result['error']}", file=sys.stderr)


def describe_event(event: Event) -> str:
    service = event.service_data
    allocation = event.allocation_data
    if service is not None:
        subject = f"{service['service_name']}@{service['host_id']} {service['state']}"
    elif allocation is not None:
        subject = f"{allocation['ip']}/{allocation['prefixlen']} {allocation['network']} {allocation['owner']}"
    elif event.data.get("networks"):
        subject = ", ".join(f"{kind}: {' '.join(names)}" for kind, names in event.data["networks"].items() if names)
    else:
        subject = ""
    return f"{event.revision:>8}  {event.type.value:<24} {subject}"


def follow_job(client: BlockingClient, job: dict[str, Any], *, console: Console, quiet: bool) -> Any:
    """Show a job's progress (a bar on a terminal, a line per host and task) until it finishes.

    Returns the job's ``finished`` data. ``quiet``: no bar and no lines (``--json``).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    hosts = [target["name"] for target in job["targets"]]
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
    ) as progress:
        bar = progress.add_task(f"deploying {job['package']['name']} {job['package']['version']}", total=len(hosts))
        while True:
            message = client.next_job_message(timeout=None)
            if message is None or message.job != job["job"]:
                continue
            if message.event == "finished":
                return message.data
            kind, host = message.data.get("kind"), message.data.get("host")
            if kind in ("ok", "changed", "failed", "unreachable") and host in hosts:
                progress.advance(bar)
            if kind != "status" and not quiet:
                note = f": {message.data['message']}" if message.data.get("message") else ""
                progress.console.print(f"{host} {message.data.get('task', '')}: {kind}{note}", highlight=False)
