"""ServiceQuery: one filter type, one set of messages."""

from __future__ import annotations

import pytest

from registry import Location, Registry, ServiceState
from registry.exceptions import ValidationError
from registry.query import QUERY_FIELDS, ServiceQuery

from .helpers import make_entry


def test_parse_and_match() -> None:
    entry = make_entry("api", "h1", tags=("blue",))
    assert ServiceQuery.parse(None).is_everything
    assert ServiceQuery.parse({"service_name": "api", "tag": "blue"}).matches(entry)
    assert not ServiceQuery.parse({"host_id": "h2"}).matches(entry)
    assert ServiceQuery.parse({"location": entry.location.value, "state": "running"}).matches(entry)
    assert ServiceQuery.parse({"state": "failed", "network": "x"}).to_dict() == {"state": "failed", "network": "x"}
    assert set(QUERY_FIELDS) == {"service_name", "host_id", "location", "state", "network", "tag"}


@pytest.mark.parametrize(
    ("value", "field", "fragment"),
    [
        ({"location": "mars"}, "filter.location", "must be one of local, lan, wireguard, got 'mars'"),
        ({"state": 5}, "filter.state", "got 5"),
        ({"colour": "red"}, "filter.colour", "unknown field"),
        ({"tag": ""}, "filter.tag", "got ''"),
        ("api", "filter", "must be an object"),
    ],
)
def test_bad_filters_name_the_field(value: object, field: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ServiceQuery.parse(value)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert fragment in caught.value.message


def test_an_entry_and_its_wire_form_match_alike() -> None:
    entry = make_entry("api", "h1", tags=("blue",))
    for query in (
        ServiceQuery(),
        ServiceQuery.parse({"service_name": "api", "location": "lan", "state": "running", "tag": "blue"}),
        ServiceQuery.parse({"host_id": "h2"}),
        ServiceQuery.parse({"network": "office"}),
    ):
        assert query.matches(entry) == query.matches(entry.to_dict())


def test_list_services_takes_a_query_or_keywords() -> None:
    with Registry() as registry:
        registry.add_or_update(make_entry("api", "h1"))
        registry.add_or_update(make_entry("db", "h2", state=ServiceState.STOPPED))
        assert [e.key for e in registry.list_services(query=ServiceQuery(state=ServiceState.STOPPED))] == [("db", "h2")]
        assert [e.key for e in registry.list_services({"service_name": "api"})] == [("api", "h1")]
        assert [e.key for e in registry.list_services(state="running")] == [("api", "h1")]
        assert [r.service_name for r in registry.list_endpoints(ServiceQuery(host_id="h2"))] == ["db"]
        with pytest.raises(ValidationError, match="not both"):
            registry.list_services(ServiceQuery(), host_id="h1")


def test_every_filter_refuses_a_bad_value_with_the_same_message() -> None:
    messages = set()
    with Registry() as registry:
        for call in (
            lambda: registry.list_services(location="mars"),
            lambda: registry.list_services({"location": "mars"}),
            lambda: registry.list_endpoints(location="mars"),
            lambda: registry.subscribe(filter={"location": "mars"}),
            lambda: ServiceQuery.parse({"location": "mars"}),
        ):
            with pytest.raises(ValidationError) as caught:
                call()
            assert caught.value.field == "filter.location"
            messages.add(caught.value.message)
    assert messages == {"filter.location: must be one of local, lan, wireguard, got 'mars'"}


def test_a_query_built_in_python_is_checked_too() -> None:
    assert ServiceQuery(location="lan").location is Location.LAN  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"^location: must be one of local, lan, wireguard, got 'mars'$"):
        ServiceQuery(location="mars")  # type: ignore[arg-type]
