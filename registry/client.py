"""Clients for the WebSocket API: asyncio (:class:`WsClient`), trio (:class:`TrioClient`) and
blocking (:class:`BlockingClient`). All three are thin adapters over
:class:`registry.protocol.ClientCodec`; the actions are defined once, in :class:`_Actions`.

A server error raises the exception class of its wire code (``ServiceNotFound`` for
``not_found``, ``Forbidden``, ``Compacted``...), so callers handle the same exceptions
as with the library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from .events import Event, EventType
from .exceptions import Compacted, ConnectionFailed, Forbidden, RegistryError, Unauthorized, ValidationError
from .model import EndpointRecord, Location, ServiceEntry, ServiceState
from .protocol import ClientCodec, ErrorMessage, EventMessage, JobMessage, Response
from .tls import TlsClientConfig

__all__ = ["BlockingClient", "ConnectionSettings", "TrioClient", "WsClient", "registry_url"]

log = logging.getLogger(__name__)

_EVENT_QUEUE = 10_000


def registry_url(addr: str) -> str:
    """``host:port`` or ``wss://host:port/`` -> a ``wss://`` URL; ``ws://`` is refused."""
    if addr.startswith("wss://"):
        return addr
    if addr.startswith(("ws://", "http://")):
        raise ValidationError(f"{addr!r}: svcreg only speaks TLS; use wss://", field="url")
    if addr.startswith("https://"):
        return "wss://" + addr.removeprefix("https://")
    return f"wss://{addr}/"


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """Where and how to connect; ``from_env`` reads SVCREG_URL, SVCREG_CA, SVCREG_TOKEN..."""

    url: str
    tls: TlsClientConfig
    token: str | None = None
    timeout: float = 10.0
    max_message_size: int = 16 * 2**20

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ConnectionSettings:
        env = os.environ if environ is None else environ
        url = overrides.pop("url", None) or env.get("SVCREG_URL")
        if not url:
            raise ValidationError("no registry URL: pass --url or set SVCREG_URL", field="url")
        tls = overrides.pop("tls", None) or TlsClientConfig(
            ca_file=env.get("SVCREG_CA") or None,
            cert=env.get("SVCREG_CLIENT_CERT") or None,
            key=env.get("SVCREG_CLIENT_KEY") or None,
        )
        token = overrides.pop("token", None) or env.get("SVCREG_TOKEN") or None
        return cls(registry_url(url), tls, token, **overrides)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def __repr__(self) -> str:  # never show the token
        return f"ConnectionSettings(url={self.url!r}, token={'***' if self.token else None})"


def _entry(result: Any) -> ServiceEntry:
    return ServiceEntry.from_dict(result)


def _entries(result: Any) -> list[ServiceEntry]:
    return [ServiceEntry.from_dict(item) for item in result]


def _endpoints(result: Any) -> list[EndpointRecord]:
    return [
        EndpointRecord(
            item["service_name"],
            item["host_id"],
            item["endpoint"],
            item["protocol"],
            item["ip"],
            item["port"],
            Location(item["location"]),
            ServiceState(item["state"]),
        )
        for item in result
    ]


def _filters(**filters: Any) -> dict[str, Any]:
    return {key: (value.value if hasattr(value, "value") else value) for key, value in filters.items()}


