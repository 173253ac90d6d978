"""ServiceQuery: one filter type, one set of messages."""

from __future__ import annotations

import pytest

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
