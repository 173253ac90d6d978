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

With networks configured, addresses are part of an instance's life (docs/networks.md): an
instance registered without an ``ip`` gets the next free address of its network, an ``ip``
inside a network is recorded as the instance's allocation (owner ``"<service>@<host>"``),
and removal releases it. Each such change is an event of its own, ``IpAllocated`` before
the registration, ``IpReleased`` after the removal, with its own revision.

``data["changes"]`` lists every field that changed and ``data["previous"]`` their old
values, so a subscriber of ``ServiceStateChanged`` also learns about endpoints that
changed in the same update.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .eventlog import DEFAULT_EVENT_RETENTION, DEFAULT_SUBSCRIPTION_QUEUE, EventLog
from .events import Event, EventType, Subscription
from .exceptions import Conflict, NotFound, RegistryError, ServiceNotFound, StoreError, ValidationError
from .model import (
    CONTENT_FIELDS,
    Allocation,
    EndpointRecord,
    InstanceKey,
    Location,
    NetworkInfo,
    ServiceEntry,
    ServiceState,
    instance_owner,
    owner_instance,
    validate_host_id,
    validate_service_name,
)
from .network.config import Network, NetworkConfig
from .network.ipam import AddressBook, canonical_ip, validate_owner
from .query import ServiceQuery
from .schema import convert
from .store import MemoryStore, SqliteStore, Store
from .timers import Deadline, Reaper, Timers

if TYPE_CHECKING:
    import os

__all__ = ["DEFAULT_EVENT_RETENTION", "EndpointRecord", "Registry"]

log = logging.getLogger(__name__)

# The registry each open store belongs to, so a NetworkManager given only the store works on
# the same addresses (and events) as the registry instead of a second, diverging copy.
_REGISTRY_ON_STORE: weakref.WeakValueDictionary[int, Registry] = weakref.WeakValueDictionary()

_K = TypeVar("_K", str, InstanceKey)


def _service_key(key: InstanceKey) -> str:
    return f"{key[0]}/{key[1]}"


def _content(entry: ServiceEntry) -> tuple[Any, ...]:
    return tuple(getattr(entry, name) for name in CONTENT_FIELDS)


def _instance_order(entry: ServiceEntry) -> tuple[bool, int, str]:
    """Sort key for choosing an instance: running first, then nearest, then host id."""
    return (entry.state is not ServiceState.RUNNING, entry.distance, entry.host_id)


