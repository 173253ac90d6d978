"""The server's actions: one handler per protocol action, thin over Registry (services,
addresses, networks) and DeployJobs. No sockets here: a handler gets the connection's :class:`Session` and the
request's params, already checked (:func:`registry.protocol.decode_request`), and returns
the result; :class:`WsServer <registry.server.WsServer>` does the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection

from .access import Visibility
from .auth import Role, TokenRegistry
from .config import Limits
from .core import Registry
from .events import Subscription
from .exceptions import (
    RateLimited,
    RegistryError,
    ServiceNotFound,
    StoreError,
    SubscriptionClosed,
    SubscriptionLagged,
    ValidationError,
)
from .flow import Outbox
from .metrics import ServerMetrics
from .model import ServiceEntry, ServiceState
from .paging import page
from .protocol import (
    ACTIONS,
    AllocateParams,
    AuthenticateParams,
    DeployParams,
    InstanceParams,
    JobParams,
    PagedNetworkParams,
    PagedServiceQuery,
    RegisterParams,
    ReleaseParams,
    Request,
    SetStateParams,
    SubscribeParams,
    UnsubscribeParams,
    encode_error,
    encode_event,
    encode_job,
)
from .query import ServiceQuery

if TYPE_CHECKING:
    from .jobs import DeployJobs, Job

__all__ = ["Handlers", "Principal", "RegisterBatcher", "Session", "Then"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection is: a token's or certificate's name, and its role."""

    name: str
    role: Role
    method: str  # "token", "certificate"
    sees_all: bool = False  # the token's visibility: all


@dataclass(eq=False)
class Session:
    """One connection's state: who it is, what it may see, its send queue, its streams."""

    connection: ServerConnection
    principal: Principal | None
    visibility: Visibility
    outbox: Outbox
    subscriptions: dict[str, tuple[Subscription, asyncio.Task[None]]] = field(default_factory=dict)
    watched_jobs: dict[str, Callable[..., None]] = field(default_factory=dict)
    closing: bool = False
    # One large answer (a list) built or waiting to be sent at a time (docs/protocol.md#limits).
    bulk: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True, slots=True)
class Then:
    """A handler's result plus what to do right after the response is queued."""

    result: Any
    after: Callable[[], None]


