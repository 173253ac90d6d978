"""The registry: service instances, revisions, events, TTLs. No sockets, no event loop.

Every change gets the next value of one global, monotonically increasing revision
(as in etcd), stored with the entry (``create_revision``, ``mod_revision``), and
produces exactly one event. A change is durable when the call returns: the entry and
its event are written to the store in one transaction and committed (group commit:
concurrent writers share one fsync). Events reach subscribers only after they are
durable, in revision order.

Methods are plain synchronous calls, safe from any thread. Reads never touch the
disk. Writes wait for the commit (an fsync), so an event loop should call them in a
worker thread (``asyncio.to_thread``); reads are fine inline.

Which event an update produces (exactly one):

* a new instance                          -> ``ServiceRegistered``
* the state changed (maybe with others)   -> ``ServiceStateChanged``
* else the endpoints changed              -> ``EndpointChanged``
* else anything else changed              -> ``ServiceUpdated``
* removal (or deregistration after TTL)   -> ``ServiceRemoved``
* an update that changes nothing          -> no event, no revision

``data["changes"]`` lists every field that changed and ``data["previous"]`` their old
values, so a subscriber of ``ServiceStateChanged`` also learns about endpoints that
changed in the same update.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .eventlog import DEFAULT_EVENT_RETENTION, DEFAULT_SUBSCRIPTION_QUEUE, EventLog
from .events import Event, EventType, Subscription
from .exceptions import ServiceNotFound, StoreError, ValidationError
from .model import (
    CONTENT_FIELDS,
    EndpointRecord,
    InstanceKey,
    NetworkInfo,
    ServiceEntry,
    ServiceState,
    validate_host_id,
    validate_service_name,
)
from .query import ServiceQuery
from .schema import convert
from .store import MemoryStore, SqliteStore, Store
from .timers import Deadline, Reaper, Timers

if TYPE_CHECKING:
    import os

    from .network import Network, NetworkConfig

__all__ = ["DEFAULT_EVENT_RETENTION", "EndpointRecord", "Registry"]

log = logging.getLogger(__name__)

_K = TypeVar("_K", str, InstanceKey)


def _service_key(key: InstanceKey) -> str:
    return f"{key[0]}/{key[1]}"


def _content(entry: ServiceEntry) -> tuple[Any, ...]:
    return tuple(getattr(entry, name) for name in CONTENT_FIELDS)


def _instance_order(entry: ServiceEntry) -> tuple[bool, int, str]:
    """Sort key for choosing an instance: running first, then nearest, then host id."""
    return (entry.state is not ServiceState.RUNNING, entry.location.distance, entry.host_id)


def _on_host(name: str, instances: Mapping[str, ServiceEntry], host_id: str) -> ServiceEntry:
    entry = instances.get(host_id)
    if entry is None:
        raise ServiceNotFound(
            f"service {name!r} is not registered on host {host_id!r}",
            details={"service_name": name, "host_id": host_id},
        )
    return entry


class Registry:
    """Service instances with revisions and events.

    Args:
        store: where state lives; default an in-memory store (nothing survives).
        networks: the configured networks; when given, an entry's address is checked
            against them and ``network_info.network`` is filled in.
        event_retention: how many recent events are kept for resuming subscribers.
        clock: monotonic seconds, for TTLs (injectable for tests).
        wall_clock: epoch seconds, for ``updated_at`` and event timestamps.
    """

    def __init__(
        self,
        *,
        store: Store | None = None,
        networks: NetworkConfig | None = None,
        event_retention: int = DEFAULT_EVENT_RETENTION,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store if store is not None else MemoryStore()
        self._events = EventLog(self._store, retention=event_retention, wall_clock=wall_clock)
        self._networks = networks
        self._clock = clock
        self._wall_clock = wall_clock

        self._lock = threading.Lock()
        self._services: dict[InstanceKey, ServiceEntry] = {}
        self._by_name: dict[str, dict[str, ServiceEntry]] = {}
        self._by_host: dict[str, dict[str, ServiceEntry]] = {}
        self._hosts_by_ip: dict[str, dict[InstanceKey, str]] = {}
        self._topology: Mapping[str, Any] | None = None

        self._timers = Timers()
        self._ttl_failed: set[InstanceKey] = set()
        self._reaper: Reaper | None = None
        self._closed = False

        self._load()

    # --- construction -------------------------------------------------------------

    @classmethod
    def with_persistence(cls, path: str | os.PathLike[str], *, synchronous: str = "FULL", **options: Any) -> Registry:
        """A registry on the embedded store at ``path``, created if missing."""
        return cls(store=SqliteStore(path, create=True, synchronous=synchronous), **options)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, synchronous: str = "FULL", **options: Any) -> Registry:
        """A registry on an existing store; fails clearly if it is missing or not ours."""
        if not Path(path).exists():
            raise StoreError(f"no registry store at {path}")
        return cls(store=SqliteStore(path, create=False, synchronous=synchronous), **options)

    def _load(self) -> None:
        now = self._clock()
        revision = 0
        # Loading builds hundreds of thousands of long-lived objects: the cyclic GC would
        # rescan them over and over (a third of the load time) and can find no garbage.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for _, entry in self._store.scan("services", as_type=ServiceEntry):
                self._index(entry)
                revision = max(revision, entry.mod_revision)
                # TTLs restart on load: every instance gets a full TTL of grace (as Consul does).
                self._timers.arm(entry, now)
        finally:
            if gc_was_enabled:
                gc.enable()
        self._events.load(revision=revision)
        topology = self._store.get("meta", "topology")
        self._topology = topology if isinstance(topology, Mapping) else None
        log.debug("loaded %d services at revision %d", len(self._services), self._events.published)

    # --- reads --------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The revision of the last durable change."""
        return self._events.published

    @property
    def networks(self) -> NetworkConfig | None:
        return self._networks

    @property
    def store(self) -> Store:
        return self._store

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._services)

    def hosts_at(self, ip: str) -> set[str]:
        """The host ids of instances registered with the address ``ip``."""
        with self._lock:
            return set(self._hosts_by_ip.get(ip, {}).values())

    def get_service(self, name: str, host_id: str | None = None) -> ServiceEntry:
        """One instance of ``name``: on ``host_id``, or the best one.

        Without a host, a running instance is preferred, then the nearest location
        (local, lan, wireguard), then the host id (for a stable answer).

        Raises:
            ServiceNotFound: no such instance.
        """
        validate_service_name(name)
        with self._lock:
            instances = self._instances_of(name)
            if host_id is None:
                return min(instances.values(), key=_instance_order)
            return _on_host(name, instances, host_id)

    def list_services(
        self, query: ServiceQuery | Mapping[str, Any] | None = None, **filters: Any
    ) -> list[ServiceEntry]:
        """Instances matching ``query``, or the same filters given as keywords
        (``service_name=``, ``location=``, ... see :class:`ServiceQuery`), sorted by service
        name then host.

        Raises:
            ValidationError: a bad filter (``filter.location: must be one of ...``).
        """
        if query is not None and filters:
            raise ValidationError(f"give the filters as query= or as keywords, not both ({', '.join(filters)})")
        wanted = ServiceQuery.parse(query if query is not None else filters)
        with self._lock:
            if wanted.service_name is not None:
                candidates = list(self._by_name.get(wanted.service_name, {}).values())
            elif wanted.host_id is not None:
                candidates = list(self._by_host.get(wanted.host_id, {}).values())
            else:
                candidates = list(self._services.values())
        matches = candidates if wanted.is_everything else [entry for entry in candidates if wanted.matches(entry)]
        matches.sort(key=lambda entry: entry.key)
        return matches

    def list_endpoints(
        self, query: ServiceQuery | Mapping[str, Any] | None = None, **filters: Any
    ) -> list[EndpointRecord]:
        """Every endpoint of every instance matching the query (as for list_services)."""
        return [record for entry in self.list_services(query, **filters) for record in EndpointRecord.of(entry)]

    def topology(self) -> Mapping[str, Any] | None:
        """The last topology recorded with :meth:`update_topology`."""
        return self._topology

    # --- writes -------------------------------------------------------------------

    def add_or_update(self, entry: ServiceEntry | Mapping[str, Any]) -> ServiceEntry:
        """Register an instance or update it; returns it as stored (with revisions).

        An identical re-registration changes nothing (no revision, no event) but
        counts as a heartbeat.
        """
        return self.add_or_update_many([entry])[0]

    def add_or_update_many(self, entries: Iterable[ServiceEntry | Mapping[str, Any]]) -> list[ServiceEntry]:
        """:meth:`add_or_update` for many entries with one commit (one fsync).

        Every entry is validated before any is written: one bad entry fails the call
        and changes nothing. Each change still gets its own revision and event.
        """
        return self._apply([self._place(item) for item in entries])

    def add_or_update_each(
        self, entries: Iterable[ServiceEntry | Mapping[str, Any]]
    ) -> list[ServiceEntry | ValidationError]:
        """:meth:`add_or_update` for many independent writers with one commit.

        Unlike :meth:`add_or_update_many`, a bad entry fails alone: its slot in the result
        holds the ``ValidationError`` and the others are applied (the server coalesces
        concurrent ``register_service`` requests this way).
        """
        outcomes, revision = self.stage_each(entries)
        if revision:
            self._make_durable(revision)
        return outcomes

    def stage_each(
        self, entries: Iterable[ServiceEntry | Mapping[str, Any]]
    ) -> tuple[list[ServiceEntry | ValidationError], int]:
        """:meth:`add_or_update_each` without waiting for the disk, for event loops.

        The entries are applied and written, not yet committed: returns the outcomes and the
        last revision written (0: nothing changed). Hand that revision to
        :meth:`make_durable_soon` and acknowledge nothing before it reports: until then the
        writes are not durable and their events are not published.
        """
        outcomes: list[ServiceEntry | ValidationError] = []
        placed: list[ServiceEntry] = []
        for item in entries:
            try:
                entry = self._place(item)
            except ValidationError as exc:
                outcomes.append(exc)
            else:
                outcomes.append(entry)
                placed.append(entry)
        stored_entries, revision = self._stage(placed)
        stored = iter(stored_entries)
        return [outcome if isinstance(outcome, ValidationError) else next(stored) for outcome in outcomes], revision

    def make_durable_soon(self, revision: int, done: Callable[[StoreError | None], None]) -> None:
        """Commit without blocking, publish every event up to ``revision``, then call ``done``
        (None, or the error that stopped the commit) from the thread that finished the commit."""

        def committed(error: StoreError | None) -> None:
            if error is None:
                self._events.publish(revision)
            done(error)

        self._store.commit_soon(committed)

    def check_commits(self) -> None:
        """Fail the pending :meth:`make_durable_soon` calls the store can no longer finish."""
        self._store.check_commits()

    def _apply(self, placed: list[ServiceEntry]) -> list[ServiceEntry]:
        """Write validated, placed entries in order with one commit; returns them as stored."""
        stored_entries, revision = self._stage(placed)
        if revision:
            self._make_durable(revision)
        return stored_entries

    def _stage(self, placed: list[ServiceEntry]) -> tuple[list[ServiceEntry], int]:
        """Write validated, placed entries in order, uncommitted: ``(as stored, last revision or 0)``."""
        stored_entries: list[ServiceEntry] = []
        last_revision = 0
        with self._lock:
            self._check_open()
            now = self._clock()
            for entry in placed:
                old = self._services.get(entry.key)
                if old is not None and _content(old) == _content(entry):
                    self._timers.arm(old, now, heartbeat=True)
                    stored_entries.append(old)
                    continue
                revision = self._events.next_revision
                stored = entry.stamped(
                    create_revision=old.create_revision if old is not None else revision,
                    mod_revision=revision,
                    updated_at=self._wall_clock(),
                )
                if old is None:
                    event = self._record(stored, EventType.SERVICE_REGISTERED, {"service": stored.to_dict()})
                else:
                    event = self._record_update(old, stored, {})
                self._ttl_failed.discard(stored.key)
                self._timers.arm(stored, now)
                stored_entries.append(stored)
                last_revision = event.revision
        return stored_entries, last_revision

    def remove(self, name: str, host_id: str | None = None) -> ServiceEntry:
        """Unregister an instance (``host_id`` may be omitted when there is one); returns it.

        Raises:
            ServiceNotFound: no such instance.
            ValidationError: ``host_id`` omitted and the service runs on several hosts.
        """
        with self._lock:
            self._check_open()
            entry = self._resolve(name, host_id)
            event = self._record_removal(entry, "removed")
        self._make_durable(event.revision)
        return entry

    def set_state(self, name: str, state: ServiceState | str, host_id: str | None = None) -> ServiceEntry:
        """Change an instance's run state; the same state again changes nothing."""
        new_state = convert(state, ServiceState, path="state")
        with self._lock:
            self._check_open()
            entry = self._resolve(name, host_id)
            if entry.state is new_state:
                return entry
            updated, event = self._change_state(entry, new_state, reason="set_state")
        self._make_durable(event.revision)
        return updated

    def heartbeat(self, name: str, host_id: str | None = None) -> ServiceEntry:
        """Tell the registry an instance is alive: restarts its TTL.

        A heartbeat is not a change (no revision, no event, no disk write), unless it
        revives an instance that its TTL had marked failed: that is a state change
        back to running.
        """
        with self._lock:
            self._check_open()
            entry = self._resolve(name, host_id)
            if entry.key in self._ttl_failed and entry.state is ServiceState.FAILED:
                updated, event = self._change_state(entry, ServiceState.RUNNING, reason="heartbeat")
            else:
                self._timers.arm(entry, self._clock(), heartbeat=True)
                return entry
        self._make_durable(event.revision)
        return updated

    def update_topology(self, topology: Mapping[str, Any]) -> Event | None:
        """Record the network topology; emits ``NetworkTopologyChanged`` if it differs."""
        snapshot = dict(topology)
        with self._lock:
            self._check_open()
            if self._topology == snapshot:
                return None
            previous = self._topology
            self._store.put("meta", "topology", snapshot)
            self._topology = snapshot
            event = self._events.append(
                EventType.NETWORK_TOPOLOGY_CHANGED, {"topology": snapshot, "previous": previous}
            )
        self._make_durable(event.revision)
        return event

    # --- TTL ------------------------------------------------------------------------

    def expire(self, now: float | None = None) -> list[Event]:
        """Apply TTLs due at ``now`` (default: the clock): missed heartbeats -> failed,
        failed past ``deregister_after_seconds`` -> removed. Returns the events."""
        now = self._clock() if now is None else now
        events: list[Event] = []
        with self._lock:
            if self._closed:
                return events
            for kind, key in self._timers.pop_due(now):
                entry = self._services.get(key)
                if entry is None:
                    continue
                if kind is Deadline.TTL:
                    _, event = self._change_state(entry, ServiceState.FAILED, reason="ttl_expired", now=now)
                    self._ttl_failed.add(key)
                    events.append(event)
                else:
                    events.append(self._record_removal(entry, "deregistered_after_failure"))
        if events:
            self._make_durable(events[-1].revision)
        return events

    def next_deadline(self) -> float | None:
        """The clock time of the next TTL action, or None when nothing is due."""
        with self._lock:
            return self._timers.next_deadline()

    def start_reaper(self, interval: float = 0.5) -> None:
        """Run :meth:`expire` every ``interval`` seconds in a daemon thread until close()."""
        if self._reaper is None and not self._closed:
            self._reaper = Reaper(self.expire, interval=interval)

    # --- subscriptions ----------------------------------------------------------------

    def subscribe(
        self,
        event_types: Iterable[EventType | str] | None = None,
        *,
        since_revision: int | None = None,
        filter: ServiceQuery | Mapping[str, Any] | None = None,
        maxsize: int = DEFAULT_SUBSCRIPTION_QUEUE,
    ) -> Subscription:
        """Subscribe to events (all types when ``event_types`` is empty) of the services
        ``filter`` selects (topology events always pass).

        With ``since_revision``, every retained event after that revision is queued
        first, in order, with no gap and no duplicate, then live events follow.

        Raises:
            Compacted: ``since_revision`` is older than the oldest retained event.
            ValidationError: bad types, filter, revision or queue size.
        """
        return self._events.subscribe(event_types, since_revision=since_revision, query=filter, maxsize=maxsize)

    def unsubscribe(self, subscription: Subscription | str) -> None:
        """Close a subscription (by object or id); unknown ids are ignored."""
        target = self._events.get(subscription) if isinstance(subscription, str) else subscription
        if target is not None:
            target.close()

    @property
    def subscriptions(self) -> list[Subscription]:
        return self._events.subscriptions

    # --- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the reaper, close subscriptions, commit and close the store."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._reaper is not None:
            self._reaper.stop()
        self._events.close("the registry closed")
        self._store.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals (callers hold self._lock unless said otherwise) -----------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the registry is closed")

    def _resolve(self, name: str, host_id: str | None) -> ServiceEntry:
        validate_service_name(name)
        instances = self._instances_of(name)
        if host_id is None:
            if len(instances) > 1:
                hosts = ", ".join(sorted(instances))
                raise ValidationError(
                    f"service {name!r} runs on several hosts ({hosts}); say which with host_id", field="host_id"
                )
            return next(iter(instances.values()))
        validate_host_id(host_id)
        return _on_host(name, instances, host_id)

    def _instances_of(self, name: str) -> dict[str, ServiceEntry]:
        instances = self._by_name.get(name)
        if not instances:
            raise ServiceNotFound(f"service {name!r} is not registered", details={"service_name": name})
        return instances

    def _place(self, item: ServiceEntry | Mapping[str, Any]) -> ServiceEntry:
        """The entry, its address checked against the configured networks and its network filled in."""
        entry = item if isinstance(item, ServiceEntry) else ServiceEntry.from_dict(item)
        if self._networks is None:
            return entry
        info = entry.network_info
        network: Network | None
        if info.network is not None:
            try:
                network = self._networks.get(info.network)
            except Exception:
                known = ", ".join(self._networks.networks) or "none"
                raise ValidationError(
                    f"network_info.network {info.network!r} is not a configured network (known: {known})",
                    field="network_info.network",
                ) from None
            if not network.contains(info.ip):
                raise ValidationError(
                    f"network_info.ip {info.ip} is outside network {network.name!r} ({network.subnet})",
                    field="network_info.ip",
                )
        else:
            network = self._networks.classify(info.ip)
            if network is None:
                return entry
        if network.type is not entry.location:
            raise ValidationError(
                f"{info.ip} is in the {network.type.value} network {network.name!r}, "
                f"but the location is {entry.location.value!r}",
                field="location",
            )
        if info.network is None:
            entry = entry.evolve(network_info=NetworkInfo(info.ip, info.hostname, network.name))
        return entry

    def _index(self, entry: ServiceEntry) -> None:
        self._services[entry.key] = entry
        self._by_name.setdefault(entry.service_name, {})[entry.host_id] = entry
        self._by_host.setdefault(entry.host_id, {})[entry.service_name] = entry
        self._hosts_by_ip.setdefault(entry.network_info.ip, {})[entry.key] = entry.host_id

    def _unindex(self, entry: ServiceEntry) -> None:
        del self._services[entry.key]
        _drop(self._by_name, entry.service_name, entry.host_id)
        _drop(self._by_host, entry.host_id, entry.service_name)
        _drop(self._hosts_by_ip, entry.network_info.ip, entry.key)

    def _record(self, entry: ServiceEntry, event_type: EventType, data: dict[str, Any]) -> Event:
        self._store.put("services", _service_key(entry.key), entry.to_record())
        event = self._events.append(event_type, data)
        old = self._services.get(entry.key)
        if old is not None:
            self._unindex(old)
        self._index(entry)
        return event

    def _record_update(self, old: ServiceEntry, new: ServiceEntry, extra: dict[str, Any]) -> Event:
        old_dict = old.to_dict()
        new_dict = new.to_dict()
        changes = [name for name in CONTENT_FIELDS if old_dict[name] != new_dict[name]]
        if "state" in changes:
            event_type = EventType.SERVICE_STATE_CHANGED
        elif "endpoints" in changes:
            event_type = EventType.ENDPOINT_CHANGED
        else:
            event_type = EventType.SERVICE_UPDATED
        data = {"service": new_dict, "changes": changes, "previous": {name: old_dict[name] for name in changes}}
        data.update(extra)
        return self._record(new, event_type, data)

    def _record_removal(self, entry: ServiceEntry, reason: str) -> Event:
        self._store.delete("services", _service_key(entry.key))
        event = self._events.append(EventType.SERVICE_REMOVED, {"service": entry.to_dict(), "reason": reason})
        self._unindex(entry)
        self._timers.forget(entry.key)
        self._ttl_failed.discard(entry.key)
        return event

    def _change_state(
        self, entry: ServiceEntry, state: ServiceState, *, reason: str, now: float | None = None
    ) -> tuple[ServiceEntry, Event]:
        revision = self._events.next_revision
        updated = entry.evolve(state=state).stamped(
            create_revision=entry.create_revision, mod_revision=revision, updated_at=self._wall_clock()
        )
        event = self._record_update(entry, updated, {"reason": reason})
        if state is not ServiceState.FAILED:
            self._ttl_failed.discard(entry.key)
        self._timers.arm(updated, self._clock() if now is None else now)
        return updated, event

    # --- durability and publishing (called without self._lock) ----------------------------

    def _make_durable(self, revision: int) -> None:
        """Commit (group commit), then publish every event up to ``revision`` in order."""
        self._store.commit()
        self._events.publish(revision)


def _drop(index: dict[str, dict[_K, Any]], outer: str, inner: _K) -> None:
    """Remove ``index[outer][inner]``, and ``index[outer]`` once it is empty."""
    bucket = index[outer]
    del bucket[inner]
    if not bucket:
        del index[outer]
