"""WsServer: the registry over a TLS-only WebSocket API. Thin over protocol + Registry.

Built on ``websockets.asyncio.server``. TLS is not optional: the only constructor takes
a :class:`TlsServerConfig`. Every connection authenticates (a bearer token at the
handshake, an ``authenticate`` request as the first message, or a client certificate
signed by the configured client CA). ``GET /healthz``, ``GET /metrics`` and the web UI
(``/ui/``, see :mod:`registry.webui`) are served on the same port.

This module is the transport: handshake, sessions, send queues, authorization and
dispatch. The actions themselves are in :mod:`registry.handlers`, the metrics in
:mod:`registry.metrics`. Writes go to the registry through ``asyncio.to_thread`` (they
wait for an fsync); reads run inline, and large answers are encoded off the event loop.

No client can exhaust or lock out the server (docs/protocol.md#limits): a connection's
unsent output is bounded in bytes by backpressure (:mod:`registry.flow`: above
``limits.send_buffer_bytes`` the server stops reading its requests and holds its events,
and it has one large answer in the making at a time); a subscriber that does not read is
dropped with a reason and never slows the others; connections that have not authenticated
have their own small budget (``limits.max_pending``, per address
``limits.max_pending_per_address``), so they never keep an authenticated client out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import weakref
from collections.abc import Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse

from . import webui
from .access import Visibility, visibility_for
from .auth import Role, TokenRegistry
from .config import Limits
from .core import Registry
from .exceptions import (
    Forbidden,
    InternalError,
    RegistryError,
    TooLarge,
    Unauthorized,
    UnknownAction,
    ValidationError,
)
from .flow import Outbox
from .handlers import Handlers, Principal, Session, Then
from .metrics import ServerMetrics
from .network.topology import detect_topology
from .protocol import ACTIONS, Request, RequestError, decode_request, encode_error, encode_response
from .tls import TlsServerConfig, client_identity

if TYPE_CHECKING:
    from .jobs import DeployJobs
    from .network import NetworkManager

__all__ = ["WsServer"]

log = logging.getLogger(__name__)

_CLOSE_POLICY = 1008
_CLOSE_TRY_AGAIN = 1013
_CLOSE_TOO_LARGE = 1009
# Requests one connection may have in flight at once (pipelining); more wait for a slot.
_MAX_INFLIGHT = 64
# Frames the WebSocket library buffers for one connection before it stops reading the socket.
_MAX_QUEUED_FRAMES = 8
# How long a closing connection may take to say goodbye before its socket is cut.
_CLOSE_TIMEOUT = 2.0
# The actions whose answer can be large (a whole list): built one at a time per connection,
# encoded off the event loop.
_BULK_ACTIONS = frozenset(
    {"list_services", "list_endpoints", "list_allocations", "list_networks", "list_jobs", "get_topology"}
)


class WsServer:
    """The registry's WebSocket front door. Use :meth:`new_tls` to start one.

    Args:
        registry: the registry to serve.
        tls_config: certificates (required; there is no plaintext mode).
        tokens: the bearer tokens and their roles.
        networks: a :class:`NetworkManager` over ``registry`` whose ``detect`` finds the
            topology (default: :func:`detect_topology` of the registry's networks). Networks
            and addresses are the registry's own (``Registry(networks=...)``), reloaded with it.
        limits: message size, connections, subscriptions, queues, timeouts.
        registry_host: this host's id, for location-aware discovery of ``local``
            instances (default: the hostname).
        topology_interval: with networks, detect the host's topology when the server
            starts and then every this many seconds; a change is recorded with
            ``registry.update_topology`` (one ``NetworkTopologyChanged`` event). None: never.
        deploys: deploy jobs (``deploy_package``, ``watch_job``, ...); None: deployment is off
            and ``deploy_package`` answers ``bad_request``.
        allowed_origins: browser origins, besides the server's own, that may open the
            WebSocket (``https://ops.example``); the web UI is served at ``/ui/``.
        client_default_role: the role of a client certificate whose common name names no
            token entry (``tls.client_default_role``); None: such a certificate signs in
            nobody, and the connection must authenticate like one without a certificate.
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
        client_default_role: Role | None = None,
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
        self.client_default_role = client_default_role
        self._topology_task: asyncio.Task[None] | None = None
        self._started_limits: Limits | None = None  # what serve() was given
        self._topology_failure: str | None = None  # the last detection failure, until one succeeds
        self.metrics = ServerMetrics(registry)
        self._server: Server | None = None
        self._sessions: set[Session] = set()
        # Handshakes accepted by _process_request and not yet served by _handle, with who they are
        # (None: not authenticated yet). Weak: a handshake that fails after the check leaves nothing.
        self._handshakes: weakref.WeakKeyDictionary[ServerConnection, Principal | None] = weakref.WeakKeyDictionary()
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="svcreg-encode")
        self._background: set[asyncio.Future[Any]] = set()
        self._handlers = Handlers(
            registry,
            tokens=tokens,
            deploys=deploys,
            limits=self.limits,
            metrics=self.metrics,
            send=self._send,
            drop=self._drop,
            spawn=self._spawn,
            visibility=self._visibility,
        )
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
        limits = self._started_limits = self.limits
        watch_topology = self.topology_interval is not None
        if watch_topology:
            await self.refresh_topology()
        self._server = await serve(
            self._handle,
            host,
            port,
            ssl=self.tls_config.ssl_context(),
            process_request=self._process_request,
            max_size=2 * limits.max_message_size,  # up to here a frame gets a too_large answer before 1009
            open_timeout=limits.handshake_timeout,
            ping_interval=limits.ping_interval,
            ping_timeout=limits.ping_timeout,
            close_timeout=_CLOSE_TIMEOUT,
            max_queue=_MAX_QUEUED_FRAMES,
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
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def address(self) -> str:
        assert self._server is not None, "the server is not started"
        return _format_sockname(self._server.sockets[0].getsockname())

    async def serve_forever(self) -> None:
        assert self._server is not None, "the server is not started"
        await self._server.serve_forever()

    async def close(self, *, timeout: float = 10.0) -> None:
        """Stop accepting, close connections with 1001, wait for handlers (bounded by ``timeout``).

        A connection still open after ``timeout`` (a peer that does not read its close frame) is cut.
        """
        if self._topology_task is not None:
            self._topology_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._topology_task
            self._topology_task = None
        if self._server is None:
            return
        self._server.close(close_connections=True)
        try:
            await asyncio.wait_for(asyncio.shield(self._server.wait_closed()), timeout)
        except TimeoutError:
            log.warning("connections did not close within %.0f s; cutting them", timeout)
            for session in list(self._sessions):
                session.connection.transport.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        for session in list(self._sessions):
            self._handlers.close_session(session)
        self._encoder.shutdown(wait=False, cancel_futures=True)

    def reconfigure(self, *, tokens: TokenRegistry, limits: Limits) -> list[str]:
        """Use new tokens and limits from now on (a reload). A removed token stops working for new
        connections; connections already signed in keep their principal. Returns the limits whose
        new value needs a restart (the WebSocket layer took them when it started listening)."""
        started = self._started_limits or self.limits
        restart = [
            name for name in ("ping_interval", "ping_timeout") if getattr(limits, name) != getattr(started, name)
        ]
        if limits.max_message_size > started.max_message_size:
            restart.append("max_message_size")
        self.tokens = self._handlers.tokens = tokens
        self.limits = self._handlers.limits = limits
        return restart

    async def refresh_topology(self) -> bool:
        """Detect the host's topology now and record it; True if it changed.

        Never raises: a failed detection (no ``ip`` command, a timeout...) is logged as a
        warning and the last recorded topology stays.
        """
        networks = self.registry.networks
        if networks is None:
            return False
        detect = self.networks.detect if self.networks is not None else functools.partial(detect_topology, networks)
        try:
            topology = await asyncio.to_thread(detect)
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
        try:
            ui_response = webui.process_request(request, allowed_origins=self.allowed_origins)
            if ui_response is not None:
                return ui_response
            # Headers.get raises MultipleValuesError for a header sent twice (which of them would count?).
            upgrade = request.headers.get("Upgrade")
            authorization = request.headers.get("Authorization")
        except MultipleValuesError as exc:
            return connection.respond(400, f"bad request: {exc.args[0]} is sent more than once\n")
        if (upgrade or "").lower() != "websocket":
            return connection.respond(404, "not found: the API is a WebSocket at /; see /healthz and /metrics\n")
        principal: Principal | None = None
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return connection.respond(401, "unauthorized: use 'Authorization: Bearer <token>'\n")
            try:
                entry = self.tokens.authenticate(token.strip())
            except Unauthorized:
                return connection.respond(401, "unauthorized: invalid token\n")
            principal = Principal(entry.name, entry.role, "token", entry.sees_all)
        else:
            principal = self._certificate_principal(connection)
        refusal = self._admission(connection, principal)
        if refusal is not None:
            return connection.respond(503, refusal)
        self._handshakes[connection] = principal
        return None

    def _certificate_principal(self, connection: ServerConnection) -> Principal | None:
        name = client_identity(connection.transport.get_extra_info("peercert"))
        if name is None:
            return None
        entry = next((entry for entry in self.tokens.entries if entry.name == name), None)
        role = entry.role if entry is not None else self.client_default_role
        if role is None:
            log.info("client certificate %r of %s names no token entry: not signed in", name, _peer(connection))
            return None
        return Principal(name, role, "certificate", entry is not None and entry.sees_all)

    def _admission(self, connection: ServerConnection, principal: Principal | None) -> str | None:
        """Why a new connection is refused (HTTP 503), or None to let it in.

        Authenticated connections count against ``max_connections``; the ones that have not
        authenticated yet (they must within ``handshake_timeout``) against their own budget,
        ``max_pending`` in all and ``max_pending_per_address`` from one address, so they
        never keep an authenticated client out.
        """
        who = [session.principal for session in self._sessions] + list(self._handshakes.values())
        authenticated = sum(1 for item in who if item is not None)
        if authenticated >= self.limits.max_connections:
            return "too many connections\n"
        if principal is not None:
            return None
        address = _host(connection)
        pending = [session.connection for session in self._sessions if session.principal is None]
        pending += [other for other, item in self._handshakes.items() if item is None]
        if len(pending) >= self.limits.max_pending:
            return "too many unauthenticated connections: authenticate at the handshake (Authorization: Bearer)\n"
        if sum(1 for other in pending if _host(other) == address) >= self.limits.max_pending_per_address:
            return "too many unauthenticated connections from this address\n"
        return None

    @staticmethod
    def _http(connection: ServerConnection, status: int, body: bytes, content_type: str) -> HttpResponse:
        response = connection.respond(status, "")
        headers = Headers(response.headers)
        # respond() made a text/plain, empty-body response: replace its headers, do not add to them.
        del headers["Content-Type"]
        del headers["Content-Length"]
        headers["Content-Type"] = content_type
        headers["Content-Length"] = str(len(body))
        return HttpResponse(response.status_code, response.reason_phrase, headers, body)

    # --- a connection -------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        principal = self._handshakes.pop(connection, None)
        session = Session(
            connection,
            principal,
            self._visibility(connection, principal),
            Outbox(self.limits.send_buffer_bytes),
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
                if (size := _size(frame, self.limits.max_message_size)) > self.limits.max_message_size:
                    await self._refuse_too_large(session, size)
                    break
                # Backpressure: while the client has not read what it was sent, its next requests
                # wait in the socket (the library stops reading after a few frames).
                await session.outbox.room()
                await inflight.acquire()
                task = asyncio.create_task(self._serve_frame(session, frame))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _: inflight.release())
        except ConnectionClosed:
            pass
        finally:
            if deadline is not None:
                deadline.cancel()
            session.closing = True
            for task in tasks:
                task.cancel()
            self._handlers.close_session(session)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self._sessions.discard(session)
            self.metrics.connections.dec()

    async def _refuse_too_large(self, session: Session, size: int) -> None:
        """Say ``too_large``, then close with 1009. (The library closes at once, without a word, only
        past twice the limit: it reads frames up to that size so that the client can be told.)"""
        limit = self.limits.max_message_size
        error = TooLarge(
            f"a message may have at most {limit} bytes (limits.max_message_size); this one has {size}",
            details={"limit": limit, "size": size},
        )
        self._reply_error(session, None, error, "invalid")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session.outbox.drained(), _CLOSE_TIMEOUT)
        session.closing = True
        await session.connection.close(_CLOSE_TOO_LARGE, f"message too large: over {limit} bytes")

    def _expire_unauthenticated(self, session: Session) -> None:
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
        if principal.sees_all:  # a token with visibility: all (an inventory's, a dashboard's)
            return Visibility(everything=True)
        remote = connection.remote_address
        return visibility_for(
            remote[0] if remote else None,
            principal.role,
            self.registry.networks,
            registry_host=self.registry_host,
            hosts_with_address=self.registry.hosts_at,
        )

    async def _write(self, session: Session) -> None:
        outbox = session.outbox
        try:
            while True:
                frame = await outbox.get()
                try:
                    await session.connection.send(frame, text=True)  # UTF-8 JSON, as a text frame
                finally:
                    outbox.sent(frame)
        except ConnectionClosed:
            pass

    def _send(self, session: Session, frame: bytes) -> None:
        """Queue a pushed frame (an event, a job message); past 4 times the send buffer, drop the client.

        Event streams wait for room before they push, so only job messages and errors can get there.
        """
        if session.closing:
            return
        if session.outbox.unsent > 4 * self.limits.send_buffer_bytes:
            self._drop(session, f"slow reader: over {4 * self.limits.send_buffer_bytes} bytes unsent")
            return
        session.outbox.put(frame)

    def _drop(self, session: Session, reason: str) -> None:
        """Close a connection that does not read (1013, with ``reason``); the others are not slowed."""
        if session.closing:
            return
        session.closing = True
        log.warning("dropping a slow client %s: %s", _peer(session.connection), reason)
        self._spawn(session.connection.close(_CLOSE_TRY_AGAIN, reason))

    async def _serve_frame(self, session: Session, frame: str | bytes) -> None:
        request_id: str | None = None
        action = "invalid"
        try:
            request = decode_request(frame)
            request_id, action = request.id, request.action
            self._authorize(session, request)
            if request.action in _BULK_ACTIONS:
                await self._serve_bulk(session, request)
            else:
                result = await self._handlers.handle(session, request)
                if isinstance(result, Then):
                    self._respond(session, encode_response(request.id, result.result))
                    result.after()
                else:
                    self._respond(session, encode_response(request.id, result))
            self.metrics.requests.labels(action, "ok").inc()
        except RequestError as exc:
            self._reply_error(session, exc.request_id, exc, exc.action or action)
        except UnknownAction as exc:
            self._reply_error(session, exc.details.pop("id", request_id), exc, action)
        except RegistryError as exc:
            self._reply_error(session, request_id, exc, action)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("internal error serving %s for %s", action, _peer(session.connection))
            self._reply_error(session, request_id, InternalError("internal error; see the server log"), action)

    async def _serve_bulk(self, session: Session, request: Request) -> None:
        """A list answer: one at a time per connection, once the last one has mostly been read, encoded off the loop."""
        async with session.bulk:
            await session.outbox.room()
            result = await self._handlers.handle(session, request)
            loop = asyncio.get_running_loop()
            frame = await loop.run_in_executor(self._encoder, encode_response, request.id, result)
            self._respond(session, frame)

    def _respond(self, session: Session, frame: bytes) -> None:
        """Queue an answer: never dropped (the connection's reading waits for room instead)."""
        if not session.closing:
            session.outbox.put(frame)

    def _reply_error(self, session: Session, request_id: str | None, error: RegistryError, action: str) -> None:
        self._respond(session, encode_error(request_id, error))
        self.metrics.requests.labels(action if action in ACTIONS else "invalid", error.code).inc()

    def _authorize(self, session: Session, request: Request) -> None:
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


def _host(connection: ServerConnection) -> str | None:
    remote = connection.remote_address
    return str(remote[0]) if remote else None


def _size(frame: str | bytes, limit: int) -> int:
    """The frame's size in bytes (a text frame is only encoded when it may be over ``limit``)."""
    if isinstance(frame, bytes) or len(frame) * 4 <= limit:
        return len(frame)
    return len(frame.encode("utf-8", "surrogatepass"))
