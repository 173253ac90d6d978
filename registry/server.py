"""WsServer: the registry over a TLS-only WebSocket API. Thin over protocol + Registry.

Built on ``websockets.asyncio.server``. TLS is not optional: the only constructor takes
a :class:`TlsServerConfig`. Every connection authenticates (a bearer token at the
handshake, an ``authenticate`` request as the first message, or a client certificate
signed by the configured client CA). ``GET /healthz``, ``GET /metrics`` and the web UI
(``/ui/``, see :mod:`registry.webui`) are served on the same port.

Writes go to the registry through ``asyncio.to_thread`` (they wait for an fsync);
reads run inline. Each connection has a bounded send queue: a client that does not
read is dropped with a reason, and never slows the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse

from . import webui
from .access import Visibility, visibility_for
from .auth import Role, TokenRegistry
from .config import Limits
from .core import Registry
from .events import Subscription
from .exceptions import (
    Forbidden,
    InternalError,
    RateLimited,
    RegistryError,
    ServiceNotFound,
    SubscriptionClosed,
    SubscriptionLagged,
    Unauthorized,
    UnknownAction,
    ValidationError,
)
from .model import ServiceEntry, ServiceState
from .protocol import (
    ACTIONS,
    Request,
    RequestError,
    decode_request,
    encode_error,
    encode_event,
    encode_job,
    encode_response,
)
from .tls import TlsServerConfig, client_identity

if TYPE_CHECKING:
    from .jobs import DeployJobs, Job
    from .network import NetworkManager

__all__ = ["WsServer"]

log = logging.getLogger(__name__)

_CLOSE_POLICY = 1008
_CLOSE_TRY_AGAIN = 1013
# Requests one connection may have in flight at once (pipelining); more wait for a slot.
_MAX_INFLIGHT = 64


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection is: a token's or certificate's name, and its role."""

    name: str
    role: Role
    method: str  # "token", "certificate"


@dataclass(frozen=True, slots=True)
class _Then:
    """A handler's result plus what to do right after the response is queued."""

    result: Any
    after: Callable[[], None]


class _RegisterBatcher:
    """Coalesces concurrent ``register_service`` requests into one core call and one commit.

    One batch is in flight at a time; requests that arrive meanwhile form the next batch.
    A single request alone is written at once, so nothing waits for company. A bad entry
    fails alone (``Registry.add_or_update_each``).
    """

    MAX_BATCH = 512

    def __init__(self, registry: Registry, spawn: Callable[[Coroutine[Any, Any, Any]], None]) -> None:
        self._registry = registry
        self._spawn = spawn
        self._pending: list[tuple[ServiceEntry, asyncio.Future[ServiceEntry]]] = []
        self._running = False

    async def submit(self, entry: ServiceEntry) -> ServiceEntry:
        future: asyncio.Future[ServiceEntry] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, future))
        if not self._running:
            self._running = True
            self._spawn(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.MAX_BATCH], self._pending[self.MAX_BATCH :]
                try:
                    outcomes = await asyncio.to_thread(self._registry.add_or_update_each, [e for e, _ in batch])
                except Exception as exc:  # the store failed: every writer in the batch hears it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # the requester went away
                        continue
                    if isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._running = False


@dataclass(eq=False)
class _Session:
    connection: ServerConnection
    principal: Principal | None
    visibility: Visibility
    outbox: asyncio.Queue[str]
    subscriptions: dict[str, tuple[Subscription, asyncio.Task[None]]] = field(default_factory=dict)
    watched_jobs: dict[str, Callable[..., None]] = field(default_factory=dict)
    closing: bool = False