class _Actions:
    """One method per action. ``_call`` returns the value (blocking) or an awaitable."""

    def _call(
        self, action: str, params: Mapping[str, Any] | None = None, convert: Callable[[Any], Any] | None = None
    ) -> Any:
        raise NotImplementedError

    def ping(self) -> Any:
        return self._call("ping")

    def authenticate(self, token: str) -> Any:
        return self._call("authenticate", {"token": token})

    def list_services(self, **filters: Any) -> Any:
        return self._call("list_services", _filters(**filters), _entries)

    def get_service(self, service_name: str, host_id: str | None = None) -> Any:
        return self._call("get_service", {"service_name": service_name, "host_id": host_id}, _entry)

    def list_endpoints(self, **filters: Any) -> Any:
        return self._call("list_endpoints", _filters(**filters), _endpoints)

    def register_service(self, entry: ServiceEntry | Mapping[str, Any]) -> Any:
        service = entry.to_dict() if isinstance(entry, ServiceEntry) else dict(entry)
        for bookkeeping in ("create_revision", "mod_revision", "updated_at"):
            service.pop(bookkeeping, None)
        return self._call("register_service", {"service": service}, _entry)

    add_or_update = register_service

    def remove_service(self, service_name: str, host_id: str | None = None) -> Any:
        return self._call("remove_service", {"service_name": service_name, "host_id": host_id}, _entry)

    def set_state(self, service_name: str, state: ServiceState | str, host_id: str | None = None) -> Any:
        return self._call("set_state", {"service_name": service_name, "state": str(state), "host_id": host_id}, _entry)

    def heartbeat(self, service_name: str, host_id: str | None = None) -> Any:
        return self._call("heartbeat", {"service_name": service_name, "host_id": host_id}, _entry)

    def list_networks(self) -> Any:
        return self._call("list_networks")

    def get_topology(self) -> Any:
        return self._call("get_topology")

    def allocate_ip(self, owner: str, network: str | Location) -> Any:
        return self._call("allocate_ip", {"owner": owner, "network": str(network)})

    def release_ip(self, owner: str, network: str | None = None) -> Any:
        return self._call("release_ip", {"owner": owner, "network": network})

    def list_allocations(self, network: str | None = None) -> Any:
        return self._call("list_allocations", {"network": network})

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


