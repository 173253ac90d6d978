"""`svcreg`: the command line. Parses arguments, builds objects, calls them; no logic of its own.

Exit codes (scripts can trust them): 0 success, 1 error reported by the registry or the
store, 2 bad usage or bad input, 3 not found, 4 unauthorized or forbidden, 5 cannot reach
the registry.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .auth import Role
from .client import BlockingClient, ConnectionSettings, WsClient
from .config import DeployConfig, ServerConfig, default_config_dir
from .setup import add_token, init_directory
from .core import Registry
from .events import Event, EventType, parse_event_types
from .exceptions import (
    ConnectionFailed,
    Forbidden,
    NotFound,
    RegistryError,
    Unauthorized,
    ValidationError,
)
from .model import Endpoint, Location, NetworkInfo, ServiceEntry
from .network import NetworkConfig, NetworkManager
from .package import build_package, inspect_package
from .tls import TlsClientConfig

if TYPE_CHECKING:
    from .jobs import DeployJobs

__all__ = ["main"]

log = logging.getLogger("svcreg")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_DENIED = 4
EXIT_UNREACHABLE = 5


def _exit_code(error: RegistryError) -> int:
    if isinstance(error, ConnectionFailed):
        return EXIT_UNREACHABLE
    if isinstance(error, (Unauthorized, Forbidden)):
        return EXIT_DENIED
    if isinstance(error, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, ValidationError):
        return EXIT_USAGE
    return EXIT_ERROR


# --- output -------------------------------------------------------------------------------------


def _emit(options: argparse.Namespace, data: Any, table: Callable[[Any], list[list[str]]], headers: list[str]) -> None:
    """JSON for scripts (--json), a table for people."""
    if options.json:
        print(json.dumps(data, indent=2, default=lambda value: value.to_dict()))
        return
    rows = table(data)
    if not rows:
        print("(none)")
        return
    from rich.console import Console
    from rich.table import Table

    view = Table(*headers, box=None, header_style="bold")
    for row in rows:
        view.add_row(*row)
    Console(soft_wrap=True).print(view)


def _service_rows(entries: Any) -> list[list[str]]:
    entries = entries if isinstance(entries, list) else [entries]
    return [
        [
            entry.service_name,
            entry.host_id,
            entry.location.value,
            entry.state.value,
            entry.network_info.ip,
            ", ".join(f"{e.name}:{e.port}/{e.protocol}" for e in entry.endpoints),
            str(entry.mod_revision),
        ]
        for entry in entries
    ]


_SERVICE_HEADERS = ["SERVICE", "HOST", "LOCATION", "STATE", "IP", "ENDPOINTS", "REVISION"]


def _describe_event(event: Event) -> str:
    service = event.service
    subject = f"{service['service_name']}@{service['host_id']} {service['state']}" if service else ""
    return f"{event.revision:>8}  {event.type.value:<24} {subject}"


# --- connection ---------------------------------------------------------------------------------


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, separator, value = line.strip().partition("=")
        if separator and not key.startswith("#"):
            values[key.strip()] = value.strip()
    return values


def _settings(options: argparse.Namespace) -> ConnectionSettings:
    """--url/--ca/--token, else SVCREG_URL/SVCREG_CA/SVCREG_TOKEN, else the client.env `svcreg init` wrote."""
    environ = dict(os.environ)
    env_file = default_config_dir() / "client.env"
    if not environ.get("SVCREG_URL") and not options.url and env_file.is_file():
        environ.update({key: value for key, value in _read_env_file(env_file).items() if key not in environ})
    tls = TlsClientConfig(
        ca_file=options.ca or environ.get("SVCREG_CA") or None,
        cert=options.client_cert or environ.get("SVCREG_CLIENT_CERT") or None,
        key=options.client_key or environ.get("SVCREG_CLIENT_KEY") or None,
    )
    return ConnectionSettings.from_env(environ, url=options.url, tls=tls, token=options.token, timeout=options.timeout)


def _client(options: argparse.Namespace) -> BlockingClient:
    return BlockingClient(_settings(options))


# --- server-side commands -------------------------------------------------------------------------


def cmd_init(options: argparse.Namespace) -> int:
    directory = Path(options.directory) if options.directory else default_config_dir()
    result = init_directory(directory, hostnames=options.hostname or None, force=options.force)
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
    return EXIT_OK


def cmd_serve(options: argparse.Namespace) -> int:
    config_path = Path(options.config) if options.config else default_config_dir() / "svcreg.yaml"
    config = ServerConfig.from_file(config_path)
    _shrink_tls_read_buffers()
    return asyncio.run(_serve(config, topology_interval=options.topology_interval))


_TLS_READ_BUFFER = 32 * 1024


def _shrink_tls_read_buffers() -> None:
    """asyncio gives every TLS connection a zero-filled 256 KiB read buffer (``SSLProtocol.max_size``):
    with a thousand idle subscribers that is most of the server's memory. Registry frames are
    small; 32 KiB chunks read large ones just as well. Done here, for the ``serve`` process only,
    not in the library, because it is process-wide."""
    protocol = getattr(asyncio.sslproto, "SSLProtocol", None)
    if protocol is not None and getattr(protocol, "max_size", 0) > _TLS_READ_BUFFER:
        protocol.max_size = _TLS_READ_BUFFER


async def _serve(config: ServerConfig, *, topology_interval: float) -> int:
    """Serve until SIGTERM or SIGINT, then close every connection (1001) and the store."""
    from .server import WsServer
    from .tls import TlsServerConfig

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tls = TlsServerConfig.from_files(config.tls.cert, config.tls.key, client_ca=config.tls.client_ca)
    networks = NetworkConfig.from_file(config.networks) if config.networks else None
    registry = await asyncio.to_thread(
        Registry.with_persistence,
        config.db,
        synchronous=config.synchronous,
        networks=networks,
        event_retention=config.event_retention,
    )
    server: WsServer | None = None
    deploys: DeployJobs | None = None
    try:
        deploys = _deploy_jobs(config, registry, networks)
        manager = NetworkManager(networks, store=registry.store) if networks is not None else None
        registry.start_reaper()
        server = await WsServer.new_tls(
            config.listen,
            registry,
            tls,
            tokens=config.tokens,
            networks=manager,
            limits=config.limits,
            topology_interval=topology_interval,
            deploys=deploys,
        )
        print(
            f"svcreg {__version__} serving wss://{server.address}/ (store {config.db}, revision {registry.revision})",
            flush=True,
        )
        await stop.wait()
        print("shutting down: closing connections and the store", flush=True)
    finally:
        if server is not None:
            await server.close(timeout=10)
        if deploys is not None:
            await deploys.close()
        await asyncio.to_thread(registry.close)
    print(f"stopped at revision {registry.revision}", flush=True)
    return EXIT_OK


def _deploy_jobs(config: ServerConfig, registry: Registry, networks: NetworkConfig | None) -> DeployJobs:
    from .deploy import PackageDeployer
    from .jobs import DeployJobs
    from .package import Limits as PackageLimits

    settings = config.deploy or DeployConfig.default(config.db.parent)
    for folder in (settings.packages_dir, settings.work_dir):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    deployer = PackageDeployer(
        registry,
        networks=networks,
        known_hosts=settings.known_hosts,
        host_key_checking=settings.host_key_checking,
        work_dir=settings.work_dir,
        keep_artifacts=settings.keep_artifacts,
        limits=PackageLimits(max_size=settings.max_package_size),
        timeout=settings.timeout,
    )
    return DeployJobs(deployer, settings, networks)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def cmd_token_create(options: argparse.Namespace) -> int:
    config_path = Path(options.config) if options.config else default_config_dir() / "svcreg.yaml"
    token = add_token(config_path, options.name, Role.parse(options.role))
    print(token)
    print(
        f"token {options.name!r} ({options.role}) added to {config_path}; restart svcreg serve to use it",
        file=sys.stderr,
    )
    return EXIT_OK


# --- client commands --------------------------------------------------------------------------------


def _filters(options: argparse.Namespace) -> dict[str, Any]:
    names = ("service_name", "host_id", "location", "state", "network", "tag")
    return {name: getattr(options, name) for name in names if getattr(options, name, None) is not None}


def cmd_services_list(options: argparse.Namespace) -> int:
    with _client(options) as client:
        _emit(options, client.list_services(**_filters(options)), _service_rows, _SERVICE_HEADERS)
    return EXIT_OK


def cmd_services_get(options: argparse.Namespace) -> int:
    with _client(options) as client:
        _emit(options, client.get_service(options.name, options.host), _service_rows, _SERVICE_HEADERS)
    return EXIT_OK


def _parse_endpoint(text: str) -> Endpoint:
    """``name:port`` or ``name:port/udp``."""
    name, _, rest = text.partition(":")
    port, _, protocol = rest.partition("/")
    if not name or not port.isdigit():
        raise ValidationError(f"endpoint {text!r} is not NAME:PORT[/tcp|udp]", field="endpoint")
    return Endpoint(name, int(port), protocol or "tcp")


def _parse_pairs(pairs: list[str] | None, what: str) -> dict[str, str]:
    result = {}
    for pair in pairs or []:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ValidationError(f"{what} {pair!r} is not KEY=VALUE", field=what)
        result[key] = value
    return result


def cmd_services_register(options: argparse.Namespace) -> int:
    if options.file:
        text = sys.stdin.read() if options.file == "-" else Path(options.file).read_text()
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValidationError(f"{options.file}: not valid JSON: {exc}") from None
        entry = ServiceEntry.from_dict(data)
    else:
        missing = [flag for flag, value in (("--host", options.host), ("--ip", options.ip)) if not value]
        if not options.name or missing:
            raise ValidationError(f"register needs NAME, --host and --ip (or --file); missing {', '.join(missing)}")
        entry = ServiceEntry(
            options.name,
            options.host,
            options.location,
            NetworkInfo(options.ip, options.hostname, options.network),
            options.state,
            tuple(_parse_endpoint(text) for text in options.endpoint or []),
            tuple(options.tag or []),
            _parse_pairs(options.meta, "meta"),
            options.ttl,
            options.deregister_after,
            options.service_version,
        )
    with _client(options) as client:
        _emit(options, client.register_service(entry), _service_rows, _SERVICE_HEADERS)
    return EXIT_OK


def cmd_services_remove(options: argparse.Namespace) -> int:
    with _client(options) as client:
        _emit(options, client.remove_service(options.name, options.host), _service_rows, _SERVICE_HEADERS)
    return EXIT_OK


def cmd_services_set_state(options: argparse.Namespace) -> int:
    with _client(options) as client:
        _emit(options, client.set_state(options.name, options.state, options.host), _service_rows, _SERVICE_HEADERS)
    return EXIT_OK


def cmd_watch(options: argparse.Namespace) -> int:
    settings = _settings(options)
    wanted = sorted(parse_event_types(options.events)) if options.events else None
    event_filter = {key: value for key, value in _filters(options).items()}

    async def watch() -> None:
        async for event in WsClient.watch(settings, wanted, since_revision=options.since, filter=event_filter or None):
            if options.json:
                print(json.dumps(event.to_dict()), flush=True)
            else:
                print(_describe_event(event), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch())
    return EXIT_OK


def cmd_networks(options: argparse.Namespace) -> int:
    with _client(options) as client:
        networks = client.list_networks()
        topology = client.get_topology()
    if options.json:
        print(json.dumps({"networks": networks, "topology": topology}, indent=2))
        return EXIT_OK
    _emit(
        options,
        networks,
        lambda items: [[n["name"], n["type"], n["subnet"], str(len(n.get("nodes", [])))] for n in items],
        ["NETWORK", "TYPE", "SUBNET", "NODES"],
    )
    return EXIT_OK


def _allocation_rows(items: Any) -> list[list[str]]:
    items = items if isinstance(items, list) else [items]
    return [[item["owner"], item["network"], f"{item['ip']}/{item['prefixlen']}"] for item in items]


def cmd_ip_allocate(options: argparse.Namespace) -> int:
    with _client(options) as client:
        _emit(options, client.allocate_ip(options.owner, options.network), _allocation_rows, ["OWNER", "NETWORK", "IP"])
    return EXIT_OK


def cmd_ip_release(options: argparse.Namespace) -> int:
    with _client(options) as client:
        _emit(options, client.release_ip(options.owner, options.network), _allocation_rows, ["OWNER", "NETWORK", "IP"])
    return EXIT_OK


def cmd_ip_list(options: argparse.Namespace) -> int:
    with _client(options) as client:
        _emit(options, client.list_allocations(options.network), _allocation_rows, ["OWNER", "NETWORK", "IP"])
    return EXIT_OK


# --- the demo (the library on its own, no server) -------------------------------------------------------


def _package_rows(package: Any) -> list[list[str]]:
    manifest = package.manifest
    health = manifest.health
    rows = [
        ["file", str(package.path)],
        ["name", manifest.name],
        ["version", manifest.version],
        ["description", manifest.description],
        ["sha256", package.sha256],
        ["size", f"{package.size:,} bytes ({package.unpacked_size:,} unpacked, {len(package.members)} members)"],
        ["endpoints", ", ".join(f"{e.name}:{e.port}/{e.protocol}" for e in manifest.endpoints) or "-"],
        ["health", "-" if health is None else (f"tcp {health.host}:{health.tcp}" if health.tcp else health.command)],
        ["env", ", ".join(var.name + ("" if var.required else f"={var.default}") for var in manifest.env) or "-"],
        ["start / stop", f"{manifest.start} / {manifest.stop}"],
    ]
    if health is not None:
        rows[7][1] += f" (timeout {health.timeout:g} s)"
    return rows


def cmd_package_build(options: argparse.Namespace) -> int:
    package = build_package(options.directory, options.output)
    _emit(options, package, _package_rows, ["FIELD", "VALUE"])
    return EXIT_OK


def cmd_package_inspect(options: argparse.Namespace) -> int:
    _emit(options, inspect_package(options.file), _package_rows, ["FIELD", "VALUE"])
    return EXIT_OK


def _deploy_targets(options: argparse.Namespace) -> list[str | dict[str, Any]]:
    targets: list[str | dict[str, Any]] = list(options.node or [])
    if options.host:
        if not options.user:
            raise ValidationError("--host needs --user (the SSH user on that host)", field="--user")
        target: dict[str, Any] = {"host": options.host, "ssh_user": options.user, "port": options.port}
        if options.key:
            target["ssh_key"] = str(Path(options.key).absolute())
        if options.install_base:
            target["install_base"] = options.install_base
        if options.name:
            target["name"] = options.name
        targets.append(target)
    if not targets:
        raise ValidationError("say where to deploy: --node NAME (repeatable) or --host H --user U", field="--node")
    return targets


def _deploy_env(options: argparse.Namespace) -> dict[str, str]:
    env = _read_env_file(Path(options.env_file)) if options.env_file else {}
    env.update(_parse_pairs(options.env, "--env"))
    return env


def _follow_job(client: BlockingClient, job: dict[str, Any], console: Any, options: argparse.Namespace) -> Any:
    """Show a job's progress (a bar on a terminal, a line per host and task) until it finishes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    hosts = [target["name"] for target in job["targets"]]
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=options.json or not console.is_terminal,
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
            if kind != "status" and not options.json:
                note = f": {message.data['message']}" if message.data.get("message") else ""
                progress.console.print(f"{host} {message.data.get('task', '')}: {kind}{note}", highlight=False)