class RegisterBatcher:
    """Coalesces concurrent ``register_service`` requests into one core call and one commit.

    One batch is in flight at a time; requests that arrive meanwhile form the next batch.
    A single request alone is written at once, so nothing waits for company. A bad entry
    fails alone (``Registry.stage_each``). The batch is applied on the event loop (it is
    in-memory work, cheaper than a hop to a thread and back) and the loop is woken by the
    store's writer thread when the commit is done: no thread waits for the disk.
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
                    outcomes, revision = self._registry.stage_each([e for e, _ in batch])
                    if revision:
                        await self._durable(revision)
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

    async def _durable(self, revision: int) -> None:
        """Until everything up to ``revision`` is committed and published."""
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[None] = loop.create_future()

        def done(error: StoreError | None) -> None:  # in the store's writer thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, committed, error)

        def watch() -> None:  # a writer that died never answers: check now and then
            self._registry.check_commits()
            if not committed.done():
                watchdog[0] = loop.call_later(_COMMIT_CHECK_INTERVAL, watch)

        watchdog = [loop.call_later(_COMMIT_CHECK_INTERVAL, watch)]
        self._registry.make_durable_soon(revision, done)
        try:
            await committed
        finally:
            watchdog[0].cancel()


_COMMIT_CHECK_INTERVAL = 0.5  # seconds


def _settle(future: asyncio.Future[None], error: StoreError | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class Handlers:
    """The actions of one server. ``send`` queues a frame on a session; ``drop`` closes a
    session's connection as a slow reader (with the reason); ``spawn`` runs a background
    task; ``visibility`` says what a principal on a connection may see."""

    def __init__(
        self,
        registry: Registry,
        *,
        tokens: TokenRegistry,
        deploys: DeployJobs | None,
        limits: Limits,
        metrics: ServerMetrics,
        send: Callable[[Session, bytes], None],
        drop: Callable[[Session, str], None],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        visibility: Callable[[ServerConnection, Principal | None], Visibility],
    ) -> None:
        self.registry = registry
        self.tokens = tokens
        self.deploys = deploys
        self.limits = limits
        self.metrics = metrics
        self._send = send
        self._drop = drop
        self._visibility = visibility
        self._registrations = RegisterBatcher(registry, spawn)
        self._table: dict[str, Callable[[Session, Any], Awaitable[Any]]] = {
            "ping": self.ping,
            "authenticate": self.authenticate,
            "list_services": self.list_services,
            "get_service": self.get_service,
            "list_endpoints": self.list_endpoints,
            "subscribe": self.subscribe,
            "unsubscribe": self.unsubscribe,
            "list_networks": self.list_networks,
            "get_topology": self.get_topology,
            "list_allocations": self.list_allocations,
            "register_service": self.register_service,
            "remove_service": self.remove_service,
            "set_state": self.set_state,
            "heartbeat": self.heartbeat,
            "allocate_ip": self.allocate_ip,
            "release_ip": self.release_ip,
            "deploy_package": self.deploy_package,
            "watch_job": self.watch_job,
            "get_job": self.get_job,
            "list_jobs": self.list_jobs,
        }
        assert set(self._table) == set(ACTIONS), "every protocol action needs a handler"

    async def handle(self, session: Session, request: Request) -> Any:
        """The result of an authorized request (or a :class:`Then`)."""
        return await self._table[request.action](session, request.args)

    def close_session(self, session: Session) -> None:
        """End the streams of a connection that closed."""
        self._drop_subscriptions(session)
        self._drop_job_watches(session)

    # --- reads ------------------------------------------------------------------------------

    async def ping(self, session: Session, params: Any) -> Any:
        return {"pong": True, "revision": self.registry.revision, "time": time.time()}

    async def authenticate(self, session: Session, params: AuthenticateParams) -> Any:
        entry = self.tokens.authenticate(params.token)
        session.principal = Principal(entry.name, entry.role, "token", entry.sees_all)
        session.visibility = self._visibility(session.connection, session.principal)
        return {"name": entry.name, "role": entry.role.label}

    def _matching(self, session: Session, query: ServiceQuery) -> list[ServiceEntry]:
        return session.visibility.filter(self.registry.list_services(query))

    async def list_services(self, session: Session, params: PagedServiceQuery) -> Any:
        return page(
            "list_services",
            self._matching(session, params.query),
            limit=params.limit,
            cursor=params.cursor,
            key=lambda entry: entry.key,
            kinds=(str, str),
        )

    async def get_service(self, session: Session, params: InstanceParams) -> Any:
        name, host_id = params.service_name, params.host_id
        candidates = self._matching(session, ServiceQuery(service_name=name, host_id=host_id))
        if not candidates:
            # Invisible instances are reported exactly like missing ones: no existence leak.
            where = "" if host_id is None else f" on host {host_id!r}"
            raise ServiceNotFound(f"service {name!r} is not registered{where}", details={"service_name": name})
        if host_id is not None:
            return candidates[0]
        return min(candidates, key=lambda entry: (entry.state is not ServiceState.RUNNING, entry.distance))

    async def list_endpoints(self, session: Session, params: PagedServiceQuery) -> Any:
        query = params.query
        visible = {entry.key for entry in self._matching(session, query)}
        return page(
            "list_endpoints",
            (
                record
                for record in self.registry.list_endpoints(query)
                if (record.service_name, record.host_id) in visible
            ),
            limit=params.limit,
            cursor=params.cursor,
            key=lambda record: (record.service_name, record.host_id, record.endpoint),
            kinds=(str, str, str),
        )

    async def list_networks(self, session: Session, params: Any) -> Any:
        networks = self.registry.networks
        if networks is None:
            return []
        return [network.to_dict() for network in networks.networks.values()]

    async def get_topology(self, session: Session, params: Any) -> Any:
        return {"revision": self.registry.revision, "topology": self.registry.topology()}

    async def list_allocations(self, session: Session, params: PagedNetworkParams) -> Any:
        return page(
            "list_allocations",
            self.registry.allocations(params.network),
            limit=params.limit,
            cursor=params.cursor,
            key=lambda allocation: (allocation.network, int(ipaddress.ip_address(allocation.ip))),
            kinds=(str, int),
        )

    # --- subscriptions ----------------------------------------------------------------------

    async def subscribe(self, session: Session, params: SubscribeParams) -> Any:
        if len(session.subscriptions) >= self.limits.max_subscriptions_per_connection:
            raise RateLimited(
                f"too many subscriptions on this connection (limit {self.limits.max_subscriptions_per_connection})"
            )
        subscription = self.registry.subscribe(
            params.events,
            since_revision=params.since_revision,
            filter=params.filter.to_dict() if params.filter is not None else None,
            maxsize=self.limits.send_queue,
        )

        def start_forwarding() -> None:
            task = asyncio.create_task(self._forward(session, subscription))
            session.subscriptions[subscription.id] = (subscription, task)
            self.metrics.subscribers.inc()

        # The response must reach the client before the first event of the subscription.
        return Then({"subscription": subscription.id, "revision": subscription.last_revision}, start_forwarding)

    async def _forward(self, session: Session, subscription: Subscription) -> None:
        visibility = session.visibility
        try:
            while not session.closing:
                # Flow control: while the client has not read what it was sent, events wait in the
                # subscription's queue (bounded: a subscriber that falls limits.send_queue behind lags).
                if not await self._room_for_events(session, subscription):
                    # It lagged because it does not read: the same as any slow reader.
                    self._drop(session, f"slow reader: {self.limits.send_queue} events unread")
                    return
                event = await subscription.next_shared()
                if not visibility.allows_event(event):
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

    @staticmethod
    async def _room_for_events(session: Session, subscription: Subscription) -> bool:
        """Wait until the session's outbox has room; False if the subscription lags before it does."""
        outbox = session.outbox
        while not outbox.has_room:
            if subscription.lagged:
                return False
            waits = {asyncio.ensure_future(outbox.room()), asyncio.ensure_future(subscription.changed())}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        return True

    async def unsubscribe(self, session: Session, params: UnsubscribeParams) -> Any:
        subscription_id = params.subscription
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

    def _drop_subscriptions(self, session: Session) -> None:
        for subscription, task in list(session.subscriptions.values()):
            subscription.close("the connection closed")
            task.cancel()
        if session.subscriptions:
            self.metrics.subscribers.dec(len(session.subscriptions))
            session.subscriptions.clear()

    # --- writes -----------------------------------------------------------------------------

    async def register_service(self, session: Session, params: RegisterParams) -> Any:
        try:
            entry = ServiceEntry.from_dict(params.service)
        except ValidationError as exc:
            raise _within("params.service", exc) from None
        return await self._registrations.submit(entry)

    async def remove_service(self, session: Session, params: InstanceParams) -> Any:
        return await asyncio.to_thread(self.registry.remove, params.service_name, params.host_id)

    async def set_state(self, session: Session, params: SetStateParams) -> Any:
        return await asyncio.to_thread(self.registry.set_state, params.service_name, params.state, params.host_id)

    async def heartbeat(self, session: Session, params: InstanceParams) -> Any:
        return await asyncio.to_thread(self.registry.heartbeat, params.service_name, params.host_id)

    async def allocate_ip(self, session: Session, params: AllocateParams) -> Any:
        return await asyncio.to_thread(self.registry.allocate_ip, params.owner, params.network, ip=params.ip)

    async def release_ip(self, session: Session, params: ReleaseParams) -> Any:
        return await asyncio.to_thread(self.registry.release_ip, params.owner, params.network)

    # --- deploy jobs ------------------------------------------------------------------------

    def _require_deploys(self) -> DeployJobs:
        if self.deploys is None:
            raise ValidationError("this registry does not deploy packages (started without a deploy configuration)")
        return self.deploys

    def _watch(self, session: Session, job: Job) -> None:
        if job.id in session.watched_jobs or job.done:
            return

        def forward(job: Job, kind: str, data: dict[str, Any]) -> None:
            self._send(session, encode_job(job.id, kind, data))
            if kind == "finished":
                session.watched_jobs.pop(job.id, None)

        session.watched_jobs[job.id] = forward
        job.listeners.add(forward)

    def _drop_job_watches(self, session: Session) -> None:
        for job_id, listener in session.watched_jobs.items():
            with contextlib.suppress(RegistryError):
                self._require_deploys().get(job_id).listeners.discard(listener)
        session.watched_jobs.clear()

    async def deploy_package(self, session: Session, params: DeployParams) -> Any:
        job = await self._require_deploys().start(params)
        principal = session.principal.name if session.principal else "?"
        log.info("deploy job %s: %s by %s", job.id, job.package, principal)
        # The caller watches its job from the start: the response goes first, then progress.
        return Then(job.summary(), lambda: self._watch(session, job))

    async def watch_job(self, session: Session, params: JobParams) -> Any:
        job = self._require_deploys().get(params.job)
        return Then(dict(job.summary(), events=list(job.events)), lambda: self._watch(session, job))

    async def get_job(self, session: Session, params: JobParams) -> Any:
        job = self._require_deploys().get(params.job)
        return dict(job.summary(), events=list(job.events))

    async def list_jobs(self, session: Session, params: Any) -> Any:
        return self.deploys.list() if self.deploys is not None else []


def _within(path: str, error: ValidationError) -> ValidationError:
    """``error`` about a field of the document at ``path``: its field and message say where."""
    field = f"{path}.{error.field}" if error.field else path
    message = error.message.removeprefix(f"{error.field}: ") if error.field else error.message
    details = {key: value for key, value in error.details.items() if key != "field"}
    return ValidationError(f"{field}: {message}", field=field, details=details)
