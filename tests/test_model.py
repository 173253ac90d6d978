"""The service model: validation names the field and the value; JSON round-trips."""

from __future__ import annotations

import copy
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry import Endpoint, Location, NetworkInfo, ServiceEntry, ServiceState, ValidationError
from registry.schema import decode_json

from .helpers import make_entry


def seed_entry() -> ServiceEntry:
    return ServiceEntry(
        "postgres",
        "docker-host",
        Location.LOCAL,
        NetworkInfo("127.0.0.1"),
        ServiceState.RUNNING,
        (Endpoint("db", 5432),),
    )


def test_wire_shape_matches_the_seed_example() -> None:
    data = seed_entry().to_dict()
    assert data["service_name"] == "postgres"
    assert data["host_id"] == "docker-host"
    assert data["location"] == "local"
    assert data["state"] == "running"
    assert data["endpoints"] == [{"name": "db", "port": 5432, "protocol": "tcp"}]
    assert data["network_info"] == {"ip": "127.0.0.1", "hostname": None, "network": None}
    json.dumps(data)  # plain JSON, nothing exotic


def test_from_dict_accepts_the_seed_example_verbatim() -> None:
    seed = {
        "service_name": "postgres",
        "host_id": "docker-host",
        "location": "local",
        "state": "running",
        "endpoints": [{"name": "db", "port": 5432}],
        "network_info": {"ip": "127.0.0.1"},
    }
    entry = ServiceEntry.from_dict(seed)
    assert entry == seed_entry()
    assert ServiceEntry.from_dict(entry.to_dict()) == entry


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"service_name": "API"}, "service_name", "'API'"),
        ({"service_name": "-api"}, "service_name", "'-api'"),
        ({"service_name": "a" * 64}, "service_name", "1-63"),
        ({"service_name": 7}, "service_name", "must be a string"),
        ({"host_id": ""}, "host_id", "''"),
        ({"host_id": "bad host"}, "host_id", "'bad host'"),
        ({"host_id": "a/b"}, "host_id", "'a/b'"),
        ({"location": "moon"}, "location", "'moon'"),
        ({"state": "sleeping"}, "state", "'sleeping'"),
        ({"network_info": {"ip": "300.1.1.1"}}, "network_info.ip", "'300.1.1.1'"),
        ({"network_info": {"ip": "0.0.0.0"}}, "network_info.ip", "unspecified"),
        ({"network_info": {"ip": "10.0.0.1"}}, "network_info.ip", "loopback"),
        ({"location": "lan", "network_info": {"ip": "127.0.0.5"}}, "network_info.ip", "use location 'local'"),
        ({"network_info": {"ip": "127.0.0.1", "hostname": "bad_host!"}}, "network_info.hostname", "bad_host!"),
        ({"network_info": {"ip": "127.0.0.1", "netmask": "x"}}, "network_info.netmask", "netmask"),
        ({"network_info": {"ip": None, "hostname": 5}}, "network_info.hostname", "must be a string"),
        ({"endpoints": [{"name": "db", "port": 0}]}, "endpoints[0].port", ">= 1, got 0"),
        ({"endpoints": [{"name": "db", "port": 65536}]}, "endpoints[0].port", "65536"),
        ({"endpoints": [{"name": "db", "port": "80"}]}, "endpoints[0].port", "'80'"),
        ({"endpoints": [{"name": "db", "port": True}]}, "endpoints[0].port", "True"),
        ({"endpoints": [{"name": "db", "port": 1, "protocol": "sctp"}]}, "endpoints[0].protocol", "'sctp'"),
        ({"endpoints": [{"name": "Db!", "port": 1}]}, "endpoints[0].name", "'Db!'"),
        ({"endpoints": [{"name": "db", "port": 1}, {"name": "db", "port": 2}]}, "endpoints", "used twice"),
        ({"endpoints": [{"port": 1}]}, "endpoints[0].name", "is required"),
        ({"endpoints": "db:5432"}, "endpoints", "must be an array"),
        ({"tags": "web"}, "tags", "must be an array"),
        ({"tags": [""]}, "tags[0]", "length >= 1"),
        ({"metadata": {"k": 1}}, "metadata.k", "must be a string"),
        ({"metadata": {"bad key": "v"}}, "metadata", "'bad key'"),
        ({"metadata": ["a"]}, "metadata", "must be an object"),
        ({"ttl_seconds": 0}, "ttl_seconds", "> 0.0, got 0"),
        ({"ttl_seconds": -5}, "ttl_seconds", "> 0.0, got -5"),
        ({"ttl_seconds": float("nan")}, "ttl_seconds", "> 0.0, got nan"),
        ({"ttl_seconds": "10"}, "ttl_seconds", "got '10'"),
        ({"deregister_after_seconds": 1e9}, "deregister_after_seconds", "<= 604800.0"),
        ({"version": ""}, "version", "length >= 1"),
        ({"mod_revision": -1}, "mod_revision", ">= 0, got -1"),
        ({"surprise": 1}, "surprise", "unknown field"),
    ],
)
def test_bad_input_names_field_and_value(changes: dict[str, object], field: str, fragment: str) -> None:
    data = seed_entry().to_dict()
    data.update(changes)
    with pytest.raises(ValidationError) as caught:
        ServiceEntry.from_dict(data)
    assert caught.value.field == field
    assert fragment in str(caught.value)
    assert caught.value.to_dict()["code"] == "bad_request"


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(ValidationError, match=r"^host_id: is required$"):
        ServiceEntry.from_dict({"service_name": "x", "network_info": {"ip": "127.0.0.1"}})
    with pytest.raises(ValidationError, match="must be an object"):
        ServiceEntry.from_dict(["not", "a", "dict"])