def cmd_deploy(options: argparse.Namespace) -> int:
    """Start a deploy job on the registry, follow its progress, exit 1 if any host failed."""
    from rich.console import Console

    targets = _deploy_targets(options)
    env = _deploy_env(options)
    console = Console(stderr=True)
    with _client(options) as client:
        job = client.deploy_package(options.package, targets=targets, env=env, keep_releases=options.keep_releases)
        try:
            finished = _follow_job(client, job, console, options)
        except KeyboardInterrupt:
            print(f"svcreg: stopped following job {job['job']}; it goes on on the registry", file=sys.stderr)
            return 130
    result = finished.get("result") or {}
    if options.json:
        print(json.dumps(finished, indent=2))
    else:
        rows = [
            [
                host,
                item["status"],
                item.get("version") or "-",
                item.get("rolled_back_to") or "-",
                item.get("message", ""),
            ]
            for host, item in (result.get("hosts") or {}).items()
        ]
        _emit(options, rows, lambda data: data, ["HOST", "RESULT", "VERSION", "ROLLED BACK TO", "MESSAGE"])
        if result.get("error"):
            print(f"svcreg: error: the deploy job broke: {result['error']}", file=sys.stderr)
    return EXIT_OK if result.get("ok") else EXIT_ERROR


def cmd_demo(options: argparse.Namespace) -> int:
    """Open the embedded store, show what the library does, then print events until stopped."""
    networks = NetworkConfig.from_file(options.networks) if options.networks else None
    registry = Registry.with_persistence(options.db, networks=networks)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        print(f"svcreg {__version__}: store {options.db} at revision {registry.revision}, {len(registry)} services")
        events = registry.subscribe(since_revision=registry.revision)
        threading.Thread(target=lambda: [print(_describe_event(e), flush=True) for e in events], daemon=True).start()
        registry.start_reaper(interval=0.5)
        if networks is not None:
            manager = NetworkManager(networks, store=registry.store)
            registry.update_topology(manager.detect().to_dict())
            lan = networks.by_location(Location.LAN)
            if lan:
                allocation = manager.allocate_ip("svcreg-demo", lan[0].name)
                print(f"allocated {allocation.ip}/{allocation.prefixlen} in {allocation.network} for svcreg-demo")
        host = socket.gethostname()
        registry.add_or_update(
            ServiceEntry(
                "svcreg-demo",
                host,
                Location.LOCAL,
                NetworkInfo("127.0.0.1"),
                endpoints=(Endpoint("http", 8080),),
                ttl_seconds=5,
            )
        )
        while not stop.wait(min(2.0, options.duration or 2.0)):
            registry.heartbeat("svcreg-demo", host)
            if options.duration is not None:
                break
        registry.set_state("svcreg-demo", "stopped", host)
    finally:
        registry.close()
    return EXIT_OK


