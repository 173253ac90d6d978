"""svcreg: a service registry and ops toolkit for fleets run with Ansible.

The public names live here, whichever module defines them::

    from registry import Registry, ServiceEntry, NetworkInfo, Endpoint, Location, ServiceState
    from registry import NetworkConfig, NetworkManager, EventType, Event
    from registry import WsServer, WsClient, BlockingClient, TrioClient, TlsServerConfig, TlsClientConfig
    from registry import PackageDeployer, RemoteTarget, build_package, inspect_package

Only the exceptions are imported with the package; every other name is imported on first use,
so ``import registry.client`` (the Ansible controller's only need) loads neither the store
(sqlitedict), the network side (netaddr), the server (prometheus-client) nor deployment.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .exceptions import (
    Compacted,
    ConfigError,
    Conflict,
    Forbidden,
    InternalError,
    NotFound,
    PoolExhausted,
    ProtocolError,
    RateLimited,
    RegistryError,
    ServiceNotFound,
    StoreError,
    SubscriptionClosed,
    SubscriptionLagged,
    TooLarge,
    Unauthorized,
    UnknownAction,
    ValidationError,
)

if TYPE_CHECKING:
    from .client import BlockingClient, ConnectionSettings, TrioClient, WsClient
    from .core import DEFAULT_EVENT_RETENTION, Registry
    from .deploy import PackageDeployer, RemoteTarget
    from .events import Event, EventFilter, EventType, Subscription
    from .model import (
        Allocation,
        DeployJob,
        DetectedNetwork,
        Endpoint,
        EndpointRecord,
        Location,
        NetworkInfo,
        NetworkSummary,
        ServiceEntry,
        ServiceState,
        Topology,
    )
    from .network import NetworkConfig, NetworkManager, detect_topology
    from .package import build_package, inspect_package
    from .server import WsServer
    from .store import MemoryStore, SqliteStore, Store
    from .tls import TlsClientConfig, TlsServerConfig

_LAZY = {
    "DEFAULT_EVENT_RETENTION": "core",
    "Registry": "core",
    "Event": "events",
    "EventFilter": "events",
    "EventType": "events",
    "Subscription": "events",
    "Endpoint": "model",
    "EndpointRecord": "model",
    "Location": "model",
    "NetworkInfo": "model",
    "ServiceEntry": "model",
    "ServiceState": "model",
    "Allocation": "model",
    "DeployJob": "model",
    "DetectedNetwork": "model",
    "NetworkSummary": "model",
    "Topology": "model",
    "NetworkConfig": "network",
    "NetworkManager": "network",
    "detect_topology": "network",
    "MemoryStore": "store",
    "SqliteStore": "store",
    "Store": "store",
    "BlockingClient": "client",
    "ConnectionSettings": "client",
    "TrioClient": "client",
    "WsClient": "client",
    "WsServer": "server",
    "PackageDeployer": "deploy",
    "RemoteTarget": "deploy",
    "build_package": "package",
    "inspect_package": "package",
    "TlsClientConfig": "tls",
    "TlsServerConfig": "tls",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'registry' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EVENT_RETENTION",
    "PackageDeployer",
    "RemoteTarget",
    "build_package",
    "inspect_package",
    "Allocation",
    "BlockingClient",
    "ConnectionSettings",
    "Compacted",
    "ConfigError",
    "Conflict",
    "DeployJob",
    "DetectedNetwork",
    "Endpoint",
    "EndpointRecord",
    "Event",
    "EventFilter",
    "EventType",
    "Forbidden",
    "InternalError",
    "Location",
    "MemoryStore",
    "NetworkConfig",
    "NetworkInfo",
    "NetworkManager",
    "NetworkSummary",
    "NotFound",
    "PoolExhausted",
    "ProtocolError",
    "RateLimited",
    "Registry",
    "RegistryError",
    "ServiceEntry",
    "ServiceNotFound",
    "ServiceState",
    "SqliteStore",
    "Store",
    "StoreError",
    "Subscription",
    "SubscriptionClosed",
    "SubscriptionLagged",
    "TlsClientConfig",
    "TlsServerConfig",
    "TooLarge",
    "Topology",
    "TrioClient",
    "Unauthorized",
    "UnknownAction",
    "ValidationError",
    "WsClient",
    "WsServer",
    "__version__",
    "detect_topology",
]
