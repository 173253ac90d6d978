"""The wire codec, without a network: every frame shape and every bad input."""

from __future__ import annotations

import json

import msgspec
import pytest

from registry import (
    Compacted,
    EventType,
    Forbidden,
    NotFound,
    ProtocolError,
    ServiceNotFound,
    SubscriptionLagged,
    UnknownAction,
    ValidationError,
)
from registry.events import Event
from registry.exceptions import ERROR_CODES, error_from_wire
from registry.model import Endpoint, Location, NetworkInfo, ServiceEntry
from registry.paging import Page
from registry.protocol import (
    ACTIONS,
    ClientCodec,
    Delivery,
    ErrorMessage,
    EventMessage,
    InstanceParams,
    JobMessage,
    NoParams,
    RequestError,
    Response,
    Route,
    decode_request,
    encode_error,
    encode_event,
    encode_job,
    encode_response,
)
from registry.query import ServiceQuery

from .helpers import make_entry


def frame(**fields: object) -> str:
    return json.dumps({"id": "1", "type": "request", **fields})


def test_round_trip_through_both_halves() -> None:
    codec = ClientCodec()
    request_id, text = codec.encode_request("get_service", {"service_name": "postgres", "host_id": None})
    request = decode_request(text)
    assert (request.id, request.action, dict(request.params)) == (
        request_id,
        "get_service",
        {"service_name": "postgres"},
    )
    entry = make_entry()
    message = codec.decode(encode_response(request.id, entry))
    assert isinstance(message, Response)
    assert message.result == entry.to_dict()


def test_entries_go_out_with_exactly_their_to_dict_content() -> None:
    """msgspec encodes the model's structs itself; what it writes must be what to_dict() says."""
    full = ServiceEntry(
        "db",
        "db-1",
        Location.LAN,
        NetworkInfo("10.0.0.5", hostname="db.example.org", network="production"),
        endpoints=(Endpoint("http", 8080), Endpoint("dns", 53, "udp")),
        tags=("db", "primary"),
        metadata={"team": "data", "tier": "1"},
        ttl_seconds=30,
        deregister_after_seconds=600,
        version="1.4.2",
    ).stamped(create_revision=3, mod_revision=9, updated_at=1700000000.25)
    for entry in (make_entry(endpoints=()), full):
        assert json.loads(encode_response("1", entry))["result"] == entry.to_dict()
        assert json.loads(encode_response("1", [entry, entry]))["result"] == [entry.to_dict()] * 2


def test_other_objects_go_out_through_their_to_dict() -> None:
    """A dataclass with to_dict() is never encoded field by field (Event's type is "event" on the wire)."""
    event = Event(EventType.SERVICE_REGISTERED, 4, {"service": {}}, 1.5)
    assert json.loads(encode_response("1", event))["result"] == event.to_dict()
    assert json.loads(encode_response("1", [event]))["result"] == [event.to_dict()]
    assert json.loads(encode_response("1", Page([event], "next")))["result"] == [event.to_dict()]


def test_requests_take_subclasses_of_the_json_types() -> None:
    """Ansible passes tagged str/dict subclasses as module options; they go out as plain JSON."""

    class Tagged(str):
        pass

    class TaggedDict(dict[str, str]):
        pass

    _, text = ClientCodec().encode_request("register_service", {"service": TaggedDict(name=Tagged("web"))})
    assert json.loads(text)["params"] == {"service": {"name": "web"}}


def test_request_ids_are_unique() -> None:
    codec = ClientCodec()
    assert len({codec.encode_request("ping")[0] for _ in range(100)}) == 100


def test_job_frames_and_malformed_ones() -> None:
    text = encode_job("job-1-abc", "progress", {"kind": "ok", "host": "node1"})
    assert json.loads(text) == {
        "type": "job",
        "job": "job-1-abc",
        "event": "progress",
        "data": {"kind": "ok", "host": "node1"},
    }
    message = ClientCodec().decode(text)
    assert message == JobMessage("job-1-abc", "progress", {"kind": "ok", "host": "node1"})
    with pytest.raises(ProtocolError, match="malformed job frame"):
        ClientCodec().decode(json.dumps({"type": "job", "event": "finished"}))
    with pytest.raises(ProtocolError, match="malformed job frame"):
        ClientCodec().decode(json.dumps({"type": "job", "job": "j", "event": "progress", "data": [1]}))