class _Metrics:
    """Prometheus metrics of one server (a private registry, so tests can run many)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge("svcreg_connections", "Open WebSocket connections", registry=self.registry)
        self.requests = Counter(
            "svcreg_requests", "Requests by action and result", ["action", "result"], registry=self.registry
        )
        self.events_sent = Counter("svcreg_events_sent", "Event frames queued to subscribers", registry=self.registry)
        self.subscribers = Gauge("svcreg_subscribers", "Open subscriptions", registry=self.registry)
        self.commit_seconds = Histogram(
            "svcreg_store_commit_seconds",
            "Store commit (fsync) latency",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
            registry=self.registry,
        )
        self.registry.register(_RegistryCollector(registry))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RegistryCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Any:
        services = GaugeMetricFamily("svcreg_services", "Registered service instances by state", labels=["state"])
        counts = dict.fromkeys((state.value for state in ServiceState), 0)
        for entry in self._registry.list_services():
            counts[entry.state.value] += 1
        for state, count in counts.items():
            services.add_metric([state], count)
        yield services
        yield GaugeMetricFamily("svcreg_revision", "The registry's current revision", value=self._registry.revision)


class WsServer:
    """The registry's WebSocket front door. Use :meth:`new_tls` to start one.

    Args:
        registry: the registry to serve.
        tls_config: certificates (required; there is no plaintext mode).
        tokens: the bearer tokens and their roles.
        networks: the network manager (topology, IP allocation); optional.
        limits: message size, connections, subscriptions, queues, timeouts.
        registry_host: this host's id, for location-aware discovery of ``local``
            instances (default: the hostname).
        topology_interval: with ``networks``, detect the host's topology when the server
            starts and then every this many seconds; a change is recorded with
            ``registry.update_topology`` (one ``NetworkTopologyChanged`` event). None: never.
        deploys: deploy jobs (``deploy_package``, ``watch_job``, ...); None: deployment is off
            and ``deploy_package`` answers ``bad_request``.
        allowed_origins: browser origins, besides the server's own, that may open the
            WebSocket (``https://ops.example``); the web UI is served at ``/ui/``.
    """

    def __init__(
        self,
        registry: Registry,
        tls_config: TlsServerConfig,
        *,
        tokens: TokenRegistry,
        networks: NetworkManager | None = None,
        limits: Limits | None = None,
        registry_host: str | None = None,
        topology_interval: float | None = None,
        deploys: DeployJobs | None = None,
        allowed_origins: Iterable[str] = (),
    ) -> None:
        if topology_interval is not None and not topology_interval > 0:
            raise ValidationError(
                f"topology_interval {topology_interval!r} must be a positive number of seconds",
                field="topology_interval",
            )
        self.registry = registry
        self.tls_config = tls_config
        self.tokens = tokens
        self.networks = networks
        self.limits = limits or Limits()
        self.registry_host = registry_host or socket.gethostname()
        self.topology_interval = topology_interval
        self.deploys = deploys
        self.allowed_origins = webui.normalize_origins(allowed_origins)
        self._topology_task: asyncio.Task[None] | None = None
        self._topology_failure: str | None = None  # the last detection failure, until one succeeds
        self.metrics = _Metrics(registry)
        self._server: Server | None = None
        self._sessions: set[_Session] = set()
        self._principals: dict[ServerConnection, Principal] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self._registrations = _RegisterBatcher(registry, self._spawn)
        self._handlers: dict[str, Callable[[_Session, Request], Awaitable[Any]]] = {
            "ping": self._ping,
            "authenticate": self._authenticate,
            "list_services": self._list_services,
            "get_service": self._get_service,
            "list_endpoints": self._list_endpoints,
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "list_networks": self._list_networks,
            "get_topology": self._get_topology,
            "list_allocations": self._list_allocations,
            "register_service": self._register_service,
            "remove_service": self._remove_service,
            "set_state": self._set_state,
            "heartbeat": self._heartbeat,
            "allocate_ip": self._allocate_ip,
            "release_ip": self._release_ip,
            "deploy_package": self._deploy_package,
            "watch_job": self._watch_job,
            "get_job": self._get_job,
            "list_jobs": self._list_jobs,
        }
        assert set(self._handlers) == set(ACTIONS), "every protocol action needs a handler"
        registry.store.commit_observer = self.metrics.commit_seconds.observe

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def new_tls(
        cls, addr: str | tuple[str, int], registry: Registry, tls_config: TlsServerConfig, **options: Any
    ) -> WsServer:
        """Start serving on ``addr`` (``"host:port"`` or ``(host, port)``; port 0 picks one)."""
        server = cls(registry, tls_config, **options)
        await server.start(addr)
        return server

    async def start(self, addr: str | tuple[str, int]) -> None:
        """Listen on ``addr``; with a ``topology_interval``, detect the topology first, then periodically."""
        host, port = _split_address(addr)
        limits = self.limits
        watch_topology = self.networks is not None and self.topology_interval is not None
        if watch_topology:
            await self.refresh_topology()
        self._server = await serve(
            self._handle,
            host,
            port,
            ssl=self.tls_config.ssl_context(),
            process_request=self._process_request,
            max_size=limits.max_message_size,
            open_timeout=limits.handshake_timeout,
            ping_interval=limits.ping_interval,
            ping_timeout=limits.ping_timeout,
            server_header="svcreg",
            # No permessage-deflate: registry frames are small JSON, and a deflate context
            # per connection costs ~200 KiB of memory and a compression pass per subscriber
            # for every event fanned out.
            compression=None,
        )
        log.info("serving on %s", ", ".join(_format_sockname(s.getsockname()) for s in self._server.sockets))
        if watch_topology:
            self._topology_task = asyncio.create_task(self._watch_topology())

    @property
    def port(self) -> int:
        assert self._server is not None, "the server is not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        assert self._server is not None, "the server is not started"
        return _format_sockname(self._server.sockets[0].getsockname())

    async def serve_forever(self) -> None:
        assert self._server is not None, "the server is not started"
        await self._server.serve_forever()

    async def close(self, *, timeout: float = 10.0) -> None:
        """Stop accepting, close connections with 1001, wait for handlers (bounded)."""
        if self._topology_task is not None:
            self._topology_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._topology_task
            self._topology_task = None
        if self._server is None:
            return
        self._server.close(close_connections=True)
        try:
            await asyncio.wait_for(self._server.wait_closed(), timeout)
        except TimeoutError:
            log.warning("connections did not close within %.0f s; closing anyway", timeout)
        for session in list(self._sessions):
            self._drop_subscriptions(session)

    async def refresh_topology(self) -> bool:
        """Detect the host's topology now and record it; True if it changed.

        Never raises: a failed detection (no ``ip`` command, a timeout...) is logged as a
        warning and the last recorded topology stays.
        """
        if self.networks is None:
            return False
        try:
            topology = await asyncio.to_thread(self.networks.detect)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # detection must never take the server down
            reason = exc.message if isinstance(exc, RegistryError) else f"{type(exc).__name__}: {exc}"
            # Once per distinct failure, not every interval: a host without `ip` would fill the log.
            level = logging.DEBUG if reason == self._topology_failure else logging.WARNING
            log.log(level, "topology detection failed (keeping the last topology): %s", reason)
            self._topology_failure = reason
            return False
        if self._topology_failure is not None:
            log.warning("topology detection works again")
            self._topology_failure = None
        try:
            event = await asyncio.to_thread(self.registry.update_topology, topology.to_dict())
        except RegistryError as exc:  # e.g. the store failed: the next interval tries again
            log.warning("cannot record the topology: %s", exc.message)
            return False
        if event is not None:
            log.info("network topology changed (revision %d)", event.revision)
        return event is not None

    async def _watch_topology(self) -> None:
        assert self.topology_interval is not None
        while True:
            await asyncio.sleep(self.topology_interval)
            await self.refresh_topology()

    async def __aenter__(self) -> WsServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- the opening handshake --------------------------------------------------------------

    async def _process_request(self, connection: ServerConnection, request: HttpRequest) -> HttpResponse | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            healthy = self.registry.store.healthy() and not self.registry.closed
            return connection.respond(200 if healthy else 503, "ok\n" if healthy else "not ok\n")
        if path == "/metrics":
            return self._http(connection, 200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        ui_response = webui.process_request(request, allowed_origins=self.allowed_origins)
        if ui_response is not None:
            return ui_response
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return connection.respond(404, "not found: the API is a WebSocket at /; see /healthz and /metrics\n")
        if len(self._sessions) >= self.limits.max_connections:
            return connection.respond(503, "too many connections\n")
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return connection.respond(401, "unauthorized: use 'Authorization: Bearer <token>'\n")
            try:
                entry = self.tokens.authenticate(token.strip())
            except Unauthorized:
                return connection.respond(401, "unauthorized: invalid token\n")
            self._principals[connection] = Principal(entry.name, entry.role, "token")
            return None
        name = client_identity(connection.transport.get_extra_info("peercert"))
        if name is not None:
            role = next((entry.role for entry in self.tokens.entries if entry.name == name), Role.READ)
            self._principals[connection] = Principal(name, role, "certificate")
        return None

    @staticmethod
    def _http(connection: ServerConnection, status: int, body: bytes, content_type: str) -> HttpResponse:
        response = connection.respond(status, "")
        headers = Headers(response.headers)
        headers["Content-Type"] = content_type
        headers["Content-Length"] = str(len(body))
        return HttpResponse(response.status_code, response.reason_phrase, headers, body)

    # --- a connection -------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        principal = self._principals.pop(connection, None)
        session = _Session(
            connection,
            principal,
            self._visibility(connection, principal),
            asyncio.Queue(maxsize=self.limits.send_queue),
        )
        self._sessions.add(session)
        self.metrics.connections.inc()
        writer = asyncio.create_task(self._write(session))
        inflight = asyncio.Semaphore(_MAX_INFLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        deadline = (
            None
            if principal
            else asyncio.get_running_loop().call_later(
                self.limits.handshake_timeout, self._expire_unauthenticated, session
            )
        )
        try:
            async for frame in connection:
                await inflight.acquire()
                task = asyncio.create_task(self._serve_frame(session, frame))
                tasks.add(task)
                task.add_done_callback(lambda done: (tasks.discard(done), inflight.release()))
        except ConnectionClosed:
            pass
        finally:
            if deadline is not None:
                deadline.cancel()
            session.closing = True
            for task in tasks:
                task.cancel()
            self._drop_subscriptions(session)
            self._drop_job_watches(session)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self._sessions.discard(session)
            self.metrics.connections.dec()

    def _expire_unauthenticated(self, session: _Session) -> None:
        if session.principal is None and not session.closing:
            self._spawn(session.connection.close(_CLOSE_POLICY, "not authenticated in time"))

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run a fire-and-forget task, keeping a reference so it is not garbage-collected."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _visibility(self, connection: ServerConnection, principal: Principal | None) -> Visibility:
        if principal is None:
            return Visibility(everything=False)
        remote = connection.remote_address
        return visibility_for(
            remote[0] if remote else None,
            principal.role,
            self.networks.config if self.networks is not None else None,
            registry_host=self.registry_host,
            hosts_with_address=self.registry.hosts_at,
        )

    async def _write(self, session: _Session) -> None:
        try:
            while True:
                frame = await session.outbox.get()
                await session.connection.send(frame)
        except ConnectionClosed:
            pass

    def _send(self, session: _Session, frame: str) -> None:
        """Queue a frame; a full queue means the client does not read: drop it."""
        if session.closing:
            return
        try:
            session.outbox.put_nowait(frame)
        except asyncio.QueueFull:
            session.closing = True
            log.warning("dropping a slow client %s: its send queue is full", _peer(session.connection))
            self._spawn(
                session.connection.close(_CLOSE_TRY_AGAIN, f"slow reader: {self.limits.send_queue} frames unsent")
            )

    async def _serve_frame(self, session: _Session, frame: str | bytes) -> None:
        request_id: str | None = None
        action = "invalid"
        try:
            request = decode_request(frame)
            request_id, action = request.id, request.action
            self._authorize(session, request)
            result = await self._handlers[request.action](session, request)
            if isinstance(result, _Then):
                self._send(session, encode_response(request.id, result.result))
                result.after()
            else:
                self._send(session, encode_response(request.id, result))
            self.metrics.requests.labels(action, "ok").inc()
        except RequestError as exc:
            self._reply_error(session, exc.request_id, exc, action)
        except UnknownAction as exc:
            self._reply_error(session, exc.details.pop("id", request_id), exc, action)
        except RegistryError as exc:
            self._reply_error(session, request_id, exc, action)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("internal error serving %s for %s", action, _peer(session.connection))
            self._reply_error(session, request_id, InternalError("internal error; see the server log"), action)

    def _reply_error(self, session: _Session, request_id: str | None, error: RegistryError, action: str) -> None:
        self._send(session, encode_error(request_id, error))
        self.metrics.requests.labels(action if action in ACTIONS else "invalid", error.code).inc()

    def _authorize(self, session: _Session, request: Request) -> None:
        needed = request.spec.role
        if needed is None:
            return
        if session.principal is None:
            raise Unauthorized(
                f"{request.action} needs authentication: send a bearer token at the handshake, "
                "an 'authenticate' request first, or a client certificate"
            )
        if session.principal.role < needed:
            raise Forbidden(
                f"{request.action} needs the {needed.label} role; {session.principal.name!r} has "
                f"{session.principal.role.label}",
                details={"needed": needed.label, "role": session.principal.role.label},
            )

    # --- actions ----------------------------------------------------------------------------

    async def _ping(self, session: _Session, request: Request) -> Any:
        return {"pong": True, "revision": self.registry.revision, "time": time.time()}

    async def _authenticate(self, session: _Session, request: Request) -> Any:
        entry = self.tokens.authenticate(request.params["token"])
        session.principal = Principal(entry.name, entry.role, "token")
        session.visibility = self._visibility(session.connection, session.principal)
        return {"name": entry.name, "role": entry.role.label}

    def _visible(self, session: _Session, entries: list[ServiceEntry]) -> list[ServiceEntry]:
        return session.visibility.filter(entries)

    async def _list_services(self, session: _Session, request: Request) -> Any:
        return self._visible(session, self.registry.list_services(**request.params))

    async def _get_service(self, session: _Session, request: Request) -> Any:
        name = request.params["service_name"]
        host_id = request.params.get("host_id")
        candidates = self._visible(session, self.registry.list_services(service_name=name, host_id=host_id))
        if not candidates:
            # Invisible instances are reported exactly like missing ones: no existence leak.
            where = "" if host_id is None else f" on host {host_id!r}"
            raise ServiceNotFound(f"service {name!r} is not registered{where}", details={"service_name": name})
        if host_id is not None:
            return candidates[0]
        return min(candidates, key=lambda entry: (entry.state is not ServiceState.RUNNING, entry.location.distance))

    async def _list_endpoints(self, session: _Session, request: Request) -> Any:
        visible = {entry.key for entry in self._visible(session, self.registry.list_services(**request.params))}
        return [
            record
            for record in self.registry.list_endpoints(**request.params)
            if (record.service_name, record.host_id) in visible
        ]

    async def _subscribe(self, session: _Session, request: Request) -> Any:
        if len(session.subscriptions) >= self.limits.max_subscriptions_per_connection:
            raise RateLimited(
                f"too many subscriptions on this connection (limit {self.limits.max_subscriptions_per_connection})"
            )
        params = request.params
        subscription = self.registry.subscribe(
            params.get("events"),
            since_revision=params.get("since_revision"),
            filter=params.get("filter"),
            maxsize=self.limits.send_queue,
        )

        def start_forwarding() -> None:
            task = asyncio.create_task(self._forward(session, subscription))
            session.subscriptions[subscription.id] = (subscription, task)
            self.metrics.subscribers.inc()

        # The response must reach the client before the first event of the subscription.
        return _Then({"subscription": subscription.id, "revision": subscription.last_revision}, start_forwarding)

    async def _forward(self, session: _Session, subscription: Subscription) -> None:
        visibility = session.visibility
        try:
            while not session.closing:
                event = await subscription.next_event()
                service = event.service
                if service is not None and not visibility.allows(service):
                    continue
                self._send(session, encode_event(subscription.id, event))
                self.metrics.events_sent.inc()
        except SubscriptionLagged as exc:
            exc.details["subscription"] = subscription.id
            self._send(session, encode_error(None, exc))
        except SubscriptionClosed:
            pass
        finally:
            if session.subscriptions.pop(subscription.id, None) is not None:
                self.metrics.subscribers.dec()

    async def _unsubscribe(self, session: _Session, request: Request) -> Any:
        subscription_id = request.params["subscription"]
        found = session.subscriptions.pop(subscription_id, None)
        if found is None:
            raise SubscriptionClosed(
                f"no subscription {subscription_id!r} on this connection", details={"subscription": subscription_id}
            )
        subscription, task = found
        subscription.close()
        task.cancel()
        self.metrics.subscribers.dec()
        return {"unsubscribed": subscription_id}

    def _drop_subscriptions(self, session: _Session) -> None:
        for subscription, task in list(session.subscriptions.values()):
            subscription.close("the connection closed")
            task.cancel()
        if session.subscriptions:
            self.metrics.subscribers.dec(len(session.subscriptions))
            session.subscriptions.clear()

    def _require_networks(self) -> NetworkManager:
        if self.networks is None:
            raise ValidationError("this registry has no networks configured (start it with a networks file)")
        return self.networks

    async def _list_networks(self, session: _Session, request: Request) -> Any:
        if self.networks is None:
            return []
        return [network.to_dict() for network in self.networks.config.networks.values()]

    async def _get_topology(self, session: _Session, request: Request) -> Any:
        return {"revision": self.registry.revision, "topology": self.registry.topology()}

    async def _list_allocations(self, session: _Session, request: Request) -> Any:
        return self._require_networks().allocations(request.params.get("network"))

    async def _register_service(self, session: _Session, request: Request) -> Any:
        entry = ServiceEntry.from_dict(request.params["service"])
        return await self._registrations.submit(entry)

    async def _remove_service(self, session: _Session, request: Request) -> Any:
        params = request.params
        return await asyncio.to_thread(self.registry.remove, params["service_name"], params.get("host_id"))

    async def _set_state(self, session: _Session, request: Request) -> Any:
        params = request.params
        return await asyncio.to_thread(
            self.registry.set_state, params["service_name"], params["state"], params.get("host_id")
        )

    async def _heartbeat(self, session: _Session, request: Request) -> Any:
        params = request.params
        return await asyncio.to_thread(self.registry.heartbeat, params["service_name"], params.get("host_id"))

    async def _allocate_ip(self, session: _Session, request: Request) -> Any:
        manager = self._require_networks()
        return await asyncio.to_thread(manager.allocate_ip, request.params["owner"], request.params["network"])

    async def _release_ip(self, session: _Session, request: Request) -> Any:
        manager = self._require_networks()
        return await asyncio.to_thread(manager.release_ip, request.params["owner"], request.params.get("network"))

    # --- deploy jobs -------------------------------------------------------------------------

    def _require_deploys(self) -> DeployJobs:
        if self.deploys is None:
            raise ValidationError("this registry does not deploy packages (started without a deploy configuration)")
        return self.deploys

    def _job_listener(self, session: _Session) -> Callable[..., None]:
        def forward(job: Job, kind: str, data: dict[str, Any]) -> None:
            self._send(session, encode_job(job.id, kind, data))
            if kind == "finished":
                session.watched_jobs.pop(job.id, None)

        return forward

    def _watch(self, session: _Session, job: Job) -> None:
        if job.id not in session.watched_jobs and not job.done:
            listener = self._job_listener(session)
            session.watched_jobs[job.id] = listener
            job.listeners.add(listener)

    def _drop_job_watches(self, session: _Session) -> None:
        for job_id, listener in session.watched_jobs.items():
            with contextlib.suppress(RegistryError):
                self._require_deploys().get(job_id).listeners.discard(listener)
        session.watched_jobs.clear()

    async def _deploy_package(self, session: _Session, request: Request) -> Any:
        deploys = self._require_deploys()
        job = await deploys.start(request.params)
        principal = session.principal.name if session.principal else "?"
        log.info("deploy job %s: %s by %s", job.id, job.package, principal)
        # The caller watches its job from the start: the response goes first, then progress.
        return _Then(job.summary(), lambda: self._watch(session, job))

    async def _watch_job(self, session: _Session, request: Request) -> Any:
        job = self._require_deploys().get(request.params["job"])
        summary = dict(job.summary(), events=list(job.events))
        return _Then(summary, lambda: self._watch(session, job))

    async def _get_job(self, session: _Session, request: Request) -> Any:
        job = self._require_deploys().get(request.params["job"])
        return dict(job.summary(), events=list(job.events))

    async def _list_jobs(self, session: _Session, request: Request) -> Any:
        return self.deploys.list() if self.deploys is not None else []


def _split_address(addr: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(addr, tuple):
        return addr
    host, separator, port = addr.rpartition(":")
    if not separator or not port.isdigit():
        raise ValidationError(f"listen address {addr!r} is not host:port", field="listen")
    return host.strip("[]"), int(port)


def _format_sockname(sockname: tuple[Any, ...]) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer(connection: ServerConnection) -> str:
    remote = connection.remote_address
    return _format_sockname(remote) if remote else "unknown peer"
