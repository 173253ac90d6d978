"""The running registry, built from a :class:`~registry.config.ServerConfig` in one place.

store -> :class:`~registry.core.Registry` -> :class:`~registry.network.NetworkManager` (with a
networks file) -> :class:`~registry.jobs.DeployJobs` -> :class:`~registry.server.WsServer`.
``svcreg serve`` and the tests use it::

    await RegistryApp(config).serve()    # until SIGTERM or SIGINT

or, to control it (tests)::

    async with RegistryApp(config) as app:      # start(); stop() on the way out, whatever happens
        ...

Shutdown is graceful: connections are closed with 1001 (bounded by ``shutdown_timeout``),
deploy jobs are cancelled, and the store is committed and closed.

``SIGHUP`` reloads (:meth:`RegistryApp.reload`, ``systemctl reload svcreg``): ``svcreg.yaml``'s
tokens and limits and the networks file are read again; a reload that fails validation keeps
the running configuration, logs the error (file and field) and counts it in ``/metrics``.

:func:`run_demo` is ``svcreg demo``: the library on the embedded store, without a server.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final

from . import __version__
from .config import DeployConfig, ServerConfig
from .core import Registry
from .exceptions import ConfigError, RegistryError
from .model import Endpoint, Location, NetworkInfo, ServiceEntry
from .network import NetworkConfig, detect_topology

if TYPE_CHECKING:
    from .events import Event
    from .jobs import DeployJobs
    from .server import WsServer

__all__ = ["RegistryApp", "deploy_jobs", "run_demo", "shrink_tls_read_buffers"]

log = logging.getLogger(__name__)

# svcreg.yaml settings a reload cannot change in a running server.
_READ_AT_START: Final = (
    "listen",
    "db",
    "synchronous",
    "event_retention",
    "tls",
    "client_default_role",
    "deploy",
    "allowed_origins",
)

_TLS_READ_BUFFER: Final = 32 * 1024


def shrink_tls_read_buffers() -> None:
    """asyncio gives every TLS connection a zero-filled 256 KiB read buffer (``SSLProtocol.max_size``):
    with a thousand idle subscribers that is most of the server's memory. Registry frames are
    small; 32 KiB chunks read large ones just as well. Process-wide, so only ``svcreg serve``
    calls it, not :class:`RegistryApp` (an embedding process may want its own buffers)."""
    protocol = getattr(asyncio.sslproto, "SSLProtocol", None)
    if protocol is not None and getattr(protocol, "max_size", 0) > _TLS_READ_BUFFER:
        protocol.max_size = _TLS_READ_BUFFER


def deploy_jobs(settings: DeployConfig, registry: Registry, networks: NetworkConfig | None) -> DeployJobs:
    """The deploy jobs of a server: a :class:`PackageDeployer` over ``settings``; creates its folders (0700)."""
    # Imported here, like the server below: the CLI imports this module for every command, only `serve` needs them.
    from .deploy import PackageDeployer
    from .jobs import DeployJobs
    from .package import Limits as PackageLimits

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


class RegistryApp:
    """A registry server assembled from ``config``; :meth:`start` it, then :meth:`stop` it (or use ``async with``).

    Args:
        config: the validated ``svcreg.yaml``.
        config_path: the file ``config`` was read from, read again by :meth:`reload`
            (None: a reload re-reads only the networks file).
        topology_interval: re-detect the network topology this often (seconds); None: never.
        shutdown_timeout: how long :meth:`stop` waits for connections to close.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        config_path: str | Path | None = None,
        topology_interval: float | None = 30.0,
        shutdown_timeout: float = 3.0,
    ) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self._reloading: asyncio.Task[bool] | None = None
        self.topology_interval = topology_interval
        self.shutdown_timeout = shutdown_timeout
        self.registry: Registry | None = None
        self.deploys: DeployJobs | None = None
        self.server: WsServer | None = None
        self._shutdown = asyncio.Event()

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (after :meth:`start`)."""
        assert self.server is not None, "the app is not started"
        return self.server.address

    async def start(self) -> None:
        """Check the TLS files, open the store, start the reaper, deploy jobs and the server.

        On any failure, what was started is stopped again before the error propagates.

        Raises:
            ConfigError: a bad TLS file or networks file.
            StoreError: the store cannot be opened.
            OSError: the address cannot be listened on.
        """
        from .server import WsServer
        from .tls import TlsServerConfig

        config = self.config
        # The files are checked before the store is opened, so a bad certificate leaves nothing behind.
        tls = TlsServerConfig.from_files(config.tls.cert, config.tls.key, client_ca=config.tls.client_ca)
        networks = NetworkConfig.from_file(config.networks) if config.networks else None
        self.registry = await asyncio.to_thread(
            Registry.with_persistence,
            config.db,
            synchronous=config.synchronous,
            networks=networks,
            event_retention=config.event_retention,
        )
        try:
            self.deploys = deploy_jobs(config.deploy or DeployConfig.default(config.db.parent), self.registry, networks)
            self.registry.start_reaper()
            self.server = await WsServer.new_tls(
                config.listen,
                self.registry,
                tls,
                tokens=config.tokens,
                limits=config.limits,
                topology_interval=self.topology_interval,
                deploys=self.deploys,
                allowed_origins=config.allowed_origins,
                client_default_role=config.client_default_role,
            )
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close connections (1001, bounded by ``shutdown_timeout``), cancel deploy jobs, commit and close the store.

        Safe to call more than once, and after a failed :meth:`start`.
        """
        server, deploys, registry = self.server, self.deploys, self.registry
        self.server = self.deploys = None
        try:
            if server is not None:
                await server.close(timeout=self.shutdown_timeout)
        finally:
            try:
                if deploys is not None:
                    await deploys.close()
            finally:
                if registry is not None and not registry.closed:
                    await asyncio.to_thread(registry.close)

    async def reload(self) -> bool:
        """Read ``svcreg.yaml`` (tokens, limits) and the networks file again and use them: True if
        the new configuration is in use, False if it failed validation (the running one stays, the
        error is logged with the file and the field and counted in ``svcreg_config_reloads``).

        A new token works for the next connection, a removed one no longer lets anyone sign in;
        connections already signed in are kept. A changed networks file emits
        ``NetworkTopologyChanged``. The listen address, the store, TLS files and deploy settings
        are read at start only: a change to them is logged as needing a restart.
        """
        server, registry = self.server, self.registry
        if server is None or registry is None:
            raise RuntimeError("the app is not started")
        try:
            config = (
                await asyncio.to_thread(ServerConfig.from_file, self.config_path) if self.config_path else self.config
            )
            networks = await asyncio.to_thread(NetworkConfig.from_file, config.networks) if config.networks else None
            tokens = config.tokens
        except ConfigError as exc:
            server.metrics.reloads.labels("failed").inc()
            log.error("reload failed, the running configuration stays: %s", exc.message)
            return False
        restart = server.reconfigure(tokens=tokens, limits=config.limits)
        restart += [key for key in _READ_AT_START if getattr(config, key) != getattr(self.config, key)]
        try:
            event = await asyncio.to_thread(registry.reload_networks, networks)
        except RegistryError as exc:  # the store refused the event: tokens and limits are in use, networks not
            server.metrics.reloads.labels("failed").inc()
            log.error("reload: tokens and limits are in use, the networks file is not: %s", exc.message)
            return False
        if self.deploys is not None:  # deploy targets name nodes of the networks file
            self.deploys.networks = self.deploys.deployer.networks = networks
        self.config = config
        server.metrics.reloads.labels("ok").inc()
        if event is not None:
            log.info("networks reloaded (revision %d): %s", event.revision, event.data["networks"])
        if restart:
            log.warning("reloaded; these settings changed and need a restart: %s", ", ".join(restart))
        else:
            log.info("reloaded: %d tokens, limits and networks in use", len(tokens.entries))
        return True

    def request_reload(self) -> None:
        """Reload in the background (what ``SIGHUP`` does); reloads do not overlap."""
        if self.server is None or (self._reloading is not None and not self._reloading.done()):
            return
        self._reloading = asyncio.get_running_loop().create_task(self.reload())

    def request_shutdown(self) -> None:
        """Make :meth:`wait_for_shutdown` return: what the signal handlers do."""
        self._shutdown.set()

    def handle_signals(self, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Let ``signals`` request a shutdown, and ``SIGHUP`` a :meth:`reload`; the shutdown handlers
        only set a flag, the caller stops the app.

        Call it before :meth:`start`: a signal during startup then stops the app as soon as it runs.
        """
        loop = asyncio.get_running_loop()
        for signum in signals:
            loop.add_signal_handler(signum, self.request_shutdown)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    async def wait_for_shutdown(self) -> None:
        """Until a handled signal arrives or :meth:`request_shutdown` is called."""
        await self._shutdown.wait()

    async def serve(
        self,
        *,
        started: Callable[[RegistryApp], None] | None = None,
        stopping: Callable[[RegistryApp], None] | None = None,
    ) -> None:
        """Start, serve until SIGTERM or SIGINT (or :meth:`request_shutdown`), then stop gracefully.

        ``started`` is called once the server listens, ``stopping`` when the shutdown begins.
        """
        self.handle_signals()
        async with self:
            if started is not None:
                started(self)
            await self.wait_for_shutdown()
            if stopping is not None:
                stopping(self)

    async def __aenter__(self) -> RegistryApp:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.stop()


# --- the demo: the library on its own, in this process, no server -------------------------------------


def run_demo(
    db: Path,
    *,
    networks: Path | None,
    duration: float | None,
    say: Callable[[str], None],
    on_event: Callable[[Event], None],
) -> None:
    """Open the embedded store at ``db``, register a demo instance and heartbeat it until SIGINT or
    SIGTERM (or for ``duration`` seconds), then mark it stopped. ``on_event`` sees every event
    (from a thread); ``say`` gets the progress lines."""
    network_config = NetworkConfig.from_file(networks) if networks else None
    registry = Registry.with_persistence(db, networks=network_config)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        say(f"svcreg {__version__}: store {db} at revision {registry.revision}, {len(registry)} services")
        events = registry.subscribe(since_revision=registry.revision)

        def show_events() -> None:
            for event in events:
                on_event(event)

        threading.Thread(target=show_events, daemon=True).start()
        registry.start_reaper(interval=0.5)
        if network_config is not None:
            registry.update_topology(detect_topology(network_config).to_dict())
            lan = network_config.by_location(Location.LAN)
            if lan:
                allocation = registry.allocate_ip("svcreg-demo", lan[0].name)
                say(f"allocated {allocation.ip}/{allocation.prefixlen} in {allocation.network} for svcreg-demo")
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
        say(
            f"registered svcreg-demo on {host}; heartbeats every 2 s, "
            + (f"stopping after {duration:g} s" if duration is not None else "press Ctrl-C to stop")
        )
        while not stop.wait(min(2.0, duration or 2.0)):
            registry.heartbeat("svcreg-demo", host)
            if duration is not None:
                break
        registry.set_state("svcreg-demo", "stopped", host)
    finally:
        registry.close()