@pytest.mark.parametrize(
    ("text", "request_id", "fragment", "field"),
    [
        ("{not json", None, "not valid JSON", None),
        ("[1, 2]", None, "must be a JSON object", None),
        (json.dumps({"type": "request", "action": "ping"}), None, "id: is required", "id"),
        (json.dumps({"id": 7, "type": "request", "action": "ping"}), None, "must be a string", "id"),
        (json.dumps({"id": "x" * 129, "type": "request", "action": "ping"}), None, "length <= 128", "id"),
        (frame(type="response", action="ping"), "1", "type: must be one of request", "type"),
        (frame(action=5), "1", "action: must be a string", "action"),
        (frame(action="ping", extra=1), "1", "extra: unknown field", "extra"),
        (frame(action="ping", params=[1]), "1", "params: ", "params"),
        (frame(action="get_service", params={}), "1", "params.service_name: is required", "params.service_name"),
        (frame(action="get_service", params={"service_name": 5}), "1", "got 5", "params.service_name"),
        (frame(action="subscribe", params={"since_revision": True}), "1", "got True", "params.since_revision"),
        (frame(action="subscribe", params={"since_revision": "3"}), "1", "got '3'", "params.since_revision"),
        (frame(action="ping", params={"loud": True}), "1", "params.loud: unknown field", "params.loud"),
        (b"\xff\xfe", None, "not valid JSON", None),
    ],
)
def test_bad_frames_get_one_clear_error(
    text: str | bytes, request_id: str | None, fragment: str, field: str | None
) -> None:
    with pytest.raises(RequestError) as caught:
        decode_request(text)
    assert caught.value.request_id == request_id
    assert fragment in caught.value.message
    assert caught.value.field == field
    assert caught.value.code == "bad_request"
    wire = json.loads(encode_error(caught.value.request_id, caught.value))
    assert wire["type"] == "error" and wire["id"] == request_id and wire["error"]["code"] == "bad_request"


@pytest.mark.parametrize(
    ("action", "params", "field", "fragment"),
    [
        ("subscribe", {"since_revision": 10**400}, "params.since_revision", "<= 9223372036854775807"),
        ("subscribe", {"since_revision": -1}, "params.since_revision", ">= 0"),
        ("subscribe", {"filter": {"location": "mars"}}, "params.filter.location", "must be one of local"),
        ("subscribe", {"filter": {"colour": "red"}}, "params.filter.colour", "unknown field"),
        ("subscribe", {"events": ["Nope"]}, "params.events[0]", "must be one of ServiceRegistered"),
        ("list_services", {"location": "mars"}, "params.location", "got 'mars'"),
        ("list_endpoints", {"tag": ""}, "params.tag", "length >= 1"),
        ("set_state", {"service_name": "a", "state": "zzz"}, "params.state", "must be one of starting"),
        ("register_service", {"service": []}, "params.service", "must be an object"),
        ("allocate_ip", {"owner": "a"}, "params.network", "is required"),
        (
            "deploy_package",
            {"package": "p", "targets": [{"host": "h", "ssh_user": 5}]},
            "params.targets[0].ssh_user",
            "got 5",
        ),
        (
            "deploy_package",
            {"package": "p", "targets": ["a", {"host": "h", "ssh_user": ["x"]}]},
            "params.targets[1].ssh_user",
            "got ['x']",
        ),
        (
            "deploy_package",
            {"package": "p", "target": {"host": "h", "install_base": 5}},
            "params.target.install_base",
            "got 5",
        ),
        ("deploy_package", {"package": "p", "target": {"host": "h", "port": 70000}}, "params.target.port", "<= 65535"),
        ("deploy_package", {"package": "p", "targets": [5]}, "params.targets[0]", "got 5"),
        ("deploy_package", {"package": "p", "keep_releases": 10**400}, "params.keep_releases", "<= 1000"),
    ],
)
def test_params_are_checked_by_their_struct(action: str, params: dict[str, object], field: str, fragment: str) -> None:
    with pytest.raises(RequestError) as caught:
        decode_request(frame(action=action, params=params))
    assert (caught.value.request_id, caught.value.field, caught.value.code) == ("1", field, "bad_request")
    assert caught.value.message.startswith(f"{field}: ") and fragment in caught.value.message


