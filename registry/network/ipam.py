"""IP allocation inside the configured networks.

:class:`AddressBook` holds the addresses, one per ``(owner, network)``, persisted in the
store's ``allocations`` table; the :class:`~registry.core.Registry` drives it (under its lock,
with an event per change) and :class:`~registry.network.NetworkManager` is the seed's API
over it.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any, Final

import netaddr

from ..exceptions import Conflict, PoolExhausted, ValidationError
from ..model import Allocation, validate_ip
from ..store import Store
from .config import Network, NetworkConfig

__all__ = ["AddressBook", "Allocation", "canonical_ip", "validate_owner"]

_MAX_OWNER: Final = 320  # a service name, '@', a host id
_ALLOCATIONS: Final = "allocations"


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


class AddressBook:
    """Who holds which address in the configured networks, over the store's ``allocations`` table.

    Not thread-safe and never commits: its owner (:class:`~registry.core.Registry`) calls it
    under its lock, records an event per change and commits. Addresses are handed out lowest
    free first, O(1) amortised (a forward cursor plus a heap of released addresses). Records
    that no longer fit the configuration are kept aside as *orphans*: never handed out again,
    never dropped, back in use when a configuration fits them again.
    """

    def __init__(self, config: NetworkConfig, store: Store, records: Iterable[tuple[str, Any]] | None = None) -> None:
        self.config = config
        self.store = store
        self._pools = {name: _Pool(network) for name, network in config.networks.items()}
        self._by_key: dict[str, Allocation] = {}
        self._orphans: dict[str, dict[str, Any]] = {}
        self._load(self.store.scan(_ALLOCATIONS) if records is None else records)

    def _load(self, records: Iterable[tuple[str, Any]]) -> None:
        # The pools' cursors start at the first address and walk past what is loaded here.
        for key, value in records:
            try:
                allocation = Allocation.from_dict(value)
            except (KeyError, TypeError, ValueError, AttributeError):
                self._orphans[key] = {"key": key, "allocation": value, "reason": "unreadable record"}
                continue
            reason = self._misfit(allocation)
            if reason is not None:
                self._orphans[key] = {"key": key, "allocation": allocation.to_dict(), "reason": reason}
                continue
            self._pools[allocation.network].used[int(netaddr.IPAddress(allocation.ip))] = allocation.owner
            self._by_key[allocation.key] = allocation

    def reconfigured(self, config: NetworkConfig) -> AddressBook:
        """The same records under another configuration (a reload): what no longer fits becomes
        an orphan, an orphan that fits again is back in use. Nothing is written."""
        records: list[tuple[str, Any]] = [(a.key, a.to_dict()) for a in self._by_key.values()]
        records.extend((key, orphan["allocation"]) for key, orphan in self._orphans.items())
        return AddressBook(config, self.store, records)

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

    # --- reads

    def get(self, owner: str, network: str) -> Allocation | None:
        return self._by_key.get(f"{network}/{owner}")

    def of_owner(self, owner: str) -> list[Allocation]:
        return [allocation for name in self._pools if (allocation := self.get(owner, name)) is not None]

    def holder(self, network: Network, ip: str) -> str | None:
        """The owner of ``ip`` in ``network``, or None."""
        return self._pools[network.name].used.get(int(netaddr.IPAddress(ip)))

    def is_reserved(self, network: Network, ip: str) -> bool:
        return self._pools[network.name].is_reserved(int(netaddr.IPAddress(ip)))

    def allocations(self, network: str | None = None) -> list[Allocation]:
        """Current allocations, ordered by network (file order) then address."""
        items = [a for a in self._by_key.values() if network is None or a.network == network]
        order = {name: index for index, name in enumerate(self._pools)}
        return sorted(items, key=lambda a: (order[a.network], int(netaddr.IPAddress(a.ip))))

    def owner_of(self, ip: str) -> Allocation | None:
        network = self.config.classify(ip)
        if network is None:
            return None
        owner = self._pools[network.name].used.get(int(netaddr.IPAddress(ip)))
        return self.get(owner, network.name) if owner is not None else None

    def free_count(self, network: str) -> int:
        return self._pools[network].free_count()

    def orphans(self) -> list[dict[str, Any]]:
        return list(self._orphans.values())

    # --- writes (into the store, uncommitted)

    def claim(self, owner: str, network: Network, ip: str | None = None) -> Allocation:
        """A new allocation for ``owner`` (who holds none in ``network``): ``ip``, or the lowest free.

        Raises:
            Conflict: ``ip`` is reserved or held by another owner.
            PoolExhausted: no free address is left.
        """
        pool = self._pools[network.name]
        value = self._take_specific(pool, ip) if ip is not None else pool.take()
        pool.used[value] = owner
        allocation = Allocation(
            owner, network.name, str(netaddr.IPAddress(value, network.subnet.version)), network.prefixlen
        )
        self._by_key[allocation.key] = allocation
        self.store.put(_ALLOCATIONS, allocation.key, allocation.to_dict())
        return allocation

    def drop(self, allocation: Allocation) -> None:
        """Give ``allocation``'s address back."""
        if self._by_key.pop(allocation.key, None) is None:
            return
        self._pools[allocation.network].give_back(int(netaddr.IPAddress(allocation.ip)))
        self.store.delete(_ALLOCATIONS, allocation.key)

    @staticmethod
    def _take_specific(pool: _Pool, ip: str) -> int:
        value = int(netaddr.IPAddress(canonical_ip(ip, pool.network)))
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


def canonical_ip(ip: str, network: Network) -> str:
    """``ip`` in its canonical spelling, checked to be inside ``network``."""
    try:
        address = netaddr.IPAddress(validate_ip(ip, "ip").compressed)
    except ValidationError as exc:
        raise ValidationError(exc.message, field="ip") from None
    if not network.contains(address):
        raise ValidationError(f"ip {ip} is outside network {network.name!r} ({network.subnet})", field="ip")
    return str(address)
