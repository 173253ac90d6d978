"""The registry core: instances, revisions, one event per change, TTLs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from registry import (
    Endpoint,
    EventType,
    Location,
    Registry,
    ServiceEntry,
    ServiceNotFound,
    ServiceState,
    StoreError,
    ValidationError,
)

from .helpers import FakeClock, make_entry


def drain(subscription) -> list:
    events = []
    while (event := subscription.get_nowait()) is not None:
        events.append(event)
    return events


def test_register_and_discover(registry: Registry) -> None:
    stored = registry.add_or_update(make_entry())
    assert stored.create_revision == stored.mod_revision == 1
    assert stored.updated_at is not None
    found = registry.get_service("api-server")
    assert found == stored
    assert f"http://{found.network_info.ip}:8080" == "http://192.168.1.100:8080"
    assert registry.revision == 1
    assert len(registry) == 1


def test_add_or_update_accepts_the_wire_dict(registry: Registry) -> None:
    stored = registry.add_or_update(make_entry().to_dict())
    assert stored.service_name == "api-server"


def test_every_change_gets_the_next_revision_and_one_event(registry: Registry) -> None:
    subscription = registry.subscribe()
    first = registry.add_or_update(make_entry())
    registry.add_or_update(make_entry(tags=("blue",)))
    registry.add_or_update(make_entry(tags=("blue",), endpoints=(Endpoint("http", 9090),)))
    registry.set_state("api-server", ServiceState.STOPPED)
    updated = registry.add_or_update(
        make_entry(tags=("blue",), endpoints=(Endpoint("http", 9091),), state=ServiceState.RUNNING)
    )
    registry.remove("api-server")
    events = drain(subscription)
    assert [event.type for event in events] == [
        EventType.SERVICE_REGISTERED,
        EventType.SERVICE_UPDATED,
        EventType.ENDPOINT_CHANGED,
        EventType.SERVICE_STATE_CHANGED,
        EventType.SERVICE_STATE_CHANGED,  # state and endpoints at once: one event, both listed
        EventType.SERVICE_REMOVED,
    ]
    assert [event.revision for event in events] == [1, 2, 3, 4, 5, 6]
    assert events[1].data["changes"] == ["tags"]
    assert events[1].data["previous"] == {"tags": []}
    assert events[3].data["previous"] == {"state": "running"}
    assert events[4].data["changes"] == ["state", "endpoints"]
    assert updated.create_revision == first.create_revision == 1
    assert updated.mod_revision == 5
    assert events[5].data["service"]["mod_revision"] == 5
    assert events[5].data["reason"] == "removed"


def test_an_update_that_changes_nothing_is_not_a_change(registry: Registry) -> None:
    subscription = registry.subscribe()
    first = registry.add_or_update(make_entry())
    again = registry.add_or_update(make_entry())
    assert again == first
    assert registry.set_state("api-server", ServiceState.RUNNING) == first
    assert registry.revision == 1
    assert len(drain(subscription)) == 1


def test_the_same_service_on_many_hosts(registry: Registry) -> None:
    registry.add_or_update(make_entry(host="h1", ip="192.168.1.11"))
    registry.add_or_update(make_entry(host="h2", ip="192.168.1.12"))
    assert {entry.host_id for entry in registry.list_services(service_name="api-server")} == {"h1", "h2"}
    assert registry.get_service("api-server", "h2").network_info.ip == "192.168.1.12"
    with pytest.raises(ValidationError, match=r"several hosts \(h1, h2\); say which with host_id"):
        registry.remove("api-server")
    with pytest.raises(ValidationError, match="several hosts"):
        registry.set_state("api-server", "stopped")
    registry.remove("api-server", "h1")
    assert [entry.host_id for entry in registry.list_services()] == ["h2"]


def test_get_service_prefers_running_then_nearest(registry: Registry) -> None:
    registry.add_or_update(make_entry(host="wg", ip="10.0.0.5", location=Location.WIREGUARD))
    registry.add_or_update(make_entry(host="lan", ip="192.168.1.5"))
    registry.add_or_update(make_entry(host="here", ip="127.0.0.1", location=Location.LOCAL, state="failed"))
    assert registry.get_service("api-server").host_id == "lan"
    registry.set_state("api-server", "stopped", host_id="lan")
    assert registry.get_service("api-server").host_id == "wg"
    registry.set_state("api-server", "stopped", host_id="wg")
    assert registry.get_service("api-server").host_id == "here"  # nothing running: nearest


def test_not_found_errors_name_the_instance(registry: Registry) -> None:
    with pytest.raises(ServiceNotFound, match="'ghost' is not registered") as caught:
        registry.get_service("ghost")
    assert caught.value.code == "not_found"
    registry.add_or_update(make_entry())
    with pytest.raises(ServiceNotFound, match="not registered on host 'elsewhere'"):
        registry.get_service("api-server", "elsewhere")
    with pytest.raises(ServiceNotFound):
        registry.remove("ghost")
    with pytest.raises(ServiceNotFound):
        registry.heartbeat("api-server", "elsewhere")
    with pytest.raises(ValidationError, match="service_name 'Bad Name'"):
        registry.get_service("Bad Name")


def test_list_services_filters(registry: Registry) -> None:
    registry.add_or_update(make_entry("web", "h1", ip="192.168.1.1", tags=("edge",)))
    registry.add_or_update(make_entry("web", "h2", ip="192.168.1.2", state="stopped"))
    registry.add_or_update(make_entry("db", "h1", ip="192.168.1.1"))
    registry.add_or_update(make_entry("cache", "h3", ip="127.0.0.1", location=Location.LOCAL))
    keys = lambda entries: [entry.key for entry in entries]  # noqa: E731
    assert keys(registry.list_services()) == [("cache", "h3"), ("db", "h1"), ("web", "h1"), ("web", "h2")]
    assert keys(registry.list_services(host_id="h1")) == [("db", "h1"), ("web", "h1")]
    assert keys(registry.list_services(service_name="web", state="running")) == [("web", "h1")]
    assert keys(registry.list_services(location="local")) == [("cache", "h3")]
    assert keys(registry.list_services(tag="edge")) == [("web", "h1")]
    assert registry.list_services(service_name="nope") == []
    with pytest.raises(ValidationError, match=r"filter\.location: must be one of local, lan, wireguard, got 'mars'"):
        registry.list_services(location="mars")
    with pytest.raises(ValidationError, match=r"filter\.state: must be one of .*, got 'zombie'"):
        registry.list_services(state="zombie")


def test_list_endpoints(registry: Registry) -> None:
    registry.add_or_update(make_entry(endpoints=(Endpoint("http", 8080), Endpoint("metrics", 9100))))
    registry.add_or_update(make_entry("dns", "h9", ip="fd00::53", endpoints=(Endpoint("dns", 53, "udp"),)))
    records = registry.list_endpoints()
    assert [(r.service_name, r.endpoint, r.address) for r in records] == [
        ("api-server", "http", "192.168.1.100:8080"),
        ("api-server", "metrics", "192.168.1.100:9100"),
        ("dns", "dns", "[fd00::53]:53"),
    ]
    assert records[2].to_dict()["protocol"] == "udp"


# --- TTL ---------------------------------------------------------------------------------


def test_missed_heartbeat_fails_the_instance_once(registry: Registry, clock: FakeClock) -> None:
    registry.add_or_update(make_entry(ttl_seconds=10))
    subscription = registry.subscribe()
    clock.advance(9)
    assert registry.expire() == []
    registry.heartbeat("api-server")
    clock.advance(9)
    assert registry.expire() == []  # the heartbeat restarted the TTL
    clock.advance(2)
    events = registry.expire()
    assert [event.type for event in events] == [EventType.SERVICE_STATE_CHANGED]
    assert events[0].data["reason"] == "ttl_expired"
    assert registry.get_service("api-server").state is ServiceState.FAILED
    clock.advance(100)
    assert registry.expire() == []  # failed once, not again
    assert len(drain(subscription)) == 1


def test_heartbeat_revives_a_ttl_failure(registry: Registry, clock: FakeClock) -> None:
    registry.add_or_update(make_entry(ttl_seconds=5))
    clock.advance(6)
    registry.expire()
    revived = registry.heartbeat("api-server")
    assert revived.state is ServiceState.RUNNING
    # A service failed on purpose is not revived by a heartbeat.
    registry.set_state("api-server", "failed")
    assert registry.heartbeat("api-server").state is ServiceState.FAILED


def test_heartbeat_is_not_a_change(registry: Registry) -> None:
    registry.add_or_update(make_entry(ttl_seconds=5))
    before = registry.revision
    for _ in range(10):
        registry.heartbeat("api-server")
    assert registry.revision == before


def test_deregister_after_failure(registry: Registry, clock: FakeClock) -> None:
    registry.add_or_update(make_entry(ttl_seconds=5, deregister_after_seconds=30))
    subscription = registry.subscribe()
    clock.advance(6)
    registry.expire()
    clock.advance(29)
    assert registry.expire() == []
    clock.advance(2)
    events = registry.expire()
    assert [event.type for event in events] == [EventType.SERVICE_REMOVED]
    assert events[0].data["reason"] == "deregistered_after_failure"
    assert registry.list_services() == []
    assert [event.type for event in drain(subscription)] == [
        EventType.SERVICE_STATE_CHANGED,
        EventType.SERVICE_REMOVED,
    ]


def test_stopped_instances_need_no_heartbeat(registry: Registry, clock: FakeClock) -> None:
    registry.add_or_update(make_entry(ttl_seconds=5, state="stopped"))
    clock.advance(60)
    assert registry.expire() == []
    assert registry.next_deadline() is None
    registry.set_state("api-server", "running")
    assert registry.next_deadline() == clock.now + 5


def test_reaper_thread_expires_on_its_own(tmp_path: Path) -> None:
    registry = Registry()
    subscription = registry.subscribe(["ServiceStateChanged"])
    registry.add_or_update(make_entry(ttl_seconds=0.2))
    registry.start_reaper(interval=0.05)
    event = subscription.get(timeout=5)
    registry.close()
    assert event is not None and event.data["reason"] == "ttl_expired"


def test_ttls_restart_with_grace_after_a_reload(db_path: Path, clock: FakeClock) -> None:
    registry = Registry.with_persistence(db_path, clock=clock)
    registry.add_or_update(make_entry(ttl_seconds=10))
    registry.close()
    clock.advance(3600)
    reloaded = Registry.load(db_path, clock=clock)
    try:
        assert reloaded.expire() == []
        clock.advance(11)
        assert len(reloaded.expire()) == 1
    finally:
        reloaded.close()


# --- persistence -----------------------------------------------------------------------------


def test_state_and_revision_survive_restart(db_path: Path) -> None:
    registry = Registry.with_persistence(db_path)
    registry.add_or_update(make_entry("a", "h1"))
    registry.add_or_update(make_entry("b", "h1"))
    registry.set_state("a", "stopped")
    registry.remove("b")
    registry.close()
    reloaded = Registry.load(db_path)
    try:
        assert [entry.key for entry in reloaded.list_services()] == [("a", "h1")]
        assert reloaded.get_service("a").state is ServiceState.STOPPED
        assert reloaded.revision == 4
        assert reloaded.add_or_update(make_entry("c", "h1")).mod_revision == 5
    finally:
        reloaded.close()


def test_closed_registry_refuses_writes(registry: Registry) -> None:
    registry.close()
    with pytest.raises(StoreError, match="closed"):
        registry.add_or_update(make_entry())


def test_concurrent_writers_get_unique_revisions(registry: Registry) -> None:
    results: list[ServiceEntry] = []
    lock = threading.Lock()

    def writer(number: int) -> None:
        for index in range(50):
            stored = registry.add_or_update(make_entry(f"svc-{number}-{index}", f"h{number}"))
            with lock:
                results.append(stored)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(entry.mod_revision for entry in results) == list(range(1, 401))
    assert registry.revision == 400


def test_event_retention_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="event_retention"):
        Registry(event_retention=0)


def test_add_or_update_many_is_all_or_nothing(registry: Registry) -> None:
    subscription = registry.subscribe()
    stored = registry.add_or_update_many([make_entry("a"), make_entry("b"), make_entry("a")])
    assert [entry.mod_revision for entry in stored] == [1, 2, 1]  # the repeat is no change
    bad = make_entry("c").to_dict() | {"location": "moon"}
    with pytest.raises(ValidationError, match="location: must be one of local, lan, wireguard, got 'moon'"):
        registry.add_or_update_many([make_entry("d"), bad])
    assert [entry.service_name for entry in registry.list_services()] == ["a", "b"]
    assert [event.revision for event in iter(subscription.get_nowait, None)] == [1, 2]


def test_staged_writes_publish_only_once_durable(registry: Registry) -> None:
    subscription = registry.subscribe(None)
    outcomes, revision = registry.stage_each([make_entry("api", "h1"), make_entry("db", "h2")])
    assert [entry.mod_revision for entry in outcomes] == [1, 2] and revision == 2
    assert subscription.get_nowait() is None  # written, not committed: nobody hears of it yet
    finished = threading.Event()
    outcome: list[StoreError | None] = []

    def done(error: StoreError | None) -> None:
        outcome.append(error)
        finished.set()

    registry.make_durable_soon(revision, done)
    assert finished.wait(10) and outcome == [None]
    assert [event.revision for event in drain(subscription)] == [1, 2]  # published before done
    assert registry.stage_each([make_entry("api", "h1")]) == ([registry.get_service("api")], 0)  # no change


def test_add_or_update_each_fails_bad_entries_alone(registry: Registry) -> None:
    good = make_entry("api", "h1")
    bad = dict(make_entry("web", "h2").to_dict(), service_name="Not_A_Name")
    subscription = registry.subscribe(None)
    first, failed, second = registry.add_or_update_each([good, bad, make_entry("db", "h3")])
    assert (first.service_name, first.mod_revision) == ("api", 1)
    assert isinstance(failed, ValidationError) and failed.field == "service_name"
    assert (second.service_name, second.mod_revision) == ("db", 2)
    assert [event.revision for event in (subscription.get(timeout=1), subscription.get(timeout=1))] == [1, 2]
    assert sorted(entry.service_name for entry in registry.list_services()) == ["api", "db"]
