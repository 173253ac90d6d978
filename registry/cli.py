"""`svcreg`: the command line. Parses arguments and calls the pieces that do the work; no logic of its own.

The server is assembled by :mod:`registry.app`, ``init`` and ``token create`` are in
:mod:`registry.setup`, and what the commands print is in :mod:`registry.render`.

Exit codes (scripts can trust them): 0 success, 1 error reported by the registry or the
store, 2 bad usage or bad input, 3 not found, 4 unauthorized or forbidden, 5 cannot reach
the registry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from . import __version__, render
from .app import RegistryApp, run_demo, shrink_tls_read_buffers
from .auth import Role
from .client import BlockingClient, ConnectionSettings, WsClient
from .config import CONFIG_FILE_NAME, ServerConfig, default_config_dir
from .events import EventType, parse_event_types
from .exceptions import (
    ConfigError,
    ConnectionFailed,
    Forbidden,
    NotFound,
    RegistryError,
    Unauthorized,
    ValidationError,
)
from .model import Endpoint, Location, NetworkInfo, ServiceEntry, Topology
from .network import NetworkConfig, detect_topology
from .package import build_package, inspect_package
from .query import QUERY_FIELDS
from .setup import add_token, client_environment, init_directory, read_env_file
from .tls import TlsClientConfig

__all__ = ["main"]

_Request = Callable[[BlockingClient, argparse.Namespace], Any]
"""What a one-request command asks: ``lambda client, options: client.list_services(...)``."""

EXIT_OK, EXIT_ERROR = 0, 1
EXIT_INTERRUPTED: Final = 130  # Ctrl-C, as a shell reports SIGINT
# The repository's example networks file, for `svcreg topology` in a checkout.
_REPO_NETWORKS: Final = Path("inventories/services.yaml")
# Exit codes of the errors, the most specific class first (see the top); every ValidationError is bad input.
_EXIT_CODES: Final = ((ConnectionFailed, 5), ((Unauthorized, Forbidden), 4), (NotFound, 3), (ValidationError, 2))


def _settings(
    *,
    url: str | None,
    ca: str | None,
    token: str | None,
    client_cert: str | None,
    client_key: str | None,
    timeout: float,
) -> ConnectionSettings:
    """The arguments, else SVCREG_URL/SVCREG_CA/SVCREG_TOKEN/..., else the client.env `svcreg init` wrote."""
    environ = client_environment(os.environ, url=url)
    tls = TlsClientConfig(
        ca_file=ca or environ.get("SVCREG_CA") or None,
        cert=client_cert or environ.get("SVCREG_CLIENT_CERT") or None,
        key=client_key or environ.get("SVCREG_CLIENT_KEY") or None,
    )
    return ConnectionSettings.from_env(environ, url=url, tls=tls, token=token, timeout=timeout)


def _connection(options: argparse.Namespace) -> ConnectionSettings:
    """The options :func:`_add_connection_options` declares, read from a command's namespace."""
    return _settings(
        url=options.url,
        ca=options.ca,
        token=options.token,
        client_cert=options.client_cert,
        client_key=options.client_key,
        timeout=options.timeout,
    )


def _filters(options: argparse.Namespace) -> dict[str, Any]:
    """The options :func:`_add_filter_options` declares that were given."""
    return {name: getattr(options, name) for name in QUERY_FIELDS if getattr(options, name) is not None}


def _config_path(path: str | None) -> Path:
    return Path(path) if path else default_config_dir() / CONFIG_FILE_NAME


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _parse_endpoint(text: str) -> Endpoint:
    """``name:port`` or ``name:port/udp``."""
    name, _, rest = text.partition(":")
    port, _, protocol = rest.partition("/")
    if not name or not port.isdigit():
        raise ValidationError(f"endpoint {text!r} is not NAME:PORT[/tcp|udp]", field="endpoint")
    return Endpoint.from_dict({"name": name, "port": int(port), "protocol": protocol or "tcp"}, path="endpoint")


def _parse_pairs(pairs: list[str] | None, what: str) -> dict[str, str]:
    """``KEY=VALUE`` arguments (``--meta``, ``--env``)."""
    for pair in pairs or []:
        if not pair.partition("=")[0] or "=" not in pair:
            raise ValidationError(f"{what} {pair!r} is not KEY=VALUE", field=what)
    return dict(pair.split("=", 1) for pair in pairs or [])


# --- server-side commands -------------------------------------------------------------------------


def cmd_init(options: argparse.Namespace) -> int:
    directory = Path(options.directory) if options.directory else default_config_dir()
    result = init_directory(directory, hostnames=options.hostname or None, force=options.force)
    render.print_init(directory, result)
    return EXIT_OK