def test_ipv6_loopback_is_local_and_addresses_are_normalised() -> None:
    entry = ServiceEntry("api", "h", "local", {"ip": "0:0:0:0:0:0:0:1"})  # type: ignore[arg-type]
    assert entry.network_info.ip == "::1"
    assert entry.location is Location.LOCAL


def test_entries_are_immutable() -> None:
    entry = seed_entry()
    with pytest.raises(AttributeError):
        entry.state = ServiceState.FAILED  # type: ignore[misc]
    with pytest.raises(TypeError):
        entry.metadata["x"] = "y"  # type: ignore[index]
    with pytest.raises(TypeError):
        entry.metadata.update(x="y")  # type: ignore[attr-defined]
    assert copy.deepcopy(entry) == entry


def test_duplicate_tags_are_folded_in_order() -> None:
    entry = seed_entry().evolve(tags=["b", "a", "b"])
    assert entry.tags == ("b", "a")


names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
entries = st.builds(
    ServiceEntry,
    service_name=names,
    host_id=st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_.:-]{0,20}[A-Za-z0-9])?", fullmatch=True),
    location=st.just(Location.LAN),
    network_info=st.builds(NetworkInfo, ip=st.ip_addresses(v=4, network="10.0.0.0/8").map(str)),
    state=st.sampled_from(ServiceState),
    endpoints=st.lists(
        st.builds(Endpoint, name=names, port=st.integers(1, 65535), protocol=st.sampled_from(["tcp", "udp"])),
        max_size=4,
        unique_by=lambda endpoint: endpoint.name,
    ).map(tuple),
    tags=st.lists(st.text(min_size=1, max_size=10), max_size=5, unique=True).map(tuple),
    metadata=st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.text(max_size=20), max_size=4),
    ttl_seconds=st.none() | st.floats(0.5, 3600),
    version=st.none() | st.text(min_size=1, max_size=10),
)


@given(entries)
def test_json_round_trip_is_exact(entry: ServiceEntry) -> None:
    wire = json.loads(json.dumps(entry.to_dict()))
    assert ServiceEntry.from_dict(wire) == entry