def test_secrets_are_never_quoted() -> None:
    for params in ({"token": ["svcreg_hunter2"]}, {"token": "svcreg_hunter2" * 1000}):
        with pytest.raises(RequestError) as caught:
            decode_request(frame(action="authenticate", params=params))
        assert caught.value.field == "params.token" and "hunter2" not in caught.value.message
    with pytest.raises(RequestError) as caught:
        decode_request(frame(action="deploy_package", params={"package": "p", "env": {"DB_PASSWORD": ["hunter2"]}}))
    assert caught.value.field == "params.env.DB_PASSWORD" and "hunter2" not in caught.value.message


def test_null_params_are_absent_ones() -> None:
    request = decode_request(frame(action="get_service", params={"service_name": "db", "host_id": None}))
    assert request.args == InstanceParams("db") and request.args.host_id is None
    assert decode_request(frame(action="ping", params=None)).args == NoParams()
    subscribe = decode_request(frame(action="subscribe", params={"filter": {"location": "lan"}, "since_revision": 3}))
    assert subscribe.args.filter == ServiceQuery(location=Location.LAN) and subscribe.args.since_revision == 3


def test_unknown_action_keeps_the_request_id() -> None:
    with pytest.raises(UnknownAction) as caught:
        decode_request(frame(action="launch_missiles"))
    assert caught.value.details["id"] == "1"
    assert "launch_missiles" in caught.value.message


def test_client_refuses_unknown_actions_before_sending() -> None:
    with pytest.raises(UnknownAction):
        ClientCodec().encode_request("launch_missiles")


def test_every_action_has_a_role_and_typed_params() -> None:
    assert {"ping", "authenticate"} == {name for name, spec in ACTIONS.items() if spec.role is None}
    for spec in ACTIONS.values():
        assert issubclass(spec.params, msgspec.Struct) and spec.params.__struct_config__.forbid_unknown_fields


def test_errors_come_back_as_their_classes() -> None:
    codec = ClientCodec()
    for code, cls in ERROR_CODES.items():
        message = codec.decode(
            encode_error(
                "9", cls("boom") if cls is not Compacted else cls("old", oldest_revision=5, requested_revision=1)
            )
        )
        assert isinstance(message, ErrorMessage)
        assert type(message.error) is cls
        assert message.error.code == code
    compacted = codec.decode(encode_error("1", Compacted("old", oldest_revision=5, requested_revision=1))).error
    assert isinstance(compacted, Compacted) and compacted.oldest_revision == 5
    lagged = error_from_wire("rate_limited", "slow", {"last_revision": 7})
    assert lagged.details["last_revision"] == 7
    missing = codec.decode(encode_error("2", ServiceNotFound("gone"))).error
    assert missing.code == "not_found"
    invalid = codec.decode(encode_error("3", ValidationError("bad", field="params.x"))).error
    assert isinstance(invalid, ValidationError) and invalid.field == "params.x"
    assert error_from_wire("no_such_code", "?").code == "internal"
    assert isinstance(SubscriptionLagged("x", last_revision=1), ERROR_CODES["rate_limited"])


def test_subclasses_that_share_a_code_come_back_as_themselves() -> None:
    codec = ClientCodec()
    missing = codec.decode(encode_error("2", ServiceNotFound("gone", details={"service_name": "x"}))).error
    assert type(missing) is ServiceNotFound and missing.code == "not_found" and missing.message == "gone"
    lagged = codec.decode(encode_error(None, SubscriptionLagged("slow", last_revision=7))).error
    assert type(lagged) is SubscriptionLagged and lagged.last_revision == 7
    bad = codec.decode(encode_error("3", RequestError("bad", request_id="3", field="params.x"))).error
    assert type(bad) is ProtocolError and bad.field == "params.x"  # RequestError is server-side only
    # The code is authoritative: a class that is not a subclass of the code's class is ignored.
    forged = {"id": "4", "type": "error", "error": {"code": "forbidden", "message": "no", "class": "ServiceNotFound"}}
    assert type(codec.decode(json.dumps(forged)).error) is Forbidden
    odd = {"id": "5", "type": "error", "error": {"code": "not_found", "message": "?", "class": ["x"]}}
    assert type(codec.decode(json.dumps(odd)).error) is NotFound


