"""Test helpers shared by test modules and by helper subprocesses."""

from __future__ import annotations

from registry import Endpoint, Location, NetworkInfo, ServiceEntry, ServiceState


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_entry(
    name: str = "api-server",
    host: str = "prod-host-1",
    *,
    ip: str = "192.168.1.100",
    location: Location = Location.LAN,
    state: ServiceState = ServiceState.RUNNING,
    **fields: object,
) -> ServiceEntry:
    fields.setdefault("endpoints", (Endpoint("http", 8080),))
    return ServiceEntry(name, host, location, NetworkInfo(ip), state, **fields)  # type: ignore[arg-type]
