"""IP allocation inside the configured networks.

:class:`NetworkManager` hands out addresses, one per ``(owner, network)``, persisted in the
store's ``allocations`` table. Lowest free address first; O(1) amortised (a forward cursor
plus a heap of released addresses); thread-safe; durable when it returns.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import netaddr

from ..exceptions import Conflict, NotFound, PoolExhausted, ValidationError
from ..model import Location, validate_ip
from ..store import MemoryStore, Store
from .config import Network, NetworkConfig
from .topology import Topology, detect_topology

__all__ = ["Allocation", "NetworkManager", "validate_owner"]

_MAX_OWNER: Final = 253
_ALLOCATIONS: Final = "allocations"


@dataclass(frozen=True, slots=True)
class Allocation:
    """An address handed to ``owner`` in ``network``."""

    owner: str
    network: str
    ip: str
    prefixlen: int

    @property
    def key(self) -> str:
        return f"{self.network}/{self.owner}"

    def to_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "network": self.network, "ip": self.ip, "prefixlen": self.prefixlen}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        return cls(str(data["owner"]), str(data["network"]), str(data["ip"]), int(data["prefixlen"]))


def validate_owner(value: object) -> str:
    """Owners are free-form names (a service, a host, ``service@host``), printable, no '/'."""
    if not isinstance(value, str):
        raise ValidationError(f"owner must be a string, not {type(value).__name__}", field="owner")
    if not value or len(value) > _MAX_OWNER:
        raise ValidationError(f"owner must be 1-{_MAX_OWNER} characters", field="owner")
    if not value.isprintable() or "/" in value or value != value.strip():
        raise ValidationError(
            f"owner {value!r} is invalid: no '/', control characters or surrounding spaces", field="owner"
        )
    return value


class _Pool:
    """The free addresses of one network.

    Everything below ``cursor`` is in use except the addresses in ``freed`` (a min-heap,
    lazily cleaned); the lowest free address is ``freed[0]`` if any, else the first
    unused address at or above ``cursor``. Each address is passed by the cursor once, so
    allocating a whole subnet is linear.
    """

    def __init__(self, network: Network) -> None:
        self.network = network
        self.first: int = network.subnet.first
        self.last: int = network.subnet.last
        self.reserved = network.reserved_ranges()
        self.used: dict[int, str] = {}  # address -> owner
        self.cursor = self.first
        self.freed: list[int] = []
        self._reserved_index = 0

    def is_reserved(self, value: int) -> bool:
        return any(first <= value <= last for first, last in self.reserved)

    def take(self) -> int:
        while self.freed:
            value = heapq.heappop(self.freed)
            if value not in self.used:
                return value
        value = self.cursor
        reserved = self.reserved
        index = self._reserved_index
        while value <= self.last:
            while index < len(reserved) and reserved[index][1] < value:
                index += 1
            if index < len(reserved) and reserved[index][0] <= value:
                value = reserved[index][1] + 1
                continue
            if value in self.used:
                value += 1
                continue
            break
        self._reserved_index = index
        if value > self.last:
            self.cursor = value
            raise PoolExhausted(
                f"network {self.network.name!r} ({self.network.subnet}) has no free address left",
                details={"network": self.network.name, "subnet": str(self.network.subnet), "allocated": len(self.used)},
            )
        self.cursor = value + 1
        return value

    def give_back(self, value: int) -> None:
        self.used.pop(value, None)
        if value < self.cursor:
            heapq.heappush(self.freed, value)

    def free_count(self) -> int:
        reserved = sum(last - first + 1 for first, last in self.reserved)
        return (self.last - self.first + 1) - reserved - len(self.used)


class NetworkManager:
    """IP allocation inside the configured networks, persisted in ``store``.

    ``allocate_ip(owner, network)`` returns the owner's address in that network, handing
    out the lowest free one the first time. Safe from any thread; a call that returns
    has been committed to the store.
    """

    def __init__(self, config: NetworkConfig, store: Store | None = None) -> None:
        self.config = config
        self.store: Store = store if store is not None else MemoryStore()
        self._lock = threading.Lock()
        self._pools = {name: _Pool(network) for name, network in config.networks.items()}
        self._by_key: dict[str, Allocation] = {}
        self._orphans: list[dict[str, Any]] = []
        self._load()

    def _load(self) -> None:
        # The pools' cursors start at the first address and walk past what is loaded here.
        for key, value in self.store.scan(_ALLOCATIONS):
            try:
                allocation = Allocation.from_dict(value)
            except (KeyError, TypeError, ValueError, AttributeError):
                self._orphans.append({"key": key, "allocation": value, "reason": "unreadable record"})
                continue
            reason = self._misfit(allocation)
            if reason is not None:
                self._orphans.append({"key": key, "allocation": allocation.to_dict(), "reason": reason})
                continue
            self._pools[allocation.network].used[int(netaddr.IPAddress(allocation.ip))] = allocation.owner
            self._by_key[allocation.key] = allocation

    def _misfit(self, allocation: Allocation) -> str | None:
        """Why a stored allocation no longer fits the configuration (or the ones loaded before it), or None."""
        pool = self._pools.get(allocation.network)
        if pool is None:
            return f"network {allocation.network!r} is no longer configured"
        if not pool.network.contains(allocation.ip):
            return f"{allocation.ip} is outside {allocation.network}'s subnet {pool.network.subnet}"
        value = int(netaddr.IPAddress(allocation.ip))
        if value in pool.used:
            return f"{allocation.ip} is also allocated to {pool.used[value]!r}"
        if pool.is_reserved(value):
            return f"{allocation.ip} is now reserved (network, gateway, broadcast, node or reserved range)"
        return None

    def detect(self, *, netns: str | None = None) -> Topology:
        """The host's topology, matched against the configured networks."""
        return detect_topology(self.config, netns=netns)

    def allocate_ip(self, owner: str, network: str | Location, *, ip: str | None = None) -> Allocation:
        """The owner's address in ``network`` (a name, or a location with one network).

        ``ip`` asks for a specific address; it fails with ``Conflict`` if another owner
        has it or it is reserved.
        """
        return self.allocate_many([owner], network, ip=ip)[0]

    def allocate_many(
        self, owners: Sequence[str], network: str | Location, *, ip: str | None = None
    ) -> list[Allocation]:
        """Allocate for several owners with one durable commit (all or nothing)."""
        owners = [validate_owner(owner) for owner in owners]
        if ip is not None and len(owners) != 1:
            raise ValidationError("a specific ip can be requested for one owner only", field="ip")
        target = self.config.resolve(network)
        pool = self._pools[target.name]
        results: list[Allocation] = []
        new: list[Allocation] = []
        with self._lock:
            try:
                for owner in owners:
                    existing = self._by_key.get(f"{target.name}/{owner}")
                    if existing is not None:
                        if ip is not None and existing.ip != _canonical(ip, target):
                            raise Conflict(
                                f"{owner!r} already holds {existing.ip} in {target.name!r}; release it first",
                                details={"owner": owner, "network": target.name, "ip": existing.ip},
                            )
                        results.append(existing)
                        continue
                    value = self._take_specific(pool, owner, ip) if ip is not None else pool.take()
                    pool.used[value] = owner
                    allocation = Allocation(
                        owner, target.name, str(netaddr.IPAddress(value, target.subnet.version)), target.prefixlen
                    )
                    self._by_key[allocation.key] = allocation
                    new.append(allocation)
                    results.append(allocation)
                    self.store.put(_ALLOCATIONS, allocation.key, allocation.to_dict())
            except BaseException:
                self._undo(new)
                raise
        if new:
            try:
                self.store.commit()
            except BaseException:
                with self._lock:
                    self._undo(new)
                raise
        return results

    def _take_specific(self, pool: _Pool, owner: str, ip: str) -> int:
        value = int(netaddr.IPAddress(_canonical(ip, pool.network)))
        if pool.is_reserved(value):
            raise Conflict(
                f"{ip} is reserved in {pool.network.name!r} (network, gateway, broadcast, node or reserved range)",
                details={"ip": ip, "network": pool.network.name},
            )
        holder = pool.used.get(value)
        if holder is not None:
            raise Conflict(
                f"{ip} in {pool.network.name!r} is already allocated to {holder!r}",
                details={"ip": ip, "network": pool.network.name, "owner": holder},
            )
        return value

    def _undo(self, allocations: list[Allocation]) -> None:
        for allocation in allocations:
            pool = self._pools[allocation.network]
            pool.give_back(int(netaddr.IPAddress(allocation.ip)))
            self._by_key.pop(allocation.key, None)
            self.store.delete(_ALLOCATIONS, allocation.key)

    def release_ip(self, owner: str, network: str | Location | None = None) -> list[Allocation]:
        """Release the owner's address (in ``network``, or in every network).

        Returns what was released; releasing an owner without addresses returns ``[]``
        (releasing is idempotent, like a ``state: absent``).
        """
        owner = validate_owner(owner)
        names = [self.config.resolve(network).name] if network is not None else list(self._pools)
        released: list[Allocation] = []
        with self._lock:
            for name in names:
                allocation = self._by_key.pop(f"{name}/{owner}", None)
                if allocation is None:
                    continue
                self._pools[name].give_back(int(netaddr.IPAddress(allocation.ip)))
                self.store.delete(_ALLOCATIONS, allocation.key)
                released.append(allocation)
        if released:
            self.store.commit()
        return released

    def get_allocation(self, owner: str, network: str | Location) -> Allocation:
        target = self.config.resolve(network)
        allocation = self._by_key.get(f"{target.name}/{owner}")
        if allocation is None:
            raise NotFound(
                f"{owner!r} has no address in {target.name!r}", details={"owner": owner, "network": target.name}
            )
        return allocation

    def allocations(self, network: str | Location | None = None) -> list[Allocation]:
        """Current allocations, ordered by network then address."""
        name = self.config.resolve(network).name if network is not None else None
        with self._lock:
            items = [a for a in self._by_key.values() if name is None or a.network == name]
        order = {net: index for index, net in enumerate(self._pools)}
        return sorted(items, key=lambda a: (order[a.network], int(netaddr.IPAddress(a.ip))))

    def owner_of(self, ip: str) -> Allocation | None:
        network = self.config.classify(ip)
        if network is None:
            return None
        with self._lock:
            owner = self._pools[network.name].used.get(int(netaddr.IPAddress(ip)))
            return self._by_key.get(f"{network.name}/{owner}") if owner is not None else None

    def free_count(self, network: str | Location) -> int:
        target = self.config.resolve(network)
        with self._lock:
            return self._pools[target.name].free_count()

    def orphaned_allocations(self) -> list[dict[str, Any]]:
        """Stored allocations that no longer fit the configuration (kept, never reused)."""
        return list(self._orphans)


def _canonical(ip: str, network: Network) -> str:
    try:
        address = netaddr.IPAddress(validate_ip(ip, "ip").compressed)
    except ValidationError as exc:
        raise ValidationError(exc.message, field="ip") from None
    if not network.contains(address):
        raise ValidationError(f"ip {ip} is outside network {network.name!r} ({network.subnet})", field="ip")
    return str(address)