def test_event_frames() -> None:
    event = Event(EventType.SERVICE_REGISTERED, 42, {"service": make_entry().to_dict()}, 1.5)
    text = encode_event("sub-3", event)
    wire = json.loads(text)
    assert wire["type"] == "event" and wire["subscription"] == "sub-3"
    assert wire["event"] == "ServiceRegistered" and wire["revision"] == 42
    message = ClientCodec().decode(text)
    assert isinstance(message, EventMessage)
    assert message.event == event.delivered("sub-3")
    assert message.event.subscription == "sub-3"
    # the event's part is encoded once and shared: another subscription differs in its id only
    assert json.loads(encode_event("sub-10", event)) == dict(wire, subscription="sub-10")
    assert encode_event("sub-3", event) == text
    same_revision = Event(EventType.SERVICE_REGISTERED, 42, {"service": make_entry("other").to_dict()}, 1.5)
    assert json.loads(encode_event("sub-3", same_revision))["data"]["service"]["service_name"] == "other"


@pytest.mark.parametrize(
    "text",
    ["nope", "[]", json.dumps({"type": "gossip"}), json.dumps({"type": "event", "event": "Nope", "revision": 1})],
)
def test_client_rejects_garbage_from_the_server(text: str) -> None:
    from registry import ProtocolError

    with pytest.raises(ProtocolError):
        ClientCodec().decode(text)


def test_the_codec_routes_answers_to_their_requests_and_types_them() -> None:
    codec = ClientCodec()
    get_id, _ = codec.encode_request("get_service", {"service_name": "api-server"})
    ping_id, _ = codec.encode_request("ping")
    entry = make_entry()
    pong = codec.route(encode_response(ping_id, {"pong": True}))
    assert pong == Delivery(Route.REPLY, ping_id, {"pong": True})
    got = codec.route(encode_response(get_id, entry))
    assert got is not None and got.route is Route.REPLY and got.key == get_id
    assert isinstance(got.item, ServiceEntry) and got.item.key == entry.key
    assert codec.route(encode_response(get_id, entry)) is None  # answered already: nobody waits
    lost_id, _ = codec.encode_request("ping")
    codec.forget(lost_id)  # the caller timed out
    assert codec.route(encode_response(lost_id, {"pong": True})) is None
    failed_id, _ = codec.encode_request("get_service", {"service_name": "ghost"})
    failed = codec.route(encode_error(failed_id, ServiceNotFound("gone")))
    assert failed is not None and failed.route is Route.REPLY and isinstance(failed.item, ServiceNotFound)


def test_a_malformed_answer_fails_its_caller_not_the_connection() -> None:
    codec = ClientCodec()
    request_id, _ = codec.encode_request("list_services")
    delivery = codec.route(encode_response(request_id, [{"service_name": 5}]))
    assert delivery is not None and delivery.key == request_id
    assert isinstance(delivery.item, ProtocolError) and "list_services" in delivery.item.message


def test_the_codec_routes_events_jobs_and_stream_errors_and_keeps_revisions() -> None:
    codec = ClientCodec()
    request_id, _ = codec.encode_request("subscribe")
    assert codec.route(encode_response(request_id, {"subscription": "sub-1", "revision": 7})) == Delivery(
        Route.REPLY, request_id, {"subscription": "sub-1", "revision": 7}
    )
    assert codec.last_revision("sub-1") == 7
    event = Event(EventType.SERVICE_REGISTERED, 8, {"service": make_entry().to_dict()}, 1.5)
    assert codec.route(encode_event("sub-1", event)) == Delivery(Route.EVENTS, "sub-1", event.delivered("sub-1"))
    assert codec.last_revision("sub-1") == 8
    lagged = SubscriptionLagged("slow", last_revision=8)
    lagged.details["subscription"] = "sub-1"
    delivery = codec.route(encode_error(None, lagged))
    assert delivery is not None and (delivery.route, delivery.key) == (Route.EVENTS, "sub-1")
    assert isinstance(delivery.item, SubscriptionLagged)
    job = codec.route(encode_job("job-1", "progress", {"kind": "ok"}))
    assert job == Delivery(Route.JOB, "job-1", JobMessage("job-1", "progress", {"kind": "ok"}))
    request_id, _ = codec.encode_request("unsubscribe", {"subscription": "sub-1"})
    codec.route(encode_response(request_id, {"unsubscribed": "sub-1"}))
    assert codec.last_revision("sub-1") is None
    with pytest.raises(ProtocolError):
        codec.route("{")
