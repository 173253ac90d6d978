"""The seed's ``NetworkManager``: IP allocation in the configured networks, over a registry.

Addresses are part of the registry (:class:`~registry.core.Registry`): it allocates them for
instances on register, releases them on removal and records every change as an event. A
``NetworkManager`` is the seed's name for that API::

    manager = NetworkManager(config)                      # a registry of its own, in memory
    manager = NetworkManager(config, store=registry.store)  # the registry that uses that store
    manager = NetworkManager(registry=registry)           # the same, said directly
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..core import Registry
from ..exceptions import ConfigError
from ..model import Allocation, Location
from ..store import MemoryStore, Store
from .config import NetworkConfig
from .topology import Topology, detect_topology

__all__ = ["NetworkManager"]


class NetworkManager:
    """IP allocation inside the configured networks: one address per ``(owner, network)``,
    lowest free first, durable when a call returns, an ``IpAllocated``/``IpReleased`` event per
    change. Safe from any thread.

    Args:
        config: the networks; may be omitted with ``registry``.
        store: without ``registry``: the store of the registry to work with (the one that
            already uses it, else a new registry on it; default: in memory).
        registry: the registry whose addresses to manage (it must have networks).
    """

    def __init__(
        self, config: NetworkConfig | None = None, store: Store | None = None, *, registry: Registry | None = None
    ) -> None:
        if registry is None and store is not None:
            registry = Registry.on_store(store)
        if registry is None:
            if config is None:
                raise ConfigError("NetworkManager needs a networks configuration or a registry", field="networks")
            registry = Registry(store=store if store is not None else MemoryStore(), networks=config)
        elif registry.networks is None:
            raise ConfigError(
                "this registry has no networks: open it with Registry(..., networks=config) to allocate addresses",
                field="networks",
            )
        elif config is not None and config is not registry.networks and config.to_dict() != registry.networks.to_dict():
            raise ConfigError(
                "this registry uses other networks than the ones given: one registry, one networks file",
                field="networks",
            )
        self.registry = registry

    @property
    def config(self) -> NetworkConfig:
        networks = self.registry.networks
        assert networks is not None
        return networks

    @property
    def store(self) -> Store:
        return self.registry.store

    def detect(self, *, netns: str | None = None) -> Topology:
        """The host's topology, matched against the configured networks."""
        return detect_topology(self.config, netns=netns)

    def allocate_ip(self, owner: str, network: str | Location, *, ip: str | None = None) -> Allocation:
        """The owner's address in ``network`` (a name, or a location with one network); ``ip``
        asks for a specific one (``Conflict`` if another owner has it or it is reserved)."""
        return self.registry.allocate_ip(owner, network, ip=ip)

    def allocate_many(
        self, owners: Sequence[str], network: str | Location, *, ip: str | None = None
    ) -> list[Allocation]:
        """Allocate for several owners with one durable commit (all or nothing)."""
        return self.registry.allocate_many(owners, network, ip=ip)

    def release_ip(self, owner: str, network: str | Location | None = None) -> list[Allocation]:
        """Release the owner's address (in ``network``, or in every network); idempotent."""
        return self.registry.release_ip(owner, network)

    def get_allocation(self, owner: str, network: str | Location) -> Allocation:
        return self.registry.get_allocation(owner, network)

    def allocations(self, network: str | Location | None = None) -> list[Allocation]:
        """Current allocations, ordered by network then address."""
        return self.registry.allocations(network)

    def owner_of(self, ip: str) -> Allocation | None:
        return self.registry.owner_of(ip)

    def free_count(self, network: str | Location) -> int:
        return self.registry.free_count(network)

    def orphaned_allocations(self) -> list[dict[str, Any]]:
        """Stored allocations that no longer fit the configuration (kept, never reused)."""
        return self.registry.orphaned_allocations()