def cmd_serve(options: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then close every connection (1001) and the store."""
    path = _config_path(options.config)
    app = RegistryApp(ServerConfig.from_file(path), config_path=path, topology_interval=options.topology_interval)
    run = _event_loop(options.loop)
    shrink_tls_read_buffers()  # process-wide, so here and not in the library
    run(app.serve(started=render.print_serving, stopping=render.print_stopping))
    render.print_stopped(app)
    return EXIT_OK


def _event_loop(choice: str) -> Callable[[Any], Any]:
    """``asyncio.run`` or ``uvloop.run`` for ``--loop`` (auto: uvloop where it is installed; its TLS
    and sockets are faster, see docs/registry.md)."""
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValidationError("--loop uvloop: uvloop is not installed (pip install uvloop)", field="loop") from None
        return asyncio.run
    return uvloop.run


def cmd_token_create(options: argparse.Namespace) -> int:
    config_path = _config_path(options.config)
    token = add_token(config_path, options.name, Role.parse(options.role), sees_all=options.see_all)
    render.print_new_token(token, name=options.name, role=options.role, config_path=config_path)
    return EXIT_OK


def cmd_demo(options: argparse.Namespace) -> int:
    """Open the embedded store, show what the library does, then print events until stopped."""
    run_demo(
        options.db,
        networks=options.networks,
        duration=options.duration,
        say=print,
        on_event=lambda event: print(render.describe_event(event), flush=True),
    )
    return EXIT_OK


# --- client commands --------------------------------------------------------------------------------


def cmd_request(options: argparse.Namespace) -> int:
    """The client commands that make one request (``options.request``) and show its answer as ``options.view``."""
    with BlockingClient(_connection(options)) as client:
        answer = options.request(client, options)
    render.emit(answer, options.view, as_json=options.json)
    return EXIT_OK


def cmd_services_register(options: argparse.Namespace) -> int:
    if options.file:
        text = sys.stdin.read() if options.file == "-" else Path(options.file).read_text()
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValidationError(f"{options.file}: not valid JSON: {exc}") from None
        entry = ServiceEntry.from_dict(data)
    else:
        missing = [name for name, value in (("NAME", options.name), ("--host", options.host)) if not value]
        if missing:
            raise ValidationError(f"register needs NAME and --host (or --file); missing {', '.join(missing)}")
        if not (options.ip or options.network or options.location):
            raise ValidationError(
                "register needs an address: --ip, or --network (or --location) for the registry to allocate one",
                field="--ip",
            )
        entry = ServiceEntry(
            options.name,
            options.host,
            options.location,
            NetworkInfo(options.ip or None, options.hostname, options.network),
            options.state,
            tuple(_parse_endpoint(text) for text in options.endpoint or []),
            tuple(options.tag or []),
            _parse_pairs(options.meta, "meta"),
            options.ttl,
            options.deregister_after,
            options.service_version,
        )
    with BlockingClient(_connection(options)) as client:
        render.emit(client.register_service(entry), render.SERVICES, as_json=options.json)
    return EXIT_OK


def cmd_watch(options: argparse.Namespace) -> int:
    settings = _connection(options)
    wanted = sorted(parse_event_types(options.events)) if options.events else None
    event_filter = _filters(options) or None

    def status(text: str) -> None:
        print(f"svcreg: {text}", file=sys.stderr, flush=True)

    async def watch() -> None:
        async for event in WsClient.watch(
            settings, wanted, since_revision=options.since, filter=event_filter, on_status=status
        ):
            print(json.dumps(event.to_dict()) if options.json else render.describe_event(event), flush=True)

    try:
        asyncio.run(watch())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


def cmd_services_heartbeat(options: argparse.Namespace) -> int:
    """One heartbeat; with ``--every``, a heartbeat agent: one beat every N seconds until SIGTERM (exit 0) or
    Ctrl-C (130), reconnecting after a lost connection, printing a line whenever the state it sees changes."""
    settings = _connection(options)
    if options.every is None:
        with BlockingClient(settings) as once:
            render.emit(once.heartbeat(options.name, options.host), render.SERVICES, as_json=options.json)
        return EXIT_OK
    stop = threading.Event()
    stopped_by: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopped_by.append(signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    who = f"{options.name}@{options.host}" if options.host else options.name
    print(f"svcreg: a heartbeat for {who} every {options.every:g} s until stopped", file=sys.stderr, flush=True)
    client: BlockingClient | None = None
    last = None
    try:
        while not stop.is_set():
            try:
                client = client or BlockingClient(settings)
                seen = client.heartbeat(options.name, options.host).state.value
            except (ConnectionFailed, ValidationError, NotFound) as exc:  # retried with the next beat
                seen = f"error: {exc.message}"
                if client is not None:
                    client.close()
                client = None
            if seen != last:
                print(f"{who}: {seen}", flush=True)
                last = seen
            stop.wait(options.every)
    finally:
        if client is not None:
            client.close()
    return EXIT_INTERRUPTED if signal.SIGINT in stopped_by else EXIT_OK


def _networks_and_topology(client: BlockingClient, options: argparse.Namespace) -> dict[str, Any]:
    """``svcreg networks``: the wire's shapes, ``{"networks": [...], "topology": {"revision", "topology"}}``."""
    topology = client.get_topology()
    return {
        "networks": [network.to_dict() for network in client.list_networks()],
        "topology": {"revision": topology.revision, "topology": topology.to_dict()},
    }


def _detect_here(options: argparse.Namespace) -> Topology:
    """This host's topology against ``--networks`` (or the configured, or the repository's networks file)."""
    candidates = [options.networks] if options.networks else [default_config_dir() / "services.yaml", _REPO_NETWORKS]
    path = next((candidate for candidate in candidates if candidate.exists()), None)
    if path is None:
        raise ConfigError(
            f"no networks file: give --networks FILE (looked for {', '.join(map(str, candidates))})", field="--networks"
        )
    return detect_topology(NetworkConfig.from_file(path), netns=options.netns)


def cmd_show(options: argparse.Namespace) -> int:
    """The local commands that compute one answer (``options.answer``) and show it as ``options.view``."""
    render.emit(options.answer(options), options.view, as_json=options.json)
    return EXIT_OK


def _deploy_targets(
    nodes: list[str] | None,
    *,
    host: str | None,
    user: str | None,
    key: str | None,
    port: int,
    install_base: str | None,
    name: str | None,
) -> list[str | dict[str, Any]]:
    """The ``--node`` names, and the target that ``--host`` and its options describe."""
    targets: list[str | dict[str, Any]] = list(nodes or [])
    if host:
        if not user:
            raise ValidationError("--host needs --user (the SSH user on that host)", field="--user")
        optional = {"ssh_key": str(Path(key).absolute()) if key else None, "install_base": install_base, "name": name}
        targets.append({"host": host, "ssh_user": user, "port": port, **{k: v for k, v in optional.items() if v}})
    if not targets:
        raise ValidationError("say where to deploy: --node NAME (repeatable) or --host H --user U", field="--node")
    return targets


def cmd_deploy(options: argparse.Namespace) -> int:
    """Start a deploy job on the registry, follow its progress, exit 1 if any host failed."""
    from rich.console import Console

    targets = _deploy_targets(
        options.node,
        host=options.host,
        user=options.user,
        key=options.key,
        port=options.port,
        install_base=options.install_base,
        name=options.name,
    )
    env = read_env_file(Path(options.env_file)) if options.env_file else {}
    env.update(_parse_pairs(options.env, "--env"))
    with BlockingClient(_connection(options)) as client:
        job = client.deploy_package(options.package, targets=targets, env=env, keep_releases=options.keep_releases)
        try:
            finished = render.follow_job(client, job, console=Console(stderr=True), quiet=options.json)
        except KeyboardInterrupt:
            print(f"svcreg: stopped following job {job['job']}; it goes on on the registry", file=sys.stderr)
            return EXIT_INTERRUPTED
    render.print_deploy_result(finished, as_json=options.json)
    return EXIT_OK if (finished.get("result") or {}).get("ok") else EXIT_ERROR


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


def _one_request(parser: argparse.ArgumentParser, request: _Request, view: render.View) -> None:
    """Make ``parser`` (its own arguments already added) a client command that sends one request."""
    _add_connection_options(parser)
    parser.set_defaults(handler=cmd_request, request=request, view=view)


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
    serve.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="the event loop (default: auto, uvloop where installed, else asyncio's)",
    )
    serve.set_defaults(handler=cmd_serve)

    token = commands.add_parser("token", help="manage tokens").add_subparsers(dest="token_command", required=True)
    create = token.add_parser("create", help="add a token to the config and print it once")
    create.add_argument("--role", required=True, choices=["read", "write", "admin"])
    create.add_argument("--name", required=True)
    create.add_argument(
        "--see-all",
        action="store_true",
        help="the token sees every instance whatever network it connects from (visibility: all; for inventories)",
    )
    create.add_argument("--config")
    create.set_defaults(handler=cmd_token_create)

    services = commands.add_parser("services", help="list and change services").add_subparsers(
        dest="services_command", required=True
    )
    listing = services.add_parser("list", help="list instances")
    _add_filter_options(listing)
    _one_request(listing, lambda client, o: client.list_services(**_filters(o)), render.SERVICES)

    get = services.add_parser("get", help="one instance (running first, then nearest)")
    get.add_argument("name")
    get.add_argument("--host")
    _one_request(get, lambda client, o: client.get_service(o.name, o.host), render.SERVICES)

    register = services.add_parser("register", help="register or update an instance")
    register.add_argument("name", nargs="?")
    register.add_argument("--file", help="a JSON service entry ('-' for stdin) instead of the flags")
    register.add_argument("--host")
    register.add_argument("--ip", help="the instance's address (default: the registry allocates one in --network)")
    register.add_argument(
        "--location",
        choices=[loc.value for loc in Location],
        help="default: from the address (loopback: local; inside a configured network: its type)",
    )
    register.add_argument("--state", default="running", choices=["starting", "running", "stopped", "failed"])
    register.add_argument("--hostname")
    register.add_argument("--network", help="the configured network (default: the one the address is in)")
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
    _one_request(remove, lambda client, o: client.remove_service(o.name, o.host), render.SERVICES)

    heartbeat = services.add_parser("heartbeat", help="tell the registry an instance is alive (restarts its TTL)")
    heartbeat.add_argument("name")
    heartbeat.add_argument("--host")
    heartbeat.add_argument(
        "--every", type=_positive_seconds, metavar="SECONDS", help="keep sending one this often until Ctrl-C"
    )
    _add_connection_options(heartbeat)
    heartbeat.set_defaults(handler=cmd_services_heartbeat)

    set_state = services.add_parser("set-state", help="change an instance's state")
    set_state.add_argument("name")
    set_state.add_argument("state", choices=["starting", "running", "stopped", "failed"])
    set_state.add_argument("--host")
    _one_request(set_state, lambda client, o: client.set_state(o.name, o.state, o.host), render.SERVICES)

    watch = commands.add_parser("watch", help="print events as they happen (resumes after reconnects)")
    watch.add_argument("events", nargs="*", metavar="EVENT", help=f"event types (default all): {', '.join(EventType)}")
    watch.add_argument("--since", type=int, help="start after this revision")
    _add_filter_options(watch)
    _add_connection_options(watch)
    watch.set_defaults(handler=cmd_watch)

    topology = commands.add_parser(
        "topology", help="detect this host's networks now, against a networks file (no server needed)"
    )
    topology.add_argument("--networks", type=Path, help="services.yaml (default: $SVCREG_HOME's, else inventories/)")
    topology.add_argument("--netns", help="detect inside this network namespace (ip netns)")
    topology.add_argument("--json", action="store_true", help="machine-readable output")
    topology.set_defaults(handler=cmd_show, answer=_detect_here, view=render.TOPOLOGY)

    networks = commands.add_parser("networks", help="configured networks and the detected topology")
    _one_request(
        networks,
        _networks_and_topology,
        render.NETWORKS,
    )

    ip = commands.add_parser("ip", help="IP allocation").add_subparsers(dest="ip_command", required=True)
    allocate = ip.add_parser("allocate", help="allocate (or return) OWNER's address in NETWORK")
    allocate.add_argument("owner")
    allocate.add_argument("network", help="a network name, or lan/local/wireguard")
    allocate.add_argument("--ip", help="ask for this address (conflict if someone else holds it)")
    _one_request(allocate, lambda client, o: client.allocate_ip(o.owner, o.network, ip=o.ip), render.ALLOCATIONS)
    release = ip.add_parser("release", help="release OWNER's addresses")
    release.add_argument("owner")
    release.add_argument("--network")
    _one_request(release, lambda client, o: client.release_ip(o.owner, o.network), render.ALLOCATIONS)
    ip_list = ip.add_parser("list", help="list allocations")
    ip_list.add_argument("--network")
    _one_request(ip_list, lambda client, o: client.list_allocations(o.network), render.ALLOCATIONS)

    package = commands.add_parser("package", help="build and inspect service packages").add_subparsers(
        dest="package_command", required=True
    )
    build = package.add_parser("build", help="make NAME-VERSION.tar.gz from a directory holding manifest.yaml")
    build.add_argument("directory", type=Path)
    build.add_argument("-o", "--output", type=Path, help="folder for the package (default: the directory's parent)")
    build.add_argument("--json", action="store_true", help="print JSON")
    build.set_defaults(handler=cmd_show, answer=lambda o: build_package(o.directory, o.output), view=render.PACKAGE)
    inspect = package.add_parser("inspect", help="validate a package and show its manifest")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(handler=cmd_show, answer=lambda o: inspect_package(o.file), view=render.PACKAGE)

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
        handler: Callable[[argparse.Namespace], int] = options.handler
        return handler(options)
    except RegistryError as exc:
        print(f"svcreg: error: {exc.message}", file=sys.stderr)
        return next((code for kinds, code in _EXIT_CODES if isinstance(exc, kinds)), EXIT_ERROR)
    except OSError as exc:
        print(f"svcreg: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
