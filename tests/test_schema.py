"""The msgspec glue: errors name the path, quote the value (cut), never a secret."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec
import pytest

from registry.exceptions import ConfigError, ValidationError
from registry.schema import MAX_SHOWN, FieldError, convert, decode_json, shown


class Colour(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


class Port(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern="^[a-z]+$")]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    protocol: Literal["tcp", "udp"] = "tcp"

    def __post_init__(self) -> None:
        if self.name == "reserved":
            raise FieldError("name", "name 'reserved' is taken")


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 10


class Doc(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ports: tuple[Port, ...] = ()
    colour: Colour = Colour.RED
    labels: dict[str, str] = {}
    limits: Limits | None = None
    token: str = ""


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"ports": [{"name": "db", "port": 0}]}, "params.ports[0].port", ">= 1, got 0"),
        ({"ports": [{"name": "DB", "port": 1}]}, "params.ports[0].name", "'DB'"),
        ({"ports": [{"name": "reserved", "port": 1}]}, "params.ports[0].name", "'reserved' is taken"),
        ({"ports": [{"port": 1}]}, "params.ports[0].name", "required"),
        ({"ports": [{"name": "db", "port": True}]}, "params.ports[0].port", "integer, got True"),
        ({"ports": [{"name": "db", "port": 1, "protocol": []}]}, "params.ports[0].protocol", "[]"),
        ({"colour": "green"}, "params.colour", "one of red, blue"),
        ({"labels": {"a": "b", "k": 1}}, "params.labels.k", "got 1"),
        ({"limits": {"max_conn": 1}}, "params.limits.max_conn", "expected some of: max_connections"),
        ({"surprise": 1}, "params.surprise", "unknown field"),
        (["not", "a", "mapping"], "params", "must be an object"),
        ({"limits": [1]}, "params.limits", "must be an object or null, got [1]"),
        ({"labels": {"a": "b", 7: "c"}}, "params.labels.7", "keys must be a string, got 7"),
    ],
)
def test_errors_name_the_path_and_the_value(data: object, field: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        convert(data, Doc, path="params")
    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field}: ")
    assert fragment in caught.value.message


def test_values_are_cut_and_secrets_never_shown() -> None:
    with pytest.raises(ValidationError) as caught:
        convert({"limits": {"max_connections": "x" * 5000}}, Doc)
    assert len(caught.value.message) < 200
    assert "x" * MAX_SHOWN not in caught.value.message
    with pytest.raises(ValidationError) as caught:
        convert({"token": ["svcreg_secret"]}, Doc, secret={"token"})
    assert "svcreg_secret" not in caught.value.message
    assert caught.value.field == "token"
    assert "an integer of about" in shown(10**5000)


def test_files_get_their_own_error_class_and_prefix() -> None:
    with pytest.raises(ConfigError) as caught:
        convert({"limits": {"max_connections": 0}}, Doc, where="svcreg.yaml: ", error=ConfigError)
    assert caught.value.message.startswith("svcreg.yaml: limits.max_connections: ")


def test_json_straight_into_the_struct_and_its_errors() -> None:
    assert decode_json(b'{"ports": [{"name": "db", "port": 80}]}', Doc).ports[0].port == 80
    with pytest.raises(ValidationError) as caught:
        decode_json(b'{"ports": [{"name": "db", "port": "80"}]}', Doc)
    assert caught.value.field == "ports[0].port"
    assert "'80'" in caught.value.message


def test_deep_nesting_is_a_validation_error() -> None:
    deep: object = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValidationError, match="labels: must be an object, got a deeply nested list"):
        convert({"labels": deep}, Doc)
    with pytest.raises(ValidationError, match="nested too deeply"):
        decode_json(b'{"labels": ' + b"[" * 5000 + b"]" * 5000 + b"}", dict[str, Any])
