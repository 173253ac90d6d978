"""Events and subscriptions.

Every change in the registry gets the next global revision and produces exactly one
:class:`Event`. Subscribers read events from a :class:`Subscription`: a bounded queue
that can be read blocking (threads), or awaited from asyncio or trio without blocking
the loop.

A subscriber that does not keep up never slows the registry or the other subscribers:
when its queue is full, it is closed as *lagged*. It still drains the events it has
(they are in order, with no gap), then :meth:`Subscription.get` raises
:class:`SubscriptionLagged` carrying the last revision it received, from which it
can resume with ``subscribe(..., since_revision=...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from .exceptions import SubscriptionClosed, SubscriptionLagged, ValidationError
from .model import Allocation, ServiceEntry, Topology
from .query import ServiceQuery
from .schema import convert

__all__ = [
    "Event",
    "EventFilter",
    "EventType",
    "Subscription",
    "parse_event_types",
]


class EventType(enum.StrEnum):
    SERVICE_REGISTERED = "ServiceRegistered"
    SERVICE_UPDATED = "ServiceUpdated"
    SERVICE_REMOVED = "ServiceRemoved"
    SERVICE_STATE_CHANGED = "ServiceStateChanged"
    NETWORK_TOPOLOGY_CHANGED = "NetworkTopologyChanged"
    ENDPOINT_CHANGED = "EndpointChanged"
    IP_ALLOCATED = "IpAllocated"
    IP_RELEASED = "IpReleased"


ALLOCATION_EVENTS: Final = frozenset({EventType.IP_ALLOCATED, EventType.IP_RELEASED})
SERVICE_EVENTS: Final = frozenset(EventType) - {EventType.NETWORK_TOPOLOGY_CHANGED} - ALLOCATION_EVENTS


def parse_event_types(values: Iterable[EventType | str] | None) -> frozenset[EventType]:
    """Event types from names; ``None`` or an empty list means every type."""
    if values is None:
        return _EVERY_TYPE
    return convert(values, frozenset[EventType], path="events") or _EVERY_TYPE


_EVERY_TYPE: Final = frozenset(EventType)


@dataclass(frozen=True, slots=True)
class Event:
    """One change, at one revision.

    ``data`` is JSON-able. Service events carry ``data["service"]`` (the entry after the
    change; for ``ServiceRemoved`` the entry as it was), plus ``changes`` (the names of
    the fields that changed) and ``previous`` (their old values) for updates.
    ``IpAllocated``/``IpReleased`` carry ``data["allocation"]`` and a ``reason``;
    ``NetworkTopologyChanged`` carries ``data["topology"]`` (and, after a reload of the
    networks file, ``data["networks"]``: the names ``added``, ``removed``, ``changed``).

    The typed views :attr:`service`, :attr:`allocation` and :attr:`topology` decode the data
    (None when the event carries none); :attr:`subscription` is the id of the subscription it
    was delivered for (None straight from the registry's log).
    """

    type: EventType
    revision: int
    data: Mapping[str, Any]
    timestamp: float
    subscription: str | None = None

    @property
    def service_data(self) -> Mapping[str, Any] | None:
        """The service entry this event is about in its wire form (None for other events)."""
        return self.data.get("service")

    @property
    def allocation_data(self) -> Mapping[str, Any] | None:
        """The allocation of an ``IpAllocated``/``IpReleased`` event in its wire form."""
        return self.data.get("allocation")

    @property
    def service(self) -> ServiceEntry | None:
        """The service entry this event is about (None for other events)."""
        data = self.data.get("service")
        return ServiceEntry.from_dict(data) if data is not None else None

    @property
    def allocation(self) -> Allocation | None:
        """The allocation of an ``IpAllocated``/``IpReleased`` event (None for other events)."""
        data = self.data.get("allocation")
        return Allocation.from_dict(data) if data is not None else None

    @property
    def topology(self) -> Topology | None:
        """The topology of a ``NetworkTopologyChanged`` event (None for other events, or none detected yet)."""
        data = self.data.get("topology")
        return Topology.from_dict(data) if isinstance(data, Mapping) else None

    def delivered(self, subscription: str) -> Event:
        """This event as delivered for ``subscription``."""
        return Event(self.type, self.revision, self.data, self.timestamp, subscription)

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.type.value, "revision": self.revision, "timestamp": self.timestamp, "data": self.data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        try:
            return cls(EventType(data["event"]), int(data["revision"]), data["data"], float(data["timestamp"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"not an event record: {exc}", field="event") from None


EventFilter = ServiceQuery
"""The former name of :class:`~registry.query.ServiceQuery` for subscriptions."""


_subscription_ids = itertools.count(1)


class Subscription:
    """A bounded, ordered queue of events for one subscriber.

    Created by ``Registry.subscribe``; thread-safe. Read it with :meth:`get`
    (blocking, with an optional timeout), iterate it, or ``await`` :meth:`next_event`
    from asyncio or trio.
    """

    def __init__(
        self,
        event_types: frozenset[EventType],
        *,
        query: ServiceQuery,
        maxsize: int,
        on_close: Callable[[Subscription], None] | None = None,
    ) -> None:
        self.id = f"sub-{next(_subscription_ids)}"
        self.event_types = event_types
        self.query = query
        self._everything = query.is_everything
        self.maxsize = maxsize
        self._queue: deque[Event] = deque()
        self._limit = maxsize
        self._cond = threading.Condition(threading.Lock())
        self._wakers: set[Callable[[], None]] = set()
        self._closed_reason: str | None = None
        self._lagged = False
        self._on_close = on_close
        self.last_revision = 0
        """The revision of the last event handed to the reader."""
        self.created_at = time.time()

    # --- producer side (the registry) ---------------------------------------------

    def wants(self, event: Event) -> bool:
        """Topology events carry no service: a query does not apply to them."""
        if event.type not in self.event_types:
            return False
        if self._everything:
            return True
        service = event.service_data
        if service is not None:
            return self.query.matches(service)
        allocation = event.allocation_data
        return allocation is None or self.query.matches_allocation(allocation)

    def _preload(self, backlog: list[Event], last_revision: int) -> None:
        """Queue the resume backlog; it does not count against ``maxsize``."""
        self._queue.extend(backlog)
        self._limit = self.maxsize + len(backlog)
        self.last_revision = last_revision

    def offer(self, event: Event) -> bool:
        """Queue ``event`` without blocking; on overflow close as lagged. False once closed."""
        with self._cond:
            if self._closed_reason is not None:
                return False
            if len(self._queue) >= self._limit:
                self._lagged = True
                self._closed_reason = (
                    f"subscriber lagged: its queue of {self.maxsize} events was full at revision {event.revision}"
                )
                accepted = False
            else:
                self._queue.append(event)
                accepted = True
            self._wake()
        if not accepted and self._on_close is not None:
            self._on_close(self)
        return accepted

    def _wake(self) -> None:
        self._cond.notify_all()
        for waker in list(self._wakers):
            waker()

    # --- consumer side ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def lagged(self) -> bool:
        return self._lagged

    @property
    def close_reason(self) -> str | None:
        return self._closed_reason

    def pending(self) -> int:
        """How many events wait in the queue."""
        return len(self._queue)

    def _take(self, *, shared: bool = False) -> Event | None:
        """Pop the next event (as delivered for this subscription, or ``shared``: the log's own
        object); raise if closed and drained. Caller holds the lock."""
        if self._queue:
            event = self._queue.popleft()
            self.last_revision = event.revision
            return event if shared else event.delivered(self.id)
        if self._closed_reason is not None:
            if self._lagged:
                raise SubscriptionLagged(
                    f"{self._closed_reason}; resume with since_revision={self.last_revision}",
                    last_revision=self.last_revision,
                )
            raise SubscriptionClosed(f"subscription {self.id} is closed: {self._closed_reason}")
        return None

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (None: forever).

        Returns None on timeout.

        Raises:
            SubscriptionLagged: the queue overflowed and every queued event was read.
            SubscriptionClosed: the subscription was closed and every queued event was read.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                event = self._take()
                if event is not None:
                    return event
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def get_nowait(self) -> Event | None:
        with self._cond:
            return self._take()

    def __iter__(self) -> Iterator[Event]:
        """Events until the subscription is closed (lag still raises)."""
        while True:
            try:
                event = self.get()
            except SubscriptionClosed:
                return
            if event is not None:
                yield event

    async def next_event(self, timeout: float | None = None) -> Event:
        """Await the next event from asyncio or trio without blocking the loop.

        Raises:
            TimeoutError: ``timeout`` seconds passed without one (None: wait forever).
            SubscriptionLagged, SubscriptionClosed: as :meth:`get`, once drained.
        """
        if timeout is None:
            return await self._next(shared=False)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # trio (the waiter below says so if it is neither)
            import trio

            with trio.move_on_after(timeout):
                return await self._next(shared=False)
            raise TimeoutError(f"no event within {timeout} s") from None
        async with asyncio.timeout(timeout):
            return await self._next(shared=False)

    async def next_shared(self) -> Event:
        """:meth:`next_event` without the per-subscription copy (``.subscription`` is None): the
        server encodes one event once for all its subscriptions."""
        return await self._next(shared=True)

    async def _next(self, *, shared: bool) -> Event:
        while True:
            with self._cond:
                event = self._take(shared=shared)
                if event is not None:
                    return event
                waiter = self._waiter()
            await self._wait(*waiter)

    async def changed(self) -> None:
        """Await the next offer or the close (at once when closed); reads nothing."""
        with self._cond:
            if self._closed_reason is not None:
                return
            waiter = self._waiter()
        await self._wait(*waiter)

    def _waiter(self) -> tuple[Callable[[], Any], Callable[[], None]]:
        """A waiter woken by the next offer or close. Caller holds the lock."""
        wait, waker = _async_waiter()
        self._wakers.add(waker)
        return wait, waker

    async def _wait(self, wait: Callable[[], Any], waker: Callable[[], None]) -> None:
        try:
            await wait()
        finally:
            with self._cond:
                self._wakers.discard(waker)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Event]:
        while True:
            try:
                yield await self.next_event()
            except SubscriptionClosed:
                return

    def close(self, reason: str = "closed by the subscriber") -> None:
        """Stop receiving; events already queued can still be read."""
        with self._cond:
            if self._closed_reason is not None:
                return
            self._closed_reason = reason
            self._wake()
        if self._on_close is not None:
            self._on_close(self)

    def __repr__(self) -> str:
        state = f"closed: {self._closed_reason}" if self.closed else "open"
        return f"<Subscription {self.id} {state}, {len(self._queue)} queued, last revision {self.last_revision}>"


def _async_waiter() -> tuple[Callable[[], Any], Callable[[], None]]:
    """A (wait coroutine function, thread-safe waker) pair for the running async library."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return _trio_waiter()
    future: asyncio.Future[None] = loop.create_future()
    wakeups = _LoopWakeups.of(loop)

    def wake() -> None:
        wakeups.add(future)

    async def wait() -> None:
        await future

    return wait, wake


class _LoopWakeups:
    """The futures to resolve on one asyncio loop, handed over in bursts.

    One published event wakes every subscriber on the loop, from the thread that committed it:
    a ``call_soon_threadsafe`` per subscriber would be a thousand handovers for a thousand
    subscribers. Here the first wake of a burst schedules one callback and the others join it.
    """

    _by_loop: Final[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWakeups]] = weakref.WeakKeyDictionary()
    _created: Final = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._due: list[asyncio.Future[None]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _LoopWakeups:
        wakeups = cls._by_loop.get(loop)
        if wakeups is None:
            with cls._created:
                wakeups = cls._by_loop.setdefault(loop, cls(loop))
        return wakeups

    def add(self, future: asyncio.Future[None]) -> None:
        with self._lock:
            self._due.append(future)
            if len(self._due) > 1:
                return  # the callback of this burst is scheduled and has not run yet
        try:
            self._loop.call_soon_threadsafe(self._resolve)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            with self._lock:
                self._due.clear()

    def _resolve(self) -> None:
        with self._lock:
            due, self._due = self._due, []
        for future in due:
            if not future.done():
                future.set_result(None)


def _trio_waiter() -> tuple[Callable[[], Any], Callable[[], None]]:
    try:
        import trio
    except ImportError:
        raise RuntimeError("next_event() needs a running asyncio or trio event loop") from None
    try:
        token = trio.lowlevel.current_trio_token()
    except RuntimeError:
        raise RuntimeError("next_event() needs a running asyncio or trio event loop") from None
    ready = trio.Event()

    def wake() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(ready.set)

    return ready.wait, wake
