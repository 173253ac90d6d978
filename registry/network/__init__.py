"""Networks from ``services.yaml``, IP allocation inside them, and topology detection.

Three parts, each usable on its own:

* :mod:`.config` - :class:`NetworkConfig`, the ``networks:`` section of ``services.yaml``
  (the seed's format), checked as a whole: every error names the file and the field.
* :mod:`.ipam` - :class:`NetworkManager` hands out addresses inside those networks, one per
  ``(owner, network)``, lowest free first, persisted in the store.
* :mod:`.topology` - :func:`detect_topology`, what networks this host is actually on.
"""

from __future__ import annotations

from .config import Network, NetworkConfig, Node
from .ipam import Allocation, NetworkManager, validate_owner
from .topology import DetectedNetwork, Topology, WireGuardConfig, detect_topology, parse_wireguard_config

__all__ = [
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
