"""Events: filters, resume from a revision (no gaps, no duplicates), lag, async readers."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry import (
    Compacted,
    EventType,
    Registry,
    SubscriptionClosed,
    SubscriptionLagged,
    ValidationError,
)

from .helpers import make_entry


def revisions(subscription) -> list[int]:
    found = []
    while (event := subscription.get_nowait()) is not None:
        found.append(event.revision)
    return found


def test_event_types_select_what_arrives(registry: Registry) -> None:
    removals = registry.subscribe([EventType.SERVICE_REMOVED])
    by_name = registry.subscribe(["ServiceRegistered", "ServiceRemoved"])
    registry.add_or_update(make_entry())
    registry.remove("api-server")
    assert [e.type for e in [removals.get_nowait()]] == [EventType.SERVICE_REMOVED]
    assert revisions(by_name) == [1, 2]


def test_unknown_event_type_is_refused(registry: Registry) -> None:
    with pytest.raises(
        ValidationError, match=r"events\[0\]: must be one of ServiceRegistered, .*, got 'ServiceExploded'"
    ):
        registry.subscribe(["ServiceExploded"])


def test_filters(registry: Registry) -> None:
    web_only = registry.subscribe(filter={"service_name": "web"})
    on_h2 = registry.subscribe(filter={"host_id": "h2", "tag": "blue"})
    registry.add_or_update(make_entry("web", "h1"))
    registry.add_or_update(make_entry("db", "h2", tags=("blue",)))
    registry.add_or_update(make_entry("web", "h2"))
    assert [e.data["service"]["host_id"] for e in iter(web_only.get_nowait, None)] == ["h1", "h2"]
    assert [e.data["service"]["service_name"] for e in iter(on_h2.get_nowait, None)] == ["db"]
    with pytest.raises(ValidationError, match=r"filter\.colour: unknown field"):
        registry.subscribe(filter={"colour": "red"})


def test_topology_events_pass_service_filters(registry: Registry) -> None:
    subscription = registry.subscribe(filter={"service_name": "web"})
    assert registry.update_topology({"networks": ["lan"]}) is not None
    assert registry.update_topology({"networks": ["lan"]}) is None  # unchanged: no event
    event = subscription.get_nowait()
    assert event.type is EventType.NETWORK_TOPOLOGY_CHANGED
    assert event.data == {"topology": {"networks": ["lan"]}, "previous": None}


def test_resume_delivers_missed_events_then_live_ones(registry: Registry) -> None:
    for number in range(5):
        registry.add_or_update(make_entry(f"svc-{number}"))
    resumed = registry.subscribe(since_revision=2)
    registry.add_or_update(make_entry("svc-live"))
    assert revisions(resumed) == [3, 4, 5, 6]
    assert revisions(registry.subscribe(since_revision=6)) == []


def test_resume_from_the_future_is_refused(registry: Registry) -> None:
    registry.add_or_update(make_entry())
    with pytest.raises(ValidationError, match="since_revision 9 is ahead of the registry's revision 1"):
        registry.subscribe(since_revision=9)


def test_compacted_revision_is_a_clear_error(db_path: Path) -> None:
    registry = Registry.with_persistence(db_path, event_retention=10)
    for number in range(25):
        registry.add_or_update(make_entry(f"svc-{number}"))
    with pytest.raises(Compacted) as caught:
        registry.subscribe(since_revision=5)
    assert caught.value.oldest_revision == 16
    assert caught.value.code == "compacted"
    assert caught.value.details == {"oldest_revision": 16, "requested_revision": 5}
    assert revisions(registry.subscribe(since_revision=15)) == list(range(16, 26))
    registry.close()
    reloaded = Registry.load(db_path, event_retention=10)
    try:
        assert revisions(reloaded.subscribe(since_revision=20)) == [21, 22, 23, 24, 25]
        with pytest.raises(Compacted):
            reloaded.subscribe(since_revision=3)
    finally:
        reloaded.close()


def test_resume_works_across_a_restart(db_path: Path) -> None:
    registry = Registry.with_persistence(db_path)
    for number in range(3):
        registry.add_or_update(make_entry(f"svc-{number}"))
    registry.close()
    reloaded = Registry.load(db_path)
    try:
        reloaded.add_or_update(make_entry("svc-new"))
        resumed = reloaded.subscribe(since_revision=1)
        events = list(iter(resumed.get_nowait, None))
        assert [e.revision for e in events] == [2, 3, 4]
        assert events[0].data["service"]["service_name"] == "svc-1"
    finally:
        reloaded.close()


def test_slow_subscriber_is_dropped_without_slowing_others(registry: Registry) -> None:
    slow = registry.subscribe(maxsize=3)
    fast = registry.subscribe(maxsize=100)
    for number in range(10):
        registry.add_or_update(make_entry(f"svc-{number}"))
    assert revisions(fast) == list(range(1, 11))
    assert slow.lagged and slow.closed
    assert "lagged" in slow.close_reason
    assert [slow.get_nowait().revision for _ in range(3)] == [1, 2, 3]
    with pytest.raises(SubscriptionLagged) as caught:
        slow.get_nowait()
    assert caught.value.last_revision == 3
    assert slow not in registry.subscriptions
    # Resuming from the last revision it saw closes the gap exactly.
    resumed = registry.subscribe(since_revision=caught.value.last_revision)
    assert revisions(resumed) == list(range(4, 11))


def test_unsubscribe_and_close(registry: Registry) -> None:
    subscription = registry.subscribe()
    registry.add_or_update(make_entry())
    registry.unsubscribe(subscription.id)
    assert subscription.get_nowait().revision == 1  # queued events can still be read
    with pytest.raises(SubscriptionClosed):
        subscription.get_nowait()
    registry.add_or_update(make_entry(tags=("x",)))
    assert subscription.pending() == 0
    assert registry.subscriptions == []


def test_blocking_reader_in_a_thread(registry: Registry) -> None:
    subscription = registry.subscribe()
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.extend(e.revision for e in subscription))
    reader.start()
    for number in range(20):
        registry.add_or_update(make_entry(f"svc-{number}"))
    registry.unsubscribe(subscription)
    reader.join(timeout=10)
    assert got == list(range(1, 21))
    with pytest.raises(SubscriptionClosed):
        subscription.get(timeout=0)


def test_get_times_out(registry: Registry) -> None:
    assert registry.subscribe().get(timeout=0.05) is None


async def test_asyncio_reader_is_woken_from_another_thread(registry: Registry) -> None:
    subscription = registry.subscribe()
    writer = threading.Thread(target=lambda: [registry.add_or_update(make_entry(f"svc-{n}")) for n in range(10)])
    writer.start()
    got = [(await asyncio.wait_for(subscription.next_event(), 10)).revision for _ in range(10)]
    writer.join()
    assert got == list(range(1, 11))


async def test_one_publish_wakes_every_asyncio_subscriber_at_once(registry: Registry) -> None:
    subscriptions = [registry.subscribe() for _ in range(200)]
    readers = [asyncio.ensure_future(subscription.next_event()) for subscription in subscriptions]
    await asyncio.sleep(0)  # every reader waits
    await asyncio.to_thread(registry.add_or_update, make_entry())  # published from another thread
    done, pending = await asyncio.wait(readers, timeout=10)
    assert not pending and {task.result().revision for task in done} == {1}


def test_a_wake_for_a_closed_loop_is_dropped() -> None:
    from registry.events import _LoopWakeups

    loop = asyncio.new_event_loop()
    wakeups = _LoopWakeups.of(loop)
    first, second = loop.create_future(), loop.create_future()
    loop.close()
    wakeups.add(first)  # the loop is gone: nobody waits, and the waker must not raise
    wakeups.add(second)  # nor keep what it could not hand over
    assert not first.done() and wakeups._due == []


async def test_asyncio_iteration_ends_when_closed(registry: Registry) -> None:
    subscription = registry.subscribe()
    await asyncio.to_thread(registry.add_or_update, make_entry())
    subscription.close()
    assert [event.revision async for event in subscription] == [1]


def test_trio_reader_is_woken_from_another_thread(registry: Registry) -> None:
    subscription = registry.subscribe()

    async def main() -> list[int]:
        got = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                trio.to_thread.run_sync, lambda: [registry.add_or_update(make_entry(f"s-{n}")) for n in range(10)]
            )
            with trio.fail_after(10):
                for _ in range(10):
                    got.append((await subscription.next_event()).revision)
        return got

    assert trio.run(main) == list(range(1, 11))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    operations=st.lists(st.tuples(st.sampled_from(["put", "remove", "state"]), st.integers(0, 4)), max_size=40),
    resume_at=st.integers(0, 40),
    retention=st.integers(1, 50),
)
def test_resume_never_gaps_or_duplicates(operations, resume_at: int, retention: int) -> None:
    registry = Registry(event_retention=retention)
    live = registry.subscribe(maxsize=1000)
    try:
        for action, number in operations:
            name = f"svc-{number}"
            present = any(e.service_name == name for e in registry.list_services(service_name=name))
            if action == "put":
                registry.add_or_update(make_entry(name, tags=(str(registry.revision),)))
            elif action == "remove" and present:
                registry.remove(name)
            elif action == "state" and present:
                current = registry.get_service(name).state.value
                registry.set_state(name, "stopped" if current == "running" else "running")
        everything = [e.revision for e in iter(live.get_nowait, None)]
        assert everything == list(range(1, registry.revision + 1))
        since = min(resume_at, registry.revision)
        try:
            resumed = registry.subscribe(since_revision=since)
        except Compacted as exc:
            assert since < registry.revision - retention
            assert exc.oldest_revision == registry.revision - retention + 1
            return
        assert [e.revision for e in iter(resumed.get_nowait, None)] == list(range(since + 1, registry.revision + 1))
    finally:
        registry.close()