def test_records_decode_straight_into_entries_with_the_same_errors() -> None:
    entry = make_entry("api", "h1", tags=("a", "b"), metadata={"k": "v"}).stamped(
        create_revision=3, mod_revision=5, updated_at=12.5
    )
    record = entry.to_record()
    assert "ttl_seconds" not in record and "hostname" not in record["network_info"]
    assert msgspec.json.decode(json.dumps(record), type=ServiceEntry) == entry
    assert decode_json(json.dumps(entry.to_dict()), ServiceEntry) == entry
    for bad, field_name in (
        ({**record, "service_name": "Bad_Name"}, "service_name"),
        ({**record, "surprise": 1}, "surprise"),
        ({key: value for key, value in record.items() if key != "host_id"}, "host_id"),
        ({**record, "state": "dancing"}, "state"),
        ({**record, "network_info": {"ip": "999.1.1.1"}}, "network_info.ip"),
        ({**record, "endpoints": [{"name": "x", "port": 1}, {"name": "x", "port": 2}]}, "endpoints"),
    ):
        with pytest.raises(ValidationError) as caught:
            decode_json(json.dumps(bad), ServiceEntry)
        with pytest.raises(ValidationError) as expected:
            ServiceEntry.from_dict(bad)
        assert caught.value.message == expected.value.message
        assert caught.value.field == expected.value.field == field_name


def test_calling_a_class_converts_plain_values_like_decoding() -> None:
    entry = ServiceEntry(
        "api",
        "h1",
        "lan",  # type: ignore[arg-type]
        {"ip": "10.0.0.1"},  # type: ignore[arg-type]
        endpoints=[{"name": "http", "port": 80}],  # type: ignore[arg-type]
        tags=["a"],  # type: ignore[arg-type]
        ttl_seconds=5,
    )
    assert entry.location is Location.LAN and entry.network_info == NetworkInfo("10.0.0.1")
    assert entry.endpoints == (Endpoint("http", 80),) and entry.tags == ("a",) and entry.ttl_seconds == 5.0
    assert ServiceEntry.from_dict(entry.to_dict()) == entry
    with pytest.raises(ValidationError) as caught:
        ServiceEntry("api", "h1", Location.LAN, NetworkInfo("10.0.0.1"), endpoints=[{"name": "x", "port": 0}])  # type: ignore[arg-type]
    assert (caught.value.field, caught.value.message) == (
        "endpoints[0].port",
        "endpoints[0].port: must be an integer >= 1, got 0",
    )
    with pytest.raises(ValidationError, match=r"^port: must be an integer <= 65535, got 70000$"):
        Endpoint("x", 70000)
    with pytest.raises(ValidationError, match=r"^network_info\.ip: location 'lan' cannot use the loopback"):
        entry.evolve(network_info=NetworkInfo("127.0.0.1"))


def test_a_rule_broken_inside_a_nested_struct_names_the_whole_path() -> None:
    data = seed_entry().to_dict()
    data["network_info"]["hostname"] = "bad_host!"
    with pytest.raises(ValidationError) as caught:
        ServiceEntry.from_dict(data, path="params.service")
    assert caught.value.field == "params.service.network_info.hostname"
    assert caught.value.message == "params.service.network_info.hostname: 'bad_host!' is not a valid DNS hostname"


def test_entries_encode_straight_to_json() -> None:
    entry = make_entry(metadata={"team": "core"}, tags=("a",))
    assert msgspec.json.decode(msgspec.json.encode(entry)) == entry.to_dict()
    assert msgspec.json.decode(msgspec.json.encode(entry), type=ServiceEntry) == entry


def test_null_means_the_default_on_the_wire() -> None:
    data = seed_entry().to_dict() | {"state": None, "endpoints": None, "tags": None, "metadata": None}
    assert ServiceEntry.from_dict(data) == seed_entry().evolve(endpoints=())
