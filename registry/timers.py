"""TTL and deregistration deadlines of service instances, on one heap.

An instance with ``ttl_seconds`` that is running or starting must be heard from (a
write or a heartbeat) within its TTL, or the registry marks it failed; a failed instance
with ``deregister_after_seconds`` is removed once that much time has passed. This module
only keeps the deadlines; the registry decides what a due deadline does.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

from .exceptions import StoreError
from .model import InstanceKey, ServiceEntry, ServiceState

__all__ = ["Deadline", "Reaper", "Timers"]

log = logging.getLogger(__name__)

_LIVE_STATES: Final = frozenset({ServiceState.RUNNING, ServiceState.STARTING})


class Deadline(enum.Enum):
    TTL = "ttl"
    """A missed heartbeat: the instance is marked failed."""
    DEREGISTER = "deregister"
    """Failed for long enough: the instance is removed."""


class Timers:
    """The current deadline of each kind for each instance. Not thread-safe: the registry
    calls it under its lock."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline, InstanceKey]] = []
        self._sequence = itertools.count()
        self._current: dict[Deadline, dict[InstanceKey, float]] = {kind: {} for kind in Deadline}

    def arm(self, entry: ServiceEntry, now: float, *, heartbeat: bool = False) -> None:
        """Set the deadlines ``entry`` calls for, from ``now``; a heartbeat only restarts the TTL."""
        key = entry.key
        if entry.ttl_seconds is not None and entry.state in _LIVE_STATES:
            self._push(Deadline.TTL, key, now + entry.ttl_seconds)
        else:
            self._current[Deadline.TTL].pop(key, None)
        if heartbeat:
            return
        if entry.deregister_after_seconds is not None and entry.state is ServiceState.FAILED:
            self._push(Deadline.DEREGISTER, key, now + entry.deregister_after_seconds)
        else:
            self._current[Deadline.DEREGISTER].pop(key, None)

    def forget(self, key: InstanceKey) -> None:
        for deadlines in self._current.values():
            deadlines.pop(key, None)

    def pop_due(self, now: float) -> Iterator[tuple[Deadline, InstanceKey]]:
        """Every deadline due at ``now``, earliest first, including ones armed meanwhile."""
        while self._heap and self._heap[0][0] <= now:
            deadline, _, kind, key = heapq.heappop(self._heap)
            deadlines = self._current[kind]
            if deadlines.get(key) == deadline:
                del deadlines[key]
                yield kind, key

    def next_deadline(self) -> float | None:
        """The clock time of the next deadline, or None when nothing is due."""
        while self._heap:
            deadline, _, kind, key = self._heap[0]
            if self._current[kind].get(key) == deadline:
                return deadline
            heapq.heappop(self._heap)
        return None

    def _push(self, kind: Deadline, key: InstanceKey, deadline: float) -> None:
        self._current[kind][key] = deadline
        heapq.heappush(self._heap, (deadline, next(self._sequence), kind, key))
        # Heartbeats leave superseded deadlines behind; rebuild before they pile up.
        live = sum(map(len, self._current.values()))
        if len(self._heap) > 4 * live + 1024:
            self._heap = [
                (when, next(self._sequence), timer_kind, timer_key)
                for timer_kind, deadlines in self._current.items()
                for timer_key, when in deadlines.items()
            ]
            heapq.heapify(self._heap)


class Reaper:
    """A daemon thread calling ``expire`` every ``interval`` seconds until :meth:`stop`;
    it stops by itself if the store fails."""

    def __init__(self, expire: Callable[[], Any], *, interval: float) -> None:
        self._expire = expire
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="svcreg-ttl-reaper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self._expire()
            except StoreError:
                log.exception("TTL reaper stopped: the store failed")
                return

    def stop(self) -> None:
        """Stop and wait for the thread (unless called from it)."""
        self._stopping.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