# --- the parser ----------------------------------------------------------------------------------------


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection (default: SVCREG_URL, SVCREG_CA, SVCREG_TOKEN, or client.env)")
    group.add_argument("--url", help="wss://host:port/ or host:port")
    group.add_argument("--ca", help="CA certificate file that signed the server's certificate")
    group.add_argument("--token", help="bearer token (prefer SVCREG_TOKEN: arguments show in ps)")
    group.add_argument("--client-cert", help="client certificate (mTLS)")
    group.add_argument("--client-key", help="client key (mTLS)")
    group.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _add_filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", dest="service_name", help="only this service")
    parser.add_argument("--host", dest="host_id", help="only this host")
    parser.add_argument("--location", choices=[loc.value for loc in Location])
    parser.add_argument("--state", choices=["starting", "running", "stopped", "failed"])
    parser.add_argument("--network")
    parser.add_argument("--tag")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svcreg", description="svcreg: a service registry for Ansible fleets")
    parser.add_argument("--version", action="version", version=f"svcreg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser("init", help="create a CA, certificates, an admin token and a config")
    init.add_argument("directory", nargs="?", help="where (default: $SVCREG_HOME or ./var/svcreg)")
    init.add_argument("--hostname", action="append", help="extra name or IP for the server certificate")
    init.add_argument("--force", action="store_true", help="overwrite an existing setup")
    init.set_defaults(handler=cmd_init)

    serve = commands.add_parser("serve", help="run the registry server")
    serve.add_argument("--config", help="svcreg.yaml (default: $SVCREG_HOME/svcreg.yaml or ./var/svcreg/)")
    serve.add_argument(
        "--topology-interval",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="re-detect the network topology this often (default: 30); a change emits NetworkTopologyChanged",
    )
    serve.set_defaults(handler=cmd_serve)

    token = commands.add_parser("token", help="manage tokens").add_subparsers(dest="token_command", required=True)
    create = token.add_parser("create", help="add a token to the config and print it once")
    create.add_argument("--role", required=True, choices=["read", "write", "admin"])
    create.add_argument("--name", required=True)
    create.add_argument("--config")
    create.set_defaults(handler=cmd_token_create)

    services = commands.add_parser("services", help="list and change services").add_subparsers(
        dest="services_command", required=True
    )
    listing = services.add_parser("list", help="list instances")
    _add_filter_options(listing)
    _add_connection_options(listing)
    listing.set_defaults(handler=cmd_services_list)

    get = services.add_parser("get", help="one instance (running first, then nearest)")
    get.add_argument("name")
    get.add_argument("--host")
    _add_connection_options(get)
    get.set_defaults(handler=cmd_services_get)

    register = services.add_parser("register", help="register or update an instance")
    register.add_argument("name", nargs="?")
    register.add_argument("--file", help="a JSON service entry ('-' for stdin) instead of the flags")
    register.add_argument("--host")
    register.add_argument("--ip")
    register.add_argument("--location", default="lan", choices=[loc.value for loc in Location])
    register.add_argument("--state", default="running", choices=["starting", "running", "stopped", "failed"])
    register.add_argument("--hostname")
    register.add_argument("--network")
    register.add_argument("--endpoint", action="append", help="NAME:PORT[/udp], repeatable")
    register.add_argument("--tag", action="append")
    register.add_argument("--meta", action="append", help="KEY=VALUE, repeatable")
    register.add_argument("--ttl", type=float)
    register.add_argument("--deregister-after", type=float)
    register.add_argument("--service-version")
    _add_connection_options(register)
    register.set_defaults(handler=cmd_services_register)

    remove = services.add_parser("remove", help="unregister an instance")
    remove.add_argument("name")
    remove.add_argument("--host")
    _add_connection_options(remove)
    remove.set_defaults(handler=cmd_services_remove)

    set_state = services.add_parser("set-state", help="change an instance's state")
    set_state.add_argument("name")
    set_state.add_argument("state", choices=["starting", "running", "stopped", "failed"])
    set_state.add_argument("--host")
    _add_connection_options(set_state)
    set_state.set_defaults(handler=cmd_services_set_state)

    watch = commands.add_parser("watch", help="print events as they happen (resumes after reconnects)")
    watch.add_argument("events", nargs="*", metavar="EVENT", help=f"event types (default all): {', '.join(EventType)}")
    watch.add_argument("--since", type=int, help="start after this revision")
    _add_filter_options(watch)
    _add_connection_options(watch)
    watch.set_defaults(handler=cmd_watch)

    networks = commands.add_parser("networks", help="configured networks and the detected topology")
    _add_connection_options(networks)
    networks.set_defaults(handler=cmd_networks)

    ip = commands.add_parser("ip", help="IP allocation").add_subparsers(dest="ip_command", required=True)
    allocate = ip.add_parser("allocate", help="allocate (or return) OWNER's address in NETWORK")
    allocate.add_argument("owner")
    allocate.add_argument("network", help="a network name, or lan/local/wireguard")
    _add_connection_options(allocate)
    allocate.set_defaults(handler=cmd_ip_allocate)
    release = ip.add_parser("release", help="release OWNER's addresses")
    release.add_argument("owner")
    release.add_argument("--network")
    _add_connection_options(release)
    release.set_defaults(handler=cmd_ip_release)
    ip_list = ip.add_parser("list", help="list allocations")
    ip_list.add_argument("--network")
    _add_connection_options(ip_list)
    ip_list.set_defaults(handler=cmd_ip_list)

    package = commands.add_parser("package", help="build and inspect service packages").add_subparsers(
        dest="package_command", required=True
    )
    build = package.add_parser("build", help="make NAME-VERSION.tar.gz from a directory holding manifest.yaml")
    build.add_argument("directory", type=Path)
    build.add_argument("-o", "--output", type=Path, help="folder for the package (default: the directory's parent)")
    build.add_argument("--json", action="store_true", help="print JSON")
    build.set_defaults(handler=cmd_package_build)
    inspect = package.add_parser("inspect", help="validate a package and show its manifest")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(handler=cmd_package_inspect)

    deploy = commands.add_parser(
        "deploy", help="deploy a package (a file in the registry's packages folder) to nodes over SSH"
    )
    deploy.add_argument("package", help="NAME-VERSION.tar.gz in the registry's packages folder")
    deploy.add_argument("--node", action="append", help="a node of the networks file (repeatable)")
    deploy.add_argument("--host", help="deploy to this host instead (with --user)")
    deploy.add_argument("--user", help="SSH user on --host")
    deploy.add_argument("--key", help="SSH private key for --host, as a path on the registry host")
    deploy.add_argument("--port", type=int, default=22, help="SSH port of --host")
    deploy.add_argument("--install-base", help="install folder on the host (default: the registry's deploy config)")
    deploy.add_argument("--name", help="the instance's host_id for --host (default: the host)")
    deploy.add_argument("--env", action="append", metavar="NAME=VALUE", help="a variable for the service (repeatable)")
    deploy.add_argument("--env-file", help="NAME=VALUE lines (keeps values out of the process list)")
    deploy.add_argument("--keep-releases", type=int, default=5, help="good releases kept on each host")
    _add_connection_options(deploy)
    deploy.set_defaults(handler=cmd_deploy)

    demo = commands.add_parser("demo", help="run the library demo on the embedded store (no server)")
    demo.add_argument("--db", type=Path, default=Path("var/registry.db"))
    demo.add_argument("--networks", type=Path, help="a services.yaml networks file")
    demo.add_argument("--duration", type=float, help="stop after this many seconds (default: at Ctrl-C)")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if options.verbose else logging.WARNING, format="svcreg: %(levelname)s %(message)s"
    )
    # websockets logs every frame at DEBUG, and an `authenticate` frame carries a token:
    # frames are never logged, even with --verbose.
    logging.getLogger("websockets").setLevel(logging.INFO if options.verbose else logging.WARNING)
    try:
        return options.handler(options)
    except RegistryError as exc:
        print(f"svcreg: error: {exc.message}", file=sys.stderr)
        return _exit_code(exc)
    except OSError as exc:
        print(f"svcreg: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
