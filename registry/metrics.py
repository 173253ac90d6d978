"""The server's Prometheus metrics (``GET /metrics``): counts only, no names, no secrets."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .core import Registry
from .model import ServiceState

__all__ = ["RegistryCollector", "ServerMetrics"]


class ServerMetrics:
    """Prometheus metrics of one server (a private registry, so tests can run many)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge("svcreg_connections", "Open WebSocket connections", registry=self.registry)
        self.requests = Counter(
            "svcreg_requests", "Requests by action and result", ["action", "result"], registry=self.registry
        )
        self.events_sent = Counter("svcreg_events_sent", "Event frames queued to subscribers", registry=self.registry)
        self.subscribers = Gauge("svcreg_subscribers", "Open subscriptions", registry=self.registry)
        self.commit_seconds = Histogram(
            "svcreg_store_commit_seconds",
            "Store commit (fsync) latency",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
            registry=self.registry,
        )
        self.reloads = Counter(
            "svcreg_config_reloads", "Configuration reloads (SIGHUP) by result", ["result"], registry=self.registry
        )
        self.registry.register(RegistryCollector(registry))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RegistryCollector(Collector):
    """The registry's own gauges, read at each scrape: instances by state, the revision."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Any:
        services = GaugeMetricFamily("svcreg_services", "Registered service instances by state", labels=["state"])
        counts = dict.fromkeys((state.value for state in ServiceState), 0)
        for entry in self._registry.list_services():
            counts[entry.state.value] += 1
        for state, count in counts.items():
            services.add_metric([state], count)
        yield services
        yield GaugeMetricFamily("svcreg_revision", "The registry's current revision", value=self._registry.revision)
