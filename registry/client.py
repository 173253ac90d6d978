"""Clients for the WebSocket API: asyncio (:class:`WsClient`), trio (:class:`TrioClient`) and
blocking (:class:`BlockingClient`). All three are thin adapters over
:class:`registry.protocol.ClientCodec`, which decides where each frame from the server goes;
the clients only move frames and wake whoever waits. The actions are defined once, in
:class:`_Actions`; connecting is shared (:mod:`registry.connection`).

A server error raises the exception class of its wire code (``ServiceNotFound`` for
``not_found``, ``Forbidden``, ``Compacted``...), so callers handle the same exceptions
as with the library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from .connection import ConnectionSettings, closed_error, connect_options, connecting, no_answer, registry_url
from .events import Event, EventType
from .exceptions import ConnectionFailed, RegistryError
from .model import BOOKKEEPING_FIELDS, Location, ServiceEntry, ServiceState
from .protocol import ClientCodec, Delivery, JobMessage, Route
from .tls import TlsClientConfig

__all__ = ["BlockingClient", "ConnectionSettings", "TrioClient", "WsClient", "registry_url"]

log = logging.getLogger(__name__)

_EVENT_QUEUE = 10_000
# Items per request when a client lists everything: answers of a few MB for entries of a few KB, well
# under the client's message size limit (ConnectionSettings.max_message_size, 16 MiB).
PAGE_SIZE = 500


def _filters(**filters: Any) -> dict[str, Any]:
    return {key: (value.value if hasattr(value, "value") else value) for key, value in filters.items()}


class _Actions:
    """One method per action. ``_call`` returns the value (blocking) or an awaitable."""

    def _call(self, action: str, params: Mapping[str, Any] | None = None) -> Any:
        """The action's result, typed by the codec (entries for entry actions)."""
        raise NotImplementedError

    def ping(self) -> Any:
        return self._call("ping")

    def authenticate(self, token: str) -> Any:
        return self._call("authenticate", {"token": token})

    def list_services(self, *, limit: int | None = None, cursor: str | None = None, **filters: Any) -> Any:
        """Every matching entry, fetched PAGE_SIZE at a time; with ``limit`` or ``cursor``, one
        :class:`~registry.paging.Page` (``items``, ``next_cursor``)."""
        return self._list("list_services", _filters(**filters), limit, cursor)

    def get_service(self, service_name: str, host_id: str | None = None) -> Any:
        return self._call("get_service", {"service_name": service_name, "host_id": host_id})

    def list_endpoints(self, *, limit: int | None = None, cursor: str | None = None, **filters: Any) -> Any:
        """Like :meth:`list_services`, for endpoint records."""
        return self._list("list_endpoints", _filters(**filters), limit, cursor)

    def register_service(self, entry: ServiceEntry | Mapping[str, Any]) -> Any:
        service = entry.to_dict() if isinstance(entry, ServiceEntry) else dict(entry)
        for bookkeeping in BOOKKEEPING_FIELDS:  # the registry sets them
            service.pop(bookkeeping, None)
        return self._call("register_service", {"service": service})

    add_or_update = register_service

    def remove_service(self, service_name: str, host_id: str | None = None) -> Any:
        return self._call("remove_service", {"service_name": service_name, "host_id": host_id})

    def set_state(self, service_name: str, state: ServiceState | str, host_id: str | None = None) -> Any:
        return self._call("set_state", {"service_name": service_name, "state": str(state), "host_id": host_id})

    def heartbeat(self, service_name: str, host_id: str | None = None) -> Any:
        return self._call("heartbeat", {"service_name": service_name, "host_id": host_id})

    def list_networks(self) -> Any:
        """The configured networks: ``[NetworkSummary]``."""
        return self._call("list_networks")

    def get_topology(self) -> Any:
        """The detected topology (a :class:`~registry.model.Topology`, with the registry's ``revision``)."""
        return self._call("get_topology")

    def allocate_ip(self, owner: str, network: str | Location, *, ip: str | None = None) -> Any:
        """``owner``'s :class:`~registry.model.Allocation` in ``network`` (``str()`` is the address);
        ``ip`` asks for a specific address."""
        params: dict[str, Any] = {"owner": owner, "network": str(network)}
        if ip is not None:
            params["ip"] = ip
        return self._call("allocate_ip", params)

    def release_ip(self, owner: str, network: str | None = None) -> Any:
        """What was released: ``[Allocation]``."""
        return self._call("release_ip", {"owner": owner, "network": network})

    def list_allocations(
        self, network: str | None = None, *, limit: int | None = None, cursor: str | None = None
    ) -> Any:
        """Like :meth:`list_services`, for IP allocations."""
        return self._list("list_allocations", {"network": network}, limit, cursor)

    def _list(self, action: str, params: dict[str, Any], limit: int | None, cursor: str | None) -> Any:
        if limit is not None or cursor is not None:
            return self._call(action, {**params, "limit": limit, "cursor": cursor})
        return self._all_pages(action, params)

    def _all_pages(self, action: str, params: dict[str, Any]) -> Any:
        """Every item of a list action, page by page (answers stay small however large the registry)."""
        raise NotImplementedError

    def deploy_package(
        self,
        package: str,
        *,
        node: str | None = None,
        target: Mapping[str, Any] | None = None,
        targets: Iterable[str | Mapping[str, Any]] | None = None,
        env: Mapping[str, str] | None = None,
        keep_releases: int | None = None,
    ) -> Any:
        """Start a deployment (admin); the answer is the job summary, progress follows as job messages.

        ``package`` is a file in the registry's packages folder; the targets are node names from
        its networks file or ``{host, ssh_user, ssh_key, install_base, port, name}`` objects.
        """
        return self._call(
            "deploy_package",
            {
                "package": package,
                "node": node,
                "target": dict(target) if target is not None else None,
                "targets": [item if isinstance(item, str) else dict(item) for item in targets] if targets else None,
                "env": dict(env) if env is not None else None,
                "keep_releases": keep_releases,
            },
        )

    def watch_job(self, job: str) -> Any:
        """The job's summary and past events; later progress arrives as job messages."""
        return self._call("watch_job", {"job": job})

    def get_job(self, job: str) -> Any:
        return self._call("get_job", {"job": job})

    def list_jobs(self) -> Any:
        return self._call("list_jobs")

    def unsubscribe(self, subscription: str) -> Any:
        return self._call("unsubscribe", {"subscription": subscription})

    def _subscribe_params(
        self,
        events: Iterable[EventType | str] | None,
        since_revision: int | None,
        filter: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        return {
            "events": [str(event) for event in events] if events is not None else None,
            "since_revision": since_revision,
            "filter": dict(filter) if filter else None,
        }


def _raised(item: Any) -> Any:
    """A delivered item: errors are raised, anything else is returned."""
    if isinstance(item, RegistryError):
        raise item
    return item


class _AsyncPages(_Actions):
    async def _all_pages(self, action: str, params: dict[str, Any]) -> list[Any]:
        items: list[Any] = []
        cursor: str | None = None
        while True:
            page = await self._call(action, {**params, "limit": PAGE_SIZE, "cursor": cursor})
            items.extend(page.items)
            if page.next_cursor is None:
                return items
            cursor = page.next_cursor


class WsClient(_AsyncPages):
    """The asyncio client. ``await WsClient.connect_tls("localhost:9443", tls, token=...)``."""

    def __init__(self, connection: ClientConnection, settings: ConnectionSettings) -> None:
        self._connection = connection
        self._settings = settings
        self._codec = ClientCodec()
        self._replies: dict[str, asyncio.Future[Any]] = {}
        self._events: asyncio.Queue[Event | RegistryError] = asyncio.Queue(maxsize=_EVENT_QUEUE)
        self._jobs: dict[str, asyncio.Queue[JobMessage | RegistryError]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect_tls(
        cls,
        addr: str,
        tls_config: TlsClientConfig | None = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> WsClient:
        return await cls.connect(ConnectionSettings.for_address(addr, tls_config, token=token, timeout=timeout))

    @classmethod
    async def connect(cls, settings: ConnectionSettings) -> WsClient:
        with connecting(settings.url):
            connection = await connect(settings.url, **connect_options(settings))
        return cls(connection, settings)

    async def __aenter__(self) -> WsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._connection.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _call(self, action: str, params: Mapping[str, Any] | None = None) -> Any:
        request_id, frame = self._codec.encode_request(action, params)
        self._replies[request_id] = reply = asyncio.get_running_loop().create_future()
        try:
            await self._connection.send(frame, text=True)
            async with asyncio.timeout(self._settings.timeout):  # no task per call, unlike wait_for
                answer = await reply
            return _raised(answer)
        except ConnectionClosed as exc:
            raise closed_error(self._settings.url, exc) from None
        except TimeoutError:
            raise no_answer(action, self._settings) from None
        finally:
            self._replies.pop(request_id, None)
            self._codec.forget(request_id)

    async def _read(self) -> None:
        closed: BaseException | None = None
        try:
            async for frame in self._connection:
                delivery = self._codec.route(frame)
                if delivery is None:
                    continue
                if delivery.route is Route.REPLY:
                    reply = self._replies.get(delivery.key)
                    if reply is not None and not reply.done():
                        reply.set_result(delivery.item)
                elif delivery.route is Route.JOB:
                    self._job_queue(delivery.key).put_nowait(delivery.item)
                else:
                    await self._events.put(delivery.item)
            # A clean close (1000, 1001) ends the iteration quietly: say which it was all the same.
            closed = self._connection.protocol.close_exc
        except ConnectionClosed as exc:
            closed = exc
        except RegistryError as exc:
            # A frame we cannot read: the stream cannot be trusted any more. Close it so
            # later calls fail at once instead of waiting for answers nobody will read.
            closed = exc
            await self._connection.close(1002, "unreadable frame")
        finally:
            failure = closed_error(self._settings.url, closed)
            for reply in self._replies.values():
                if not reply.done():
                    reply.set_result(failure)
            if not self._events.full():
                self._events.put_nowait(failure)
            for queue in self._jobs.values():
                queue.put_nowait(failure)

    def _job_queue(self, job: str) -> asyncio.Queue[JobMessage | RegistryError]:
        return self._jobs.setdefault(job, asyncio.Queue())

    async def job_messages(self, job: str, timeout: float | None = None) -> AsyncIterator[JobMessage]:
        """The job's progress messages as they arrive, ending with its ``finished`` message.

        Call after :meth:`deploy_package` or :meth:`watch_job` (which replays past events in
        its answer). ``timeout`` bounds the wait for each message.
        """
        queue = self._job_queue(job)
        if self._reader.done() and queue.empty():
            raise ConnectionFailed(f"the connection to {self._settings.url} is closed")
        try:
            while True:
                async with asyncio.timeout(timeout):
                    item = await queue.get()
                message: JobMessage = _raised(item)
                yield message
                if message.event == "finished":
                    return
        finally:
            self._jobs.pop(job, None)

    async def subscribe(
        self,
        events: Iterable[EventType | str] | None = None,
        *,
        since_revision: int | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> str:
        """Subscribe; returns the subscription id. Events arrive through :meth:`next_event`."""
        result = await self._call("subscribe", self._subscribe_params(events, since_revision, filter))
        return str(result["subscription"])

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event of any subscription on this connection.

        Raises:
            SubscriptionLagged: the server dropped a subscription that fell behind.
            ConnectionFailed: the connection closed.
        """
        if self._events.empty():
            async with asyncio.timeout(timeout):
                item = await self._events.get()
        else:  # already here: no waiting, no timer
            item = self._events.get_nowait()
        event: Event = _raised(item)
        return event

    @classmethod
    async def watch(
        cls,
        settings: ConnectionSettings,
        events: Iterable[EventType | str] | None = None,
        *,
        since_revision: int | None = None,
        filter: Mapping[str, Any] | None = None,
        retry_delay: float = 0.5,
        max_retry_delay: float = 10.0,
        on_status: Callable[[str], None] | None = None,
    ) -> AsyncIterator[Event]:
        """Events forever, across reconnects: each reconnect resumes from the last revision
        seen, so every event arrives exactly once (or ``Compacted`` is raised).

        ``on_status`` hears about the connection (``the connection to ... closed: code 1001
        'going away'; reconnecting``, ``reconnected at revision 42``); default: logged as warnings.
        """
        say = on_status or (lambda text: log.warning("%s", text))
        last = since_revision
        wanted = list(events) if events is not None else None
        delay = retry_delay
        lost = False
        while True:
            try:
                client = await cls.connect(settings)
            except ConnectionFailed as exc:
                say(f"{exc.message}; retrying in {delay:.1f} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_retry_delay)
                continue
            delay = retry_delay
            try:
                subscription = await client.subscribe(wanted, since_revision=last, filter=filter)
                last = client._codec.last_revision(subscription)
                if lost:
                    say(f"reconnected at revision {last}")
                    lost = False
                while True:
                    event = await client.next_event()
                    last = event.revision
                    yield event
            except ConnectionFailed as exc:
                lost = True
                say(f"{exc.message}; reconnecting, resuming after revision {last}")
            finally:
                await client.close()


class BlockingClient(_Actions):
    """The blocking client, for threads and for the Ansible plugins.

    One call at a time per client (a lock serialises them). Events and job messages that
    arrive while a call waits for its answer are kept for :meth:`next_event` and
    :meth:`next_job_message`.
    """

    def __init__(self, settings: ConnectionSettings) -> None:
        self._settings = settings
        self._codec = ClientCodec()
        self._lock = threading.Lock()
        self._events: deque[Event | RegistryError] = deque()
        self._job_messages: deque[JobMessage] = deque()
        # websockets >= 17.1 wants connect() used as a context manager; the stack keeps it open until close().
        self._stack = contextlib.ExitStack()
        with connecting(settings.url):
            self._connection: SyncConnection = self._stack.enter_context(
                sync_connect(settings.url, **connect_options(settings))
            )

    @classmethod
    def connect_tls(
        cls, addr: str, tls_config: TlsClientConfig | None = None, *, token: str | None = None, timeout: float = 10.0
    ) -> BlockingClient:
        return cls(ConnectionSettings.for_address(addr, tls_config, token=token, timeout=timeout))

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def _receive(self, timeout: float | None) -> Delivery | None:
        try:
            frame = self._connection.recv(timeout=timeout)
        except ConnectionClosed as exc:
            raise closed_error(self._settings.url, exc) from None
        return self._codec.route(frame)

    def _all_pages(self, action: str, params: dict[str, Any]) -> list[Any]:
        items: list[Any] = []
        cursor: str | None = None
        while True:
            page = self._call(action, {**params, "limit": PAGE_SIZE, "cursor": cursor})
            items.extend(page.items)
            if page.next_cursor is None:
                return items
            cursor = page.next_cursor

    def _call(self, action: str, params: Mapping[str, Any] | None = None) -> Any:
        request_id, frame = self._codec.encode_request(action, params)
        with self._lock:
            try:
                self._connection.send(frame, text=True)
                while True:
                    try:
                        delivery = self._receive(self._settings.timeout)
                    except TimeoutError:
                        raise no_answer(action, self._settings) from None
                    if delivery is not None and delivery.route is Route.REPLY and delivery.key == request_id:
                        return _raised(delivery.item)
                    self._keep(delivery)
            except ConnectionClosed as exc:
                raise closed_error(self._settings.url, exc) from None
            finally:
                self._codec.forget(request_id)

    def subscribe(
        self,
        events: Iterable[EventType | str] | None = None,
        *,
        since_revision: int | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> str:
        return str(self._call("subscribe", self._subscribe_params(events, since_revision, filter))["subscription"])

    def _keep(self, delivery: Delivery | None) -> None:
        """Keep what arrived while waiting for something else."""
        if delivery is None:
            return
        if delivery.route is Route.EVENTS:
            self._events.append(delivery.item)
        elif delivery.route is Route.JOB:
            self._job_messages.append(delivery.item)

    def _next_kept(self, kept: deque[Any], timeout: float | None) -> Any:
        with self._lock:
            while not kept:
                try:
                    self._keep(self._receive(timeout))
                except TimeoutError:
                    return None
            return kept.popleft()

    def next_job_message(self, timeout: float | None = None) -> JobMessage | None:
        """The next deploy job message (progress, then ``finished``), or None after ``timeout`` seconds."""
        message: JobMessage | None = self._next_kept(self._job_messages, timeout)
        return message

    def next_event(self, timeout: float | None = None) -> Event:
        """The next event of any subscription on this connection (as :meth:`WsClient.next_event`).

        Raises:
            TimeoutError: none arrived within ``timeout`` seconds (None: wait forever).
            SubscriptionLagged: the server dropped a subscription that fell behind.
            ConnectionFailed: the connection closed.
        """
        item = self._next_kept(self._events, timeout)
        if item is None:
            raise TimeoutError(f"no event within {timeout} s")
        event: Event = _raised(item)
        return event


class TrioClient(_AsyncPages):
    """The trio client, on ``websockets.trio``. ``async with TrioClient.connect_tls(...) as c:``."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self._settings = settings
        self._codec = ClientCodec()
        self._connection: Any = None
        self._replies: dict[str, Any] = {}  # request id -> trio.Event, set when the answer is in _answers
        self._answers: dict[str, Any] = {}
        self._events_send: Any = None
        self._events_receive: Any = None
        self._jobs_send: Any = None
        self._jobs_receive: Any = None
        self._stack = contextlib.AsyncExitStack()

    @classmethod
    def connect_tls(
        cls, addr: str, tls_config: TlsClientConfig | None = None, *, token: str | None = None, timeout: float = 10.0
    ) -> TrioClient:
        return cls(ConnectionSettings.for_address(addr, tls_config, token=token, timeout=timeout))

    async def __aenter__(self) -> TrioClient:
        import trio
        from websockets.trio.client import connect as trio_connect

        # websockets.trio's connect() is only an async context manager: it runs the connection's
        # tasks in a nursery of its own. Ours runs the reader; both are left in __aexit__.
        try:
            with connecting(self._settings.url):
                self._connection = await self._stack.enter_async_context(
                    trio_connect(self._settings.url, **connect_options(self._settings))
                )
        except RegistryError:
            await self._stack.aclose()
            raise
        self._events_send, self._events_receive = trio.open_memory_channel(_EVENT_QUEUE)
        self._jobs_send, self._jobs_receive = trio.open_memory_channel(_EVENT_QUEUE)
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(self._read)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._connection.aclose()  # ends the reader, so the nursery can exit
        await self._stack.aclose()

    async def _read(self) -> None:
        import trio

        try:
            async for frame in self._connection:
                delivery = self._codec.route(frame)
                if delivery is None:
                    continue
                if delivery.route is Route.REPLY:
                    if delivery.key in self._replies:
                        self._answers[delivery.key] = delivery.item
                        self._replies.pop(delivery.key).set()
                elif delivery.route is Route.JOB:
                    await self._jobs_send.send(delivery.item)
                else:
                    await self._events_send.send(delivery.item)
        except ConnectionClosed:
            pass
        except RegistryError as exc:  # the server sent something we cannot read: surfaces at next_event
            with trio.CancelScope(shield=True):
                await self._connection.aclose()
            with contextlib.suppress(trio.WouldBlock):
                self._events_send.send_nowait(exc)
        finally:
            for waiter in self._replies.values():
                waiter.set()
            with trio.CancelScope(shield=True):
                await self._events_send.aclose()
                await self._jobs_send.aclose()

    async def _call(self, action: str, params: Mapping[str, Any] | None = None) -> Any:
        import trio

        request_id, frame = self._codec.encode_request(action, params)
        self._replies[request_id] = answered = trio.Event()
        try:
            await self._connection.send(frame, text=True)
            with trio.fail_after(self._settings.timeout):
                await answered.wait()
        except ConnectionClosed as exc:
            raise closed_error(self._settings.url, exc) from None
        except trio.TooSlowError:
            raise no_answer(action, self._settings) from None
        finally:
            self._replies.pop(request_id, None)
            self._codec.forget(request_id)
        if request_id not in self._answers:
            raise ConnectionFailed(f"the connection to {self._settings.url} closed before {action} was answered")
        return _raised(self._answers.pop(request_id))

    async def subscribe(
        self,
        events: Iterable[EventType | str] | None = None,
        *,
        since_revision: int | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> str:
        result = await self._call("subscribe", self._subscribe_params(events, since_revision, filter))
        return str(result["subscription"])

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event of any subscription on this connection (as :meth:`WsClient.next_event`).

        Raises:
            TimeoutError: none arrived within ``timeout`` seconds (None: wait forever).
            SubscriptionLagged: the server dropped a subscription that fell behind.
            ConnectionFailed: the connection closed.
        """
        import trio

        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                item = await self._events_receive.receive()
        except trio.TooSlowError:
            raise TimeoutError(f"no event within {timeout} s") from None
        except trio.EndOfChannel:
            raise closed_error(self._settings.url) from None
        event: Event = _raised(item)
        return event

    async def next_job_message(self) -> JobMessage:
        """The next deploy job message (of any job this connection watches)."""
        import trio

        try:
            message: JobMessage = await self._jobs_receive.receive()
        except trio.EndOfChannel:
            raise closed_error(self._settings.url) from None
        return message
