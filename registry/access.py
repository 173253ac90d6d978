"""Location-aware discovery: which instances a caller may see (sans-I/O policy).

"Services only see IPs in their network segment." The rule, for callers without the
``admin`` role, when the registry has a networks configuration:

* A caller on the registry's own host (a loopback address) sees every instance except
  ``local`` instances of *other* hosts.
* A caller whose address is in a configured ``lan`` or ``wireguard`` network N sees the
  instances in N, the ``local`` instances of its own host, and instances that are in
  no configured network.
* A caller in no configured network sees only instances that are in no configured
  network.
* ``local`` instances are visible only from their own host. The caller's host is
  known from its address: a configured node with that ``host`` address, or an instance
  registered with that address (``host_id`` of that instance).

``admin`` callers, and every caller of a registry without networks, see everything.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .auth import Role
from .model import Location, ServiceEntry, validate_ip

if TYPE_CHECKING:
    from .events import Event
    from .network import NetworkConfig

__all__ = ["Visibility", "visibility_for"]


@dataclass(frozen=True, slots=True)
class Visibility:
    """What one caller may see. ``everything`` short-circuits every check."""

    everything: bool
    on_registry_host: bool = False
    network: str | None = None
    caller_hosts: frozenset[str] = frozenset()
    registry_host: str | None = None

    def allows(self, service: Mapping[str, Any]) -> bool:
        """``service`` is an entry in its dict form (as in events)."""
        if self.everything:
            return True
        network = service["network_info"].get("network")
        if service["location"] == Location.LOCAL.value:
            host = service["host_id"]
            if self.on_registry_host:
                return bool(host == self.registry_host)
            return host in self.caller_hosts
        if self.on_registry_host or network is None:
            return True
        return bool(network == self.network)

    def allows_allocation(self, allocation: Mapping[str, Any]) -> bool:
        """An address is seen by callers who can see its network (as instances in it)."""
        return self.everything or self.on_registry_host or allocation.get("network") == self.network

    def allows_event(self, event: Event) -> bool:
        """Service events as their service, ``IpAllocated``/``IpReleased`` as their allocation;
        topology events are seen by everyone."""
        if self.everything:
            return True
        service = event.service_data
        if service is not None:
            return self.allows(service)
        allocation = event.allocation_data
        return allocation is None or self.allows_allocation(allocation)

    def allows_entry(self, entry: ServiceEntry) -> bool:
        if self.everything:
            return True
        return self.allows(
            {
                "network_info": {"network": entry.network_info.network},
                "location": entry.location.value if entry.location is not None else None,
                "host_id": entry.host_id,
            }
        )

    def filter(self, entries: Iterable[ServiceEntry]) -> list[ServiceEntry]:
        return [entry for entry in entries if self.allows_entry(entry)]


def visibility_for(
    caller_ip: str | None,
    role: Role,
    networks: NetworkConfig | None,
    *,
    registry_host: str,
    hosts_with_address: Callable[[str], Iterable[str]],
) -> Visibility:
    """The visibility of a caller at ``caller_ip`` with ``role``.

    ``hosts_with_address(ip)`` returns the host ids of instances registered with that
    address (the registry answers it).
    """
    if role >= Role.ADMIN or networks is None:
        return Visibility(everything=True)
    if caller_ip is None:
        return Visibility(everything=False)
    try:
        address = validate_ip(caller_ip.split("%", 1)[0])
    except Exception:
        return Visibility(everything=False)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:10.0.0.5 from a dual-stack socket
    ip = str(address)
    if address.is_loopback:
        return Visibility(everything=False, on_registry_host=True, registry_host=registry_host)
    network = networks.classify(ip)
    hosts = {node.name for _, node in networks.nodes() if node.host == ip}
    hosts.update(hosts_with_address(ip))
    return Visibility(
        everything=False,
        network=network.name if network is not None else None,
        caller_hosts=frozenset(hosts),
        registry_host=registry_host,
    )
