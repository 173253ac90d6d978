"""module_utils/service.py with a fake client: compare, then write only when needed."""

from __future__ import annotations

from typing import Any

import pytest

from ansible_collections.svcreg.registry.plugins.module_utils.service import (
    LOCATIONS,
    RUN_STATES,
    run_ip_allocation,
    run_service,
    run_service_info,
    wanted_entry,
)
from registry.exceptions import ServiceNotFound, ValidationError
from registry.model import Location, ServiceEntry, ServiceState


class FakeClient:
    def __init__(self) -> None:
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.allocations: list[dict[str, Any]] = []
        self.writes: list[str] = []
        self.revision = 0

    def get_service(self, name: str, host: str) -> ServiceEntry:
        try:
            return ServiceEntry.from_dict(self.services[name, host])
        except KeyError:
            raise ServiceNotFound(f"service {name!r} is not registered on host {host!r}") from None

    def register_service(self, entry: dict[str, Any]) -> ServiceEntry:
        self.writes.append("register")
        self.revision += 1
        stored = dict(entry, mod_revision=self.revision)
        self.services[entry["service_name"], entry["host_id"]] = stored
        return ServiceEntry.from_dict(stored)

    def remove_service(self, name: str, host: str) -> None:
        self.writes.append("remove")
        del self.services[name, host]

    def list_allocations(self, network: str | None = None) -> list[dict[str, Any]]:
        return [item for item in self.allocations if network in (None, item["network"])]

    def allocate_ip(self, owner: str, network: str) -> dict[str, Any]:
        self.writes.append("allocate")
        allocation = {"owner": owner, "network": network, "ip": f"10.0.0.{len(self.allocations) + 2}", "prefixlen": 24}
        self.allocations.append(allocation)
        return allocation

    def release_ip(self, owner: str, network: str | None = None) -> list[dict[str, Any]]:
        self.writes.append("release")
        released = [item for item in self.allocations if item["owner"] == owner]
        self.allocations = [item for item in self.allocations if item["owner"] != owner]
        return released


def params(**given: Any) -> dict[str, Any]:
    base = {"name": "api-server", "host": "prod-api", "state": "present"}
    return {**base, **given}


def test_new_instance_is_registered_once_then_unchanged() -> None:
    client = FakeClient()
    wanted = params(ip="192.168.1.100", endpoints=[{"name": "http", "port": 8080, "protocol": "tcp"}], ttl=30)
    first = run_service(client, wanted, check_mode=False)
    second = run_service(client, wanted, check_mode=False)
    assert first["changed"] and not second["changed"]
    assert client.writes == ["register"]
    assert first["diff"]["before"] == {} and first["diff"]["after"]["ttl_seconds"] == 30.0


def test_check_mode_predicts_without_writing() -> None:
    client = FakeClient()
    result = run_service(client, params(ip="10.0.0.1"), check_mode=True)
    assert result["changed"] and result["service"]["network_info"]["ip"] == "10.0.0.1"
    assert client.writes == []


def test_unset_options_keep_current_values() -> None:
    client = FakeClient()
    run_service(client, params(ip="10.0.0.1", tags=["blue"], metadata={"team": "core"}), check_mode=False)
    result = run_service(client, params(state="stopped"), check_mode=False)
    assert result["changed"] and result["diff"]["before"]["state"] == "running"
    assert result["service"]["tags"] == ["blue"] and result["service"]["metadata"] == {"team": "core"}


def test_endpoint_order_does_not_count_as_a_change() -> None:
    client = FakeClient()
    endpoints = [{"name": "http", "port": 80, "protocol": "tcp"}, {"name": "admin", "port": 81, "protocol": "tcp"}]
    run_service(client, params(ip="10.0.0.1", endpoints=endpoints), check_mode=False)
    assert not run_service(client, params(endpoints=endpoints[::-1]), check_mode=False)["changed"]


def test_absent_removes_once() -> None:
    client = FakeClient()
    run_service(client, params(ip="10.0.0.1"), check_mode=False)
    assert run_service(client, params(state="absent"), check_mode=False)["changed"]
    assert not run_service(client, params(state="absent"), check_mode=False)["changed"]
    assert client.writes == ["register", "remove"]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({}, "is required to register a new instance of 'api-server'"),
        ({"ip": "not-an-ip"}, "ip: 'not-an-ip' is not a valid IP address"),
        ({"ip": "10.0.0.1", "name": "Bad_Name"}, "name: 'Bad_Name' is invalid"),
        (
            {"ip": "10.0.0.1", "endpoints": [{"name": "http", "port": 70000}]},
            r"endpoints\[0\]\.port: must be an integer <= 65535, got 70000",
        ),
    ],
)
def test_bad_input_names_the_option(given: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        wanted_entry(params(**given), None)


def test_ip_allocation_is_idempotent_and_releases() -> None:
    client = FakeClient()
    wanted = {"owner": "web-1", "network": "production", "state": "present"}
    assert run_ip_allocation(client, wanted, check_mode=True)["ip"] is None
    first = run_ip_allocation(client, wanted, check_mode=False)
    second = run_ip_allocation(client, wanted, check_mode=False)
    assert first["changed"] and not second["changed"] and first["ip"] == second["ip"] == "10.0.0.2"
    assert (first["network"], first["prefixlen"]) == ("production", 24)
    gone = dict(wanted, state="absent")
    assert run_ip_allocation(client, gone, check_mode=False)["changed"]
    assert not run_ip_allocation(client, gone, check_mode=False)["changed"]
    assert client.writes == ["allocate", "release"]


def test_option_choices_are_the_models() -> None:
    assert list(RUN_STATES) == [state.value for state in ServiceState]
    assert list(LOCATIONS) == [location.value for location in Location]


def test_service_info_filters_go_through_the_registrys_query() -> None:
    class Listing:
        def list_services(self, **filters: Any) -> list[ServiceEntry]:
            self.filters = filters
            return []

    client = Listing()
    assert run_service_info(client, {"name": "api", "state": "running", "tag": None}) == {
        "changed": False,
        "services": [],
    }
    assert client.filters == {"service_name": "api", "state": "running"}
    with pytest.raises(ValidationError, match=r"filter\.network"):
        run_service_info(client, {"network": "x" * 300})


def test_a_new_address_drops_the_old_network_and_the_registry_places_it() -> None:
    current = ServiceEntry("api", "h1", Location.LAN, {"ip": "192.168.1.5", "network": "production"}).to_dict()
    moved = wanted_entry({"name": "api", "host": "h1", "ip": "10.0.0.5"}, current)
    assert moved["network_info"] == {"ip": "10.0.0.5", "hostname": None, "network": None}
    assert moved["location"] is None  # from the new address, by the registry
    same = wanted_entry({"name": "api", "host": "h1", "ip": "192.168.1.5"}, current)
    assert same["network_info"]["network"] == "production" and same["location"] == "lan"
    allocated = wanted_entry({"name": "web", "host": "h2", "network": "production"}, None)
    assert allocated["network_info"] == {"ip": None, "hostname": None, "network": "production"}


def test_metadata_numbers_and_booleans_become_strings_other_values_are_named() -> None:
    params = {"name": "api", "host": "h", "ip": "10.0.0.1", "location": "lan"}
    entry = wanted_entry({**params, "metadata": {"replicas": 3, "canary": True, "ratio": 0.5}}, None)
    assert entry["metadata"] == {"replicas": "3", "canary": "true", "ratio": "0.5"}
    with pytest.raises(ValueError, match=r"metadata\.owners: must be a string"):
        wanted_entry({**params, "metadata": {"owners": ["a", "b"]}}, None)
