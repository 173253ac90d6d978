"""The registry's event log: revisions, retention and fan-out to subscribers.

Each change the registry makes is appended here with the next revision and written to
the store's ``events`` table in the same transaction as the change. It stays *pending*
until the registry has committed that transaction; :meth:`EventLog.publish` then hands
it, in revision order, to every subscriber that wants it, and keeps the last
``retention`` events so a subscriber can resume from a revision.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Final

import msgspec

from .events import Event, EventType, Subscription, parse_event_types
from .exceptions import Compacted, StoreError, ValidationError
from .query import ServiceQuery
from .schema import convert
from .store import Store

__all__ = ["DEFAULT_EVENT_RETENTION", "DEFAULT_SUBSCRIPTION_QUEUE", "EventLog"]

DEFAULT_EVENT_RETENTION: Final = 10_000
DEFAULT_SUBSCRIPTION_QUEUE: Final = 1_000

_Positive = Annotated[int, msgspec.Meta(ge=1)]
_Revision = Annotated[int, msgspec.Meta(ge=0)]


def _event_key(revision: int) -> str:
    return f"{revision:020d}"


class EventLog:
    """Events on their way from the store to the subscribers.

    :meth:`append` is called under the registry's lock; :meth:`publish`,
    :meth:`subscribe` and the rest are safe from any thread.

    Args:
        store: where the ``events`` table lives.
        retention: how many recent events are kept for resuming subscribers.
        wall_clock: epoch seconds, for event timestamps.
    """

    def __init__(self, store: Store, *, retention: int, wall_clock: Callable[[], float]) -> None:
        self._store = store
        self._retention = convert(retention, _Positive, path="event_retention")
        self._wall_clock = wall_clock
        self._written = 0
        self._trimmed_below = 0
        # Events move: _pending (written, not yet durable) -> _retained (published).
        self._pending: deque[Event] = deque()
        self._retained: deque[Event] = deque(maxlen=self._retention)
        self._published = 0
        self._lock = threading.RLock()
        self._subscribers: dict[str, Subscription] = {}
        self._snapshot: tuple[Subscription, ...] = ()
        self._closed = False

    def load(self, *, revision: int) -> None:
        """Read the retained events; ``revision`` is the highest one the services carry."""
        events = [Event.from_dict(value) for _, value in self._store.scan("events")]
        if events:
            self._retained.extend(events[-self._retention :])
            revision = max(revision, events[-1].revision)
            self._trimmed_below = self._retained[0].revision
        self._written = self._published = revision

    @property
    def published(self) -> int:
        """The revision of the last durable (published) event."""
        return self._published

    @property
    def next_revision(self) -> int:
        """The revision the next :meth:`append` gets."""
        return self._written + 1

    def append(self, event_type: EventType, data: dict[str, Any]) -> Event:
        """Write the next revision's event to the store and queue it for publishing."""
        revision = self._written + 1
        event = Event(event_type, revision, data, self._wall_clock())
        self._store.put("events", _event_key(revision), event.to_dict())
        self._written = revision
        self._pending.append(event)
        # Trim the stored log in batches, not one delete per write.
        horizon = revision - self._retention + 1
        if horizon - self._trimmed_below >= max(1, self._retention // 10):
            self._store.delete_below("events", _event_key(horizon))
            self._trimmed_below = horizon
        return event

    def publish(self, revision: int) -> None:
        """Hand every event up to ``revision`` (now committed) to the subscribers, in order."""
        with self._lock:
            while self._pending and self._pending[0].revision <= revision:
                event = self._pending.popleft()
                self._retained.append(event)
                self._published = event.revision
                for subscription in self._snapshot:
                    if subscription.wants(event):
                        subscription.offer(event)

    def subscribe(
        self,
        event_types: Iterable[EventType | str] | None,
        *,
        since_revision: int | None,
        query: ServiceQuery | Mapping[str, Any] | None,
        maxsize: int,
    ) -> Subscription:
        """A new subscription; with ``since_revision`` the retained events after it come first.

        Raises:
            Compacted: ``since_revision`` is older than the oldest retained event.
            ValidationError: bad types, filter, revision or queue size.
            StoreError: the log is closed.
        """
        types = parse_event_types(event_types)
        wanted = ServiceQuery.parse(query)
        maxsize = convert(maxsize, _Positive, path="maxsize")
        if since_revision is not None:
            since_revision = convert(since_revision, _Revision, path="since_revision")
        subscription = Subscription(types, query=wanted, maxsize=maxsize, on_close=self._forget)
        with self._lock:
            if self._closed:
                raise StoreError("the registry is closed")
            current = self._published
            if since_revision is None:
                subscription._preload([], current)
            else:
                self._check_resumable(since_revision, current)
                backlog = [e for e in self._retained if e.revision > since_revision and subscription.wants(e)]
                subscription._preload(backlog, since_revision)
            self._subscribers[subscription.id] = subscription
            self._snapshot = tuple(self._subscribers.values())
        return subscription

    def _check_resumable(self, since_revision: int, current: int) -> None:
        oldest = self._retained[0].revision if self._retained else current + 1
        if since_revision > current:
            raise ValidationError(
                f"since_revision {since_revision} is ahead of the registry's revision {current}",
                field="since_revision",
            )
        if since_revision < oldest - 1:
            raise Compacted(
                f"revision {since_revision} has been compacted; the oldest retained event is {oldest}",
                oldest_revision=oldest,
                requested_revision=since_revision,
            )

    def get(self, subscription_id: str) -> Subscription | None:
        return self._subscribers.get(subscription_id)

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._snapshot)

    def _forget(self, subscription: Subscription) -> None:
        with self._lock:
            if self._subscribers.pop(subscription.id, None) is not None:
                self._snapshot = tuple(self._subscribers.values())

    def close(self, reason: str) -> None:
        """Refuse new subscriptions and close every open one with ``reason``."""
        with self._lock:
            self._closed = True
        for subscription in self._snapshot:
            subscription.close(reason)