class WsClient(_Actions):
    """The asyncio client. ``await WsClient.connect_tls("localhost:9443", tls, token=...)``."""

    def __init__(self, connection: ClientConnection, settings: ConnectionSettings) -> None:
        self._connection = connection
        self._settings = settings
        self._codec = ClientCodec()
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._events: asyncio.Queue[Event | RegistryError] = asyncio.Queue(maxsize=_EVENT_QUEUE)
        self._last_revision: dict[str, int] = {}
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
        settings = ConnectionSettings(registry_url(addr), tls_config or TlsClientConfig.default(), token, timeout)
        return await cls.connect(settings)

    @classmethod
    async def connect(cls, settings: ConnectionSettings) -> WsClient:
        try:
            connection = await connect(
                settings.url,
                ssl=settings.tls.ssl_context(),
                additional_headers=settings.headers(),
                open_timeout=settings.timeout,
                max_size=settings.max_message_size,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
            raise _connect_error(settings.url, exc) from None
        return cls(connection, settings)

    async def __aenter__(self) -> WsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._connection.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _call(
        self, action: str, params: Mapping[str, Any] | None = None, convert: Callable[[Any], Any] | None = None
    ) -> Any:
        request_id, frame = self._codec.encode_request(action, params)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._connection.send(frame)
            result = await asyncio.wait_for(future, self._settings.timeout)
        except ConnectionClosed as exc:
            raise ConnectionFailed(f"the connection to {self._settings.url} closed: {_describe(exc)}") from None
        except TimeoutError:
            raise ConnectionFailed(
                f"{action}: no answer from {self._settings.url} in {self._settings.timeout} s"
            ) from None
        finally:
            self._pending.pop(request_id, None)
        return convert(result) if convert is not None else result

    async def _read(self) -> None:
        closed: BaseException | None = None
        try:
            async for frame in self._connection:
                message = self._codec.decode(frame)
                if isinstance(message, EventMessage):
                    self._last_revision[message.subscription] = message.event.revision
                    await self._events.put(message.event)
                elif isinstance(message, JobMessage):
                    self._job_queue(message.job).put_nowait(message)
                elif isinstance(message, Response):
                    self._resolve(message.id, result=message.result)
                elif message.id is not None:
                    self._resolve(message.id, error=message.error)
                else:  # an error about a subscription (e.g. lagged): surfaces at next_event
                    await self._events.put(message.error)
        except ConnectionClosed as exc:
            closed = exc
        except RegistryError as exc:
            # A frame we cannot read: the stream cannot be trusted any more. Close it so
            # later calls fail at once instead of waiting for answers nobody will read.
            closed = exc
            await self._connection.close(1002, "unreadable frame")
        finally:
            failure = ConnectionFailed(f"the connection to {self._settings.url} closed: {_describe(closed)}")
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(failure)
            self._events.put_nowait(failure) if not self._events.full() else None
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
                item = await asyncio.wait_for(queue.get(), timeout)
                if isinstance(item, RegistryError):
                    raise item
                yield item
                if item.event == "finished":
                    return
        finally:
            self._jobs.pop(job, None)

    def _resolve(self, request_id: str, *, result: Any = None, error: RegistryError | None = None) -> None:
        future = self._pending.get(request_id)
        if future is None or future.done():
            log.debug("a response to unknown request %s", request_id)
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    async def subscribe(
        self,
        events: Iterable[EventType | str] | None = None,
        *,
        since_revision: int | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> str:
        """Subscribe; returns the subscription id. Events arrive through :meth:`next_event`."""
        result = await self._call("subscribe", self._subscribe_params(events, since_revision, filter))
        self._last_revision[result["subscription"]] = result["revision"]
        return result["subscription"]

    async def unsubscribe(self, subscription: str) -> None:
        await self._call("unsubscribe", {"subscription": subscription})
        self._last_revision.pop(subscription, None)

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event of any subscription on this connection.

        Raises:
            SubscriptionLagged: the server dropped a subscription that fell behind.
            ConnectionFailed: the connection closed.
        """
        item = await asyncio.wait_for(self._events.get(), timeout)
        if isinstance(item, RegistryError):
            raise item
        return item

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
    ) -> AsyncIterator[Event]:
        """Events forever, across reconnects: each reconnect resumes from the last revision
        seen, so every event arrives exactly once (or ``Compacted`` is raised)."""
        last = since_revision
        wanted = list(events) if events is not None else None
        delay = retry_delay
        while True:
            try:
                client = await cls.connect(settings)
            except ConnectionFailed as exc:
                log.warning("%s; retrying in %.1f s", exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_retry_delay)
                continue
            delay = retry_delay
            try:
                subscription = await client.subscribe(wanted, since_revision=last, filter=filter)
                last = client._last_revision[subscription]
                while True:
                    event = await client.next_event()
                    last = event.revision
                    yield event
            except ConnectionFailed as exc:
                log.warning("%s; reconnecting and resuming after revision %s", exc.message, last)
            except Compacted:
                raise
            finally:
                await client.close()


def _connect_error(url: str, exc: BaseException) -> RegistryError:
    """The error for a failed connection attempt; a refused token is not a network problem."""
    if isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403):
        error_class = Unauthorized if exc.response.status_code == 401 else Forbidden
        return error_class(f"{url} refused the connection: {_describe(exc)}")
    return ConnectionFailed(f"cannot connect to {url}: {_describe(exc)}")


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd or exc.sent
        return f"code {frame.code} {frame.reason!r}" if frame else "no close frame"
    if isinstance(exc, InvalidStatus):
        body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
        return f"HTTP {exc.response.status_code} {body}".strip()
    return str(exc) or type(exc).__name__


class BlockingClient(_Actions):
    """The blocking client, for threads and for the Ansible plugins.

    One call at a time per client (a lock serialises them). Events that arrive while a
    call waits for its answer are kept for :meth:`next_event`.
    """

    def __init__(self, settings: ConnectionSettings) -> None:
        self._settings = settings
        self._codec = ClientCodec()
        self._lock = threading.Lock()
        self._events: deque[Event | RegistryError] = deque()
        self._job_messages: deque[JobMessage] = deque()
        # websockets >= 17.1 wants connect() used as a context manager; the stack keeps it open until close().
        self._stack = contextlib.ExitStack()
        try:
            self._connection: SyncConnection = self._stack.enter_context(
                sync_connect(
                    settings.url,
                    ssl=settings.tls.ssl_context(),
                    additional_headers=settings.headers(),
                    open_timeout=settings.timeout,
                    max_size=settings.max_message_size,
                )
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
            raise _connect_error(settings.url, exc) from None

    @classmethod
    def connect_tls(
        cls, addr: str, tls_config: TlsClientConfig | None = None, *, token: str | None = None, timeout: float = 10.0
    ) -> BlockingClient:
        return cls(ConnectionSettings(registry_url(addr), tls_config or TlsClientConfig.default(), token, timeout))

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def _receive(self, timeout: float | None) -> Response | ErrorMessage | EventMessage | JobMessage:
        try:
            frame = self._connection.recv(timeout=timeout)
        except ConnectionClosed as exc:
            raise ConnectionFailed(f"the connection to {self._settings.url} closed: {_describe(exc)}") from None
        return self._codec.decode(frame)

    def _call(
        self, action: str, params: Mapping[str, Any] | None = None, convert: Callable[[Any], Any] | None = None
    ) -> Any:
        request_id, frame = self._codec.encode_request(action, params)
        with self._lock:
            try:
                self._connection.send(frame)
            except ConnectionClosed as exc:
                raise ConnectionFailed(f"the connection to {self._settings.url} closed: {_describe(exc)}") from None
            while True:
                try:
                    message = self._receive(self._settings.timeout)
                except TimeoutError:
                    raise ConnectionFailed(
                        f"{action}: no answer from {self._settings.url} in {self._settings.timeout} s"
                    ) from None
                if not isinstance(message, (Response, ErrorMessage)) or message.id != request_id:
                    self._stash(message)
                elif isinstance(message, ErrorMessage):
                    raise message.error
                else:
                    return convert(message.result) if convert is not None else message.result

    def subscribe(
        self,
        events: Iterable[EventType | str] | None = None,
        *,
        since_revision: int | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> str:
        return self._call("subscribe", self._subscribe_params(events, since_revision, filter))["subscription"]

    def unsubscribe(self, subscription: str) -> None:
        self._call("unsubscribe", {"subscription": subscription})

    def _stash(self, message: Response | ErrorMessage | EventMessage | JobMessage) -> None:
        """Keep what arrived while waiting for something else: events, subscription errors, job messages."""
        if isinstance(message, EventMessage):
            self._events.append(message.event)
        elif isinstance(message, JobMessage):
            self._job_messages.append(message)
        elif isinstance(message, ErrorMessage) and message.id is None:
            self._events.append(message.error)

    def _next_kept(self, kept: deque[Any], timeout: float | None) -> Any:
        with self._lock:
            while not kept:
                try:
                    self._stash(self._receive(timeout))
                except TimeoutError:
                    return None
            return kept.popleft()

    def next_job_message(self, timeout: float | None = None) -> JobMessage | None:
        """The next deploy job message (progress, then ``finished``), or None after ``timeout`` seconds."""
        return self._next_kept(self._job_messages, timeout)

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds."""
        item = self._next_kept(self._events, timeout)
        if isinstance(item, RegistryError):
            raise item
        return item


class TrioClient(_Actions):
    """The trio client, on ``websockets.trio``. ``async with TrioClient.connect_tls(...) as c:``."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self._settings = settings
        self._codec = ClientCodec()
        self._connection: Any = None
        self._pending: dict[str, Any] = {}
        self._results: dict[str, Response | ErrorMessage] = {}
        self._events_send: Any = None
        self._events_receive: Any = None
        self._jobs_send: Any = None
        self._jobs_receive: Any = None
        self._stack = contextlib.AsyncExitStack()

    @classmethod
    def connect_tls(
        cls, addr: str, tls_config: TlsClientConfig | None = None, *, token: str | None = None, timeout: float = 10.0
    ) -> TrioClient:
        return cls(ConnectionSettings(registry_url(addr), tls_config or TlsClientConfig.default(), token, timeout))

    async def __aenter__(self) -> TrioClient:
        import trio
        from websockets.trio.client import connect as trio_connect

        # websockets.trio's connect() is only an async context manager: it runs the connection's
        # tasks in a nursery of its own. Ours runs the reader; both are left in __aexit__.
        try:
            self._connection = await self._stack.enter_async_context(
                trio_connect(
                    self._settings.url,
                    ssl=self._settings.tls.ssl_context(),
                    additional_headers=self._settings.headers(),
                    open_timeout=self._settings.timeout,
                    max_size=self._settings.max_message_size,
                )
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
            await self._stack.aclose()
            raise _connect_error(self._settings.url, exc) from None
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
                message = self._codec.decode(frame)
                if isinstance(message, EventMessage):
                    await self._events_send.send(message.event)
                elif isinstance(message, JobMessage):
                    await self._jobs_send.send(message)
                elif message.id is None:
                    await self._events_send.send(message.error)
                elif message.id in self._pending:
                    self._results[message.id] = message
                    self._pending.pop(message.id).set()
        except ConnectionClosed:
            pass
        except RegistryError as exc:  # the server sent something we cannot read: surfaces at next_event
            with trio.CancelScope(shield=True):
                await self._connection.aclose()
            with contextlib.suppress(trio.WouldBlock):
                self._events_send.send_nowait(exc)
        finally:
            for waiter in self._pending.values():
                waiter.set()
            with trio.CancelScope(shield=True):
                await self._events_send.aclose()
                await self._jobs_send.aclose()

    async def _call(
        self, action: str, params: Mapping[str, Any] | None = None, convert: Callable[[Any], Any] | None = None
    ) -> Any:
        import trio

        request_id, frame = self._codec.encode_request(action, params)
        done = trio.Event()
        self._pending[request_id] = done
        try:
            await self._connection.send(frame)
            with trio.fail_after(self._settings.timeout):
                await done.wait()
        except ConnectionClosed as exc:
            raise ConnectionFailed(f"the connection to {self._settings.url} closed: {_describe(exc)}") from None
        except trio.TooSlowError:
            raise ConnectionFailed(
                f"{action}: no answer from {self._settings.url} in {self._settings.timeout} s"
            ) from None
        finally:
            self._pending.pop(request_id, None)
        message = self._results.pop(request_id, None)
        if message is None:
            raise ConnectionFailed(f"the connection to {self._settings.url} closed before {action} was answered")
        if isinstance(message, ErrorMessage):
            raise message.error
        return convert(message.result) if convert is not None else message.result

    async def subscribe(
        self,
        events: Iterable[EventType | str] | None = None,
        *,
        since_revision: int | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> str:
        result = await self._call("subscribe", self._subscribe_params(events, since_revision, filter))
        return result["subscription"]

    async def unsubscribe(self, subscription: str) -> None:
        await self._call("unsubscribe", {"subscription": subscription})

    async def next_event(self) -> Event:
        import trio

        try:
            item = await self._events_receive.receive()
        except trio.EndOfChannel:
            raise ConnectionFailed(f"the connection to {self._settings.url} closed") from None
        if isinstance(item, RegistryError):
            raise item
        return item

    async def next_job_message(self) -> JobMessage:
        """The next deploy job message (of any job this connection watches)."""
        import trio

        try:
            return await self._jobs_receive.receive()
        except trio.EndOfChannel:
            raise ConnectionFailed(f"the connection to {self._settings.url} closed") from None