@dataclass(slots=True)
class _AddressChange:
    """What giving an entry its address changed in the address book (to record, or to undo)."""

    claimed: Allocation | None = None
    released: list[Allocation] = field(default_factory=list)


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
        self._book = AddressBook(networks, self._store) if networks is not None else None
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
        _REGISTRY_ON_STORE[id(self._store)] = self

    # --- construction -------------------------------------------------------------

    @classmethod
    def with_persistence(cls, path: str | os.PathLike[str], *, synchronous: str = "FULL", **options: Any) -> Registry:
        """A registry on the embedded store at ``path``, created if missing (with its folder, 0700)."""
        folder = Path(path).parent
        if not folder.exists():
            try:
                folder.mkdir(parents=True, mode=0o700)
            except OSError as exc:
                raise StoreError(f"cannot create the store's folder {folder}: {exc.strerror}") from None
        return cls(store=SqliteStore(path, create=True, synchronous=synchronous), **options)

    @classmethod
    def on_store(cls, store: Store) -> Registry | None:
        """The open registry that uses ``store``, if any."""
        registry = _REGISTRY_ON_STORE.get(id(store))
        return registry if registry is not None and registry._store is store and not registry._closed else None

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
    ) -> list[ServiceEntry | RegistryError]:
        """:meth:`add_or_update` for many independent writers with one commit.

        Unlike :meth:`add_or_update_many`, a bad entry fails alone: its slot in the result
        holds the error (``ValidationError``, or ``Conflict``/``PoolExhausted`` for its
        address) and the others are applied (the server coalesces concurrent
        ``register_service`` requests this way).
        """
        outcomes, revision = self.stage_each(entries)
        if revision:
            self._make_durable(revision)
        return outcomes

    def stage_each(
        self, entries: Iterable[ServiceEntry | Mapping[str, Any]]
    ) -> tuple[list[ServiceEntry | RegistryError], int]:
        """:meth:`add_or_update_each` without waiting for the disk, for event loops.

        The entries are applied and written, not yet committed: returns the outcomes and the
        last revision written (0: nothing changed). Hand that revision to
        :meth:`make_durable_soon` and acknowledge nothing before it reports: until then the
        writes are not durable and their events are not published.
        """
        outcomes: list[ServiceEntry | RegistryError] = []
        placed: list[ServiceEntry] = []
        for item in entries:
            try:
                entry = self._place(item)
            except ValidationError as exc:
                outcomes.append(exc)
            else:
                outcomes.append(entry)
                placed.append(entry)
        staged, revision = self._stage(placed, each=True)
        results = iter(staged)
        return [outcome if isinstance(outcome, RegistryError) else next(results) for outcome in outcomes], revision

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
        staged, revision = self._stage(placed, each=False)
        if revision:
            self._make_durable(revision)
        return [entry for entry in staged if isinstance(entry, ServiceEntry)]

    def _stage(self, placed: list[ServiceEntry], *, each: bool) -> tuple[list[ServiceEntry | RegistryError], int]:
        """Write placed entries in order, uncommitted: ``(as stored or the error, last revision or 0)``.

        Addresses come first, for every entry: with ``each`` an entry whose address cannot be
        had fails alone; without, the first such failure undoes the others and is raised.
        """
        results: list[ServiceEntry | RegistryError] = []
        last_revision = 0
        with self._lock:
            self._check_open()
            now = self._clock()
            addressed: list[tuple[ServiceEntry, _AddressChange] | RegistryError] = []
            for entry in placed:
                try:
                    addressed.append(self._address(entry, self._services.get(entry.key)))
                except RegistryError as exc:
                    if not each:
                        for item in reversed(addressed):
                            assert not isinstance(item, RegistryError)
                            self._undo_address(item[1])
                        raise
                    addressed.append(exc)
            for item in addressed:
                if isinstance(item, RegistryError):
                    results.append(item)
                    continue
                entry, change = item
                for released in change.released:
                    last_revision = self._record_allocation(EventType.IP_RELEASED, released, "moved").revision
                if change.claimed is not None:
                    claimed = self._record_allocation(EventType.IP_ALLOCATED, change.claimed, "registered")
                    last_revision = claimed.revision
                old = self._services.get(entry.key)
                if old is not None and _content(old) == _content(entry):
                    self._timers.arm(old, now, heartbeat=True)
                    results.append(old)
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
                results.append(stored)
                last_revision = event.revision
        return results, last_revision

    def remove(self, name: str, host_id: str | None = None) -> ServiceEntry:
        """Unregister an instance (``host_id`` may be omitted when there is one); returns it.

        Raises:
            ServiceNotFound: no such instance.
            ValidationError: ``host_id`` omitted and the service runs on several hosts.
        """
        with self._lock:
            self._check_open()
            entry = self._resolve(name, host_id)
            self._record_removal(entry, "removed")
            revision = self._events.next_revision - 1
        self._make_durable(revision)
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

    # --- addresses ----------------------------------------------------------------------

    def allocate_ip(self, owner: str, network: str | Location, *, ip: str | None = None) -> Allocation:
        """``owner``'s address in ``network`` (a name, or a location with one network): the one
        it holds, else the lowest free one (``IpAllocated``). ``ip`` asks for a specific address.

        Raises:
            Conflict: ``ip`` is reserved or held by another owner, or the owner holds another one.
            PoolExhausted: no free address is left.
            NotFound: no such network.
        """
        return self.allocate_many([owner], network, ip=ip)[0]

    def allocate_many(
        self, owners: Sequence[str], network: str | Location, *, ip: str | None = None
    ) -> list[Allocation]:
        """:meth:`allocate_ip` for several owners with one commit, all or nothing."""
        owners = [validate_owner(owner) for owner in owners]
        if ip is not None and len(owners) != 1:
            raise ValidationError("a specific ip can be requested for one owner only", field="ip")
        with self._lock:
            self._check_open()
            book = self._require_book()
            target = book.config.resolve(network)
            wanted = canonical_ip(ip, target) if ip is not None else None
            results: list[Allocation] = []
            new: list[Allocation] = []
            try:
                for owner in owners:
                    existing = book.get(owner, target.name)
                    if existing is None:
                        existing = book.claim(owner, target, wanted)
                        new.append(existing)
                    elif wanted is not None and existing.ip != wanted:
                        raise Conflict(
                            f"{owner!r} already holds {existing.ip} in {target.name!r}; release it first",
                            details={"owner": owner, "network": target.name, "ip": existing.ip},
                        )
                    results.append(existing)
            except BaseException:
                for allocation in new:
                    book.drop(allocation)
                raise
            for allocation in new:
                self._record_allocation(EventType.IP_ALLOCATED, allocation, "allocate_ip")
            revision = self._events.next_revision - 1
        if new:
            self._make_durable(revision)
        return results

    def release_ip(self, owner: str, network: str | Location | None = None) -> list[Allocation]:
        """Release ``owner``'s address in ``network`` (or in every network): one ``IpReleased``
        each. Returns what was released; an owner without addresses gives ``[]`` (idempotent).

        Raises:
            Conflict: a registered instance still uses the address (remove it instead).
        """
        owner = validate_owner(owner)
        with self._lock:
            self._check_open()
            book = self._require_book()
            held = [book.get(owner, book.config.resolve(network).name)] if network is not None else book.of_owner(owner)
            released = [allocation for allocation in held if allocation is not None]
            key = owner_instance(owner)
            instance = self._services.get(key) if key is not None else None
            for allocation in released:
                if (
                    instance is not None
                    and instance.network_info.ip == allocation.ip
                    and instance.network_info.network == allocation.network
                ):
                    raise Conflict(
                        f"{allocation.ip} in {allocation.network!r} is the address of the registered instance "
                        f"{owner!r}: remove the service to release it",
                        details={"owner": owner, "network": allocation.network, "ip": allocation.ip},
                    )
            for allocation in released:
                book.drop(allocation)
                self._record_allocation(EventType.IP_RELEASED, allocation, "release_ip")
            revision = self._events.next_revision - 1
        if released:
            self._make_durable(revision)
        return released

    def get_allocation(self, owner: str, network: str | Location) -> Allocation:
        """``owner``'s address in ``network``.

        Raises:
            NotFound: it holds none there (or no such network).
        """
        with self._lock:
            book = self._require_book()
            target = book.config.resolve(network)
            allocation = book.get(owner, target.name)
        if allocation is None:
            raise NotFound(
                f"{owner!r} has no address in {target.name!r}", details={"owner": owner, "network": target.name}
            )
        return allocation

    def allocations(self, network: str | Location | None = None) -> list[Allocation]:
        """Current allocations, ordered by network (file order) then address."""
        with self._lock:
            book = self._require_book()
            return book.allocations(book.config.resolve(network).name if network is not None else None)

    def owner_of(self, ip: str) -> Allocation | None:
        """The allocation holding ``ip``, if any."""
        with self._lock:
            return self._require_book().owner_of(ip)

    def free_count(self, network: str | Location) -> int:
        with self._lock:
            book = self._require_book()
            return book.free_count(book.config.resolve(network).name)

    def orphaned_allocations(self) -> list[dict[str, Any]]:
        """Stored allocations that no longer fit the networks (kept, never handed out again)."""
        with self._lock:
            return self._book.orphans() if self._book is not None else []

    def reload_networks(self, networks: NetworkConfig | None) -> Event | None:
        """Use another networks configuration from now on (``SIGHUP``): ``NetworkTopologyChanged``
        with what changed, or None when nothing did. Allocations outside the new networks become
        orphans (kept aside, never dropped); entries keep the network they were registered in."""
        with self._lock:
            self._check_open()
            changes = _network_changes(self._networks, networks)
            orphans_before = {orphan["key"] for orphan in self._book.orphans()} if self._book is not None else set()
            self._networks = networks
            if networks is None:
                book = None
            elif self._book is not None:
                book = self._book.reconfigured(networks)
            else:
                book = AddressBook(networks, self._store)
            self._book = book
            if not changes:
                return None
            orphaned = [orphan for orphan in (book.orphans() if book else []) if orphan["key"] not in orphans_before]
            event = self._events.append(
                EventType.NETWORK_TOPOLOGY_CHANGED,
                {
                    "reason": "networks_reloaded",
                    "networks": changes,
                    "orphaned": orphaned,
                    "topology": self._topology,
                    "previous": self._topology,
                },
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
            revision = self._events.next_revision - 1
        if events:
            self._make_durable(revision)
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
        """The entry with its location and network worked out from its address (or the reverse).

        Loopback addresses are ``local``; an address inside a configured network takes that
        network's location and name; an entry without an ``ip`` names its network (or a
        location with one network) and gets its address in :meth:`_stage`.
        """
        entry = item if isinstance(item, ServiceEntry) else ServiceEntry.from_dict(item)
        info = entry.network_info
        networks = self._networks
        if networks is None or not networks.networks:
            if info.ip is None:
                raise ValidationError(
                    "network_info.ip is required: this registry has no networks to allocate an address from",
                    field="network_info.ip",
                )
            if info.network is not None and networks is not None:
                raise ValidationError(
                    f"network_info.network {info.network!r} is not a configured network (known: none)",
                    field="network_info.network",
                )
            if entry.location is None:
                if not info.is_loopback:
                    raise ValidationError(
                        f"location is required for {info.ip}: this registry has no networks to take it from "
                        "(give location: lan, wireguard or local)",
                        field="location",
                    )
                entry = entry.evolve(location=Location.LOCAL)
            return entry
        network = self._network_of(entry, networks)
        location = entry.location
        if network is None:
            # an address in no configured network (ip is set: _network_of needs a network without one)
            if location is None:
                if not info.is_loopback:
                    raise ValidationError(
                        f"location is required for {info.ip}: it is in none of the configured networks "
                        f"({_describe(networks)}); give location, or an address inside one of them",
                        field="location",
                    )
                location = Location.LOCAL
            return entry if location is entry.location else entry.evolve(location=location)
        if location is not None and network.type is not location:
            where = info.ip if info.ip is not None else f"network {network.name!r}"
            raise ValidationError(
                f"{where} is in the {network.type.value} network {network.name!r}, "
                f"but the location is {location.value!r}",
                field="location",
            )
        if location is None or info.network is None:
            entry = entry.evolve(location=network.type, network_info=NetworkInfo(info.ip, info.hostname, network.name))
        return entry

    @staticmethod
    def _network_of(entry: ServiceEntry, networks: NetworkConfig) -> Network | None:
        """The configured network of ``entry``: named, containing its address, or the only one
        of its location (when it has no address yet)."""
        info = entry.network_info
        if info.network is not None:
            network = networks.networks.get(info.network)
            if network is None:
                raise ValidationError(
                    f"network_info.network {info.network!r} is not a configured network (known: "
                    f"{', '.join(networks.networks)})",
                    field="network_info.network",
                )
            if info.ip is not None and not network.contains(info.ip):
                raise ValidationError(
                    f"network_info.ip {info.ip} is outside network {network.name!r} ({network.subnet})",
                    field="network_info.ip",
                )
            return network
        if info.ip is not None:
            return networks.classify(info.ip)
        if entry.location is None:
            raise ValidationError(
                f"network_info needs an ip, or a network to allocate one from (configured: {_describe(networks)})",
                field="network_info.ip",
            )
        candidates = networks.by_location(entry.location)
        if len(candidates) != 1:
            found = ", ".join(network.name for network in candidates) or "none"
            raise ValidationError(
                f"network_info.ip is missing and location {entry.location.value!r} has "
                f"{'no network' if not candidates else 'several networks'} ({found}) to allocate from: "
                "give network_info.network or network_info.ip",
                field="network_info.network",
            )
        return candidates[0]

    def _index(self, entry: ServiceEntry) -> None:
        self._services[entry.key] = entry
        self._by_name.setdefault(entry.service_name, {})[entry.host_id] = entry
        self._by_host.setdefault(entry.host_id, {})[entry.service_name] = entry
        self._hosts_by_ip.setdefault(entry.ip, {})[entry.key] = entry.host_id

    def _unindex(self, entry: ServiceEntry) -> None:
        del self._services[entry.key]
        _drop(self._by_name, entry.service_name, entry.host_id)
        _drop(self._by_host, entry.host_id, entry.service_name)
        _drop(self._hosts_by_ip, entry.ip, entry.key)

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
        """Remove ``entry``; its address is released after it (or handed to an instance of the
        same host still on it): more events may follow the one returned."""
        self._store.delete("services", _service_key(entry.key))
        event = self._events.append(EventType.SERVICE_REMOVED, {"service": entry.to_dict(), "reason": reason})
        self._unindex(entry)
        self._timers.forget(entry.key)
        self._ttl_failed.discard(entry.key)
        self._release_address(entry, reason)
        return event

    # --- addresses (callers hold self._lock) -------------------------------------------------

    def _address(self, entry: ServiceEntry, old: ServiceEntry | None) -> tuple[ServiceEntry, _AddressChange]:
        """``entry`` with its address, and what that changed in the address book.

        Raises (having changed nothing):
            Conflict: the address is allocated to another owner (not an instance of this host).
            PoolExhausted: the entry needs an address and its network has none left.
        """
        change = _AddressChange()
        book = self._book
        name = entry.network_info.network
        owner = instance_owner(entry.service_name, entry.host_id)
        network = book.config.networks.get(name) if book is not None and name is not None else None
        if book is None or name is None or network is None:
            if name is not None and network is None:  # the networks were reloaded since _place
                raise ValidationError(
                    f"network_info.network {name!r} is not a configured network", field="network_info.network"
                )
            self._release_moved(owner, old, None, change)
            return entry, change
        info = entry.network_info
        ip = info.ip
        if network.type is Location.LOCAL:
            # Loopback addresses belong to each machine: nothing to allocate or to check.
            if ip is None:
                entry = entry.evolve(network_info=NetworkInfo(_loopback_in(network), info.hostname, name))
            self._release_moved(owner, old, None, change)
            return entry, change
        held = book.get(owner, name)
        if ip is None:
            # The address it holds; else the one it is registered on in this network (a node's own, an
            # address from before 0.2); else the next free one.
            if held is not None:
                ip = held.ip
            elif old is not None and old.network_info.network == name and old.network_info.ip is not None:
                ip = old.network_info.ip
            else:
                change.claimed = book.claim(owner, network)
                ip = change.claimed.ip
            entry = entry.evolve(network_info=NetworkInfo(ip, info.hostname, name))
        if change.claimed is None and (held is None or held.ip != ip):
            claim = False
            # A reserved address (a node's own, the gateway) is the file's: instances may use it, nobody holds it.
            if not book.is_reserved(network, ip):
                holder = book.holder(network, ip)
                if holder is None:
                    claim = True
                elif not _shares_host(holder, entry.host_id):
                    raise Conflict(
                        f"network_info.ip {ip} in {name!r} is allocated to {holder!r}",
                        details={"ip": ip, "network": name, "owner": holder, "field": "network_info.ip"},
                    )
            if held is not None and (claim or network.release_on_remove):
                book.drop(held)
                change.released.append(held)
            if claim:
                change.claimed = book.claim(owner, network, ip)
        self._release_moved(owner, old, name, change)
        return entry, change

    def _release_moved(self, owner: str, old: ServiceEntry | None, network: str | None, change: _AddressChange) -> None:
        """Release the address ``old`` had in another network than ``network`` (the instance moved)."""
        book = self._book
        if book is None or old is None or old.network_info.network in (None, network):
            return
        held = book.get(owner, old.network_info.network)
        configured = book.config.networks.get(old.network_info.network)
        if (
            held is not None
            and held.ip == old.network_info.ip
            and configured is not None
            and configured.release_on_remove
        ):
            book.drop(held)
            change.released.append(held)

    def _undo_address(self, change: _AddressChange) -> None:
        book = self._book
        assert book is not None or (change.claimed is None and not change.released)
        if book is None:
            return
        if change.claimed is not None:
            book.drop(change.claimed)
        for allocation in reversed(change.released):
            book.claim(allocation.owner, book.config.networks[allocation.network], allocation.ip)

    def _release_address(self, entry: ServiceEntry, reason: str) -> Event | None:
        """After ``entry`` left: release its allocation, or hand it to an instance of the same host
        still registered on that address. Returns the last event, if any."""
        book = self._book
        name = entry.network_info.network
        if book is None or name is None:
            return None
        network = book.config.networks.get(name)
        owner = instance_owner(entry.service_name, entry.host_id)
        held = book.get(owner, name)
        if network is None or held is None or held.ip != entry.network_info.ip or not network.release_on_remove:
            return None
        book.drop(held)
        event = self._record_allocation(EventType.IP_RELEASED, held, reason)
        staying = sorted(
            key
            for key in self._hosts_by_ip.get(held.ip, {})
            if self._services[key].network_info.network == name and book.get(instance_owner(*key), name) is None
        )
        if staying:
            heir = book.claim(instance_owner(*staying[0]), network, held.ip)
            event = self._record_allocation(EventType.IP_ALLOCATED, heir, "handed_over")
        return event

    def _record_allocation(self, event_type: EventType, allocation: Allocation, reason: str) -> Event:
        return self._events.append(event_type, {"allocation": allocation.to_dict(), "reason": reason})

    def _require_book(self) -> AddressBook:
        if self._book is None:
            raise ValidationError("this registry has no networks configured (start it with a networks file)")
        return self._book

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


def _network_changes(before: NetworkConfig | None, after: NetworkConfig | None) -> dict[str, list[str]]:
    """``{"added": [...], "removed": [...], "changed": [...]}`` (network names), empty if equal."""
    old = {name: network.to_dict() for name, network in (before.networks.items() if before else ())}
    new = {name: network.to_dict() for name, network in (after.networks.items() if after else ())}
    changes = {
        "added": [name for name in new if name not in old],
        "removed": [name for name in old if name not in new],
        "changed": [name for name in new if name in old and new[name] != old[name]],
    }
    return changes if any(changes.values()) else {}


def _describe(networks: NetworkConfig) -> str:
    """``production (lan 192.168.1.0/24), monitoring (wireguard 10.0.0.0/24)`` for error messages."""
    return ", ".join(f"{n.name} ({n.type.value} {n.subnet})" for n in networks.networks.values()) or "none"


def _shares_host(owner: str, host_id: str) -> bool:
    """Whether ``owner`` is the host ``host_id`` itself (``allocate_ip(host, ...)``) or an instance on it:
    the instances of one host share its address."""
    if owner == host_id:
        return True
    instance = owner_instance(owner)
    return instance is not None and bool(instance[0]) and instance[1] == host_id


def _loopback_in(network: Network) -> str:
    """The address a ``local`` instance gets when it gives none: the usual loopback of the subnet."""
    usual = "127.0.0.1" if network.subnet.version == 4 else "::1"
    return usual if network.contains(usual) else str(network.subnet.ip)


def _drop(index: dict[str, dict[_K, Any]], outer: str, inner: _K) -> None:
    """Remove ``index[outer][inner]``, and ``index[outer]`` once it is empty."""
    bucket = index[outer]
    del bucket[inner]
    if not bucket:
        del index[outer]
