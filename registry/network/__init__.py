"""Networks from ``services.yaml``, IP allocation inside them, and topology detection.

Three parts, each usable on its own:

* :mod:`.config` - :class:`NetworkConfig`, the ``networks:`` section of ``services.yaml``
  (the seed's format), checked as a whole: every error names the file and the field.
* :mod:`.ipam` - :class:`AddressBook` holds the addresses inside those networks, one per
  ``(owner, network)``, lowest free first, persisted in the store; the registry drives it and
  :class:`NetworkManager` (:mod:`.manager`) is the seed's API over the registry.
* :mod:`.topology` - :func:`detect_topology`, what networks this host is actually on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..model import Allocation, DetectedNetwork, Topology
from .config import Network, NetworkConfig, Node
from .ipam import AddressBook, validate_owner
from .topology import WireGuardConfig, detect_topology, parse_wireguard_config

if TYPE_CHECKING:
    from .manager import NetworkManager

__all__ = [
    "AddressBook",
    "Allocation",
    "DetectedNetwork",
    "Network",
    "NetworkConfig",
    "NetworkManager",
    "Node",
    "Topology",
    "WireGuardConfig",
    "detect_topology",
    "parse_wireguard_config",
    "validate_owner",
]


def __getattr__(name: str) -> Any:
    # NetworkManager works over the registry core, which imports this package: loaded on first use.
    if name == "NetworkManager":
        from .manager import NetworkManager

        return NetworkManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
