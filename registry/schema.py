"""Declarative input, checked by one library: msgspec.

Every input shape - wire params, ``svcreg.yaml``, ``services.yaml``, ``manifest.yaml``,
deploy targets - is declared once as a :class:`msgspec.Struct` (types, unknown keys, bounds
via ``Meta``). This module turns data into those structs and turns msgspec's errors into
ours: a :class:`~registry.exceptions.ValidationError` (or a subclass) whose ``field`` is the
path to the bad value (``limits.max_connections``, ``service.endpoints[0].port``) and whose
message names the path, what was expected and the value that was given, cut to
:data:`MAX_SHOWN` characters and never shown for secret fields.

Checks no type can express (an address inside its subnet, one field against another) live in
the struct's ``__post_init__`` and raise :class:`FieldError`, which names the field inside the
struct; the path to the struct is added here.
"""

from __future__ import annotations

import enum
import re
import types
import typing
from collections.abc import Collection, Iterable, Mapping
from typing import Annotated, Any, Final, TypeVar, get_args, get_origin

import msgspec

from .exceptions import ValidationError

__all__ = ["MAX_SHOWN", "FieldError", "convert", "decode_json", "shown"]

T = TypeVar("T")

MAX_SHOWN: Final = 64
"""Bad values are quoted in error messages up to this many characters."""

_MESSAGE: Final = re.compile(r"^(?P<detail>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.DOTALL)
_STEP: Final = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_MISSING: Final = object()
_KINDS: Final = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "array": "an array",
    "object": "an object",
}


class FieldError(ValueError):
    """Raised from a struct's ``__post_init__``: ``field`` is relative to that struct."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def shown(value: object, *, limit: int = MAX_SHOWN) -> str:
    """``repr(value)``, cut to ``limit`` characters: bad input is quoted, never pasted whole."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print (sys.get_int_max_str_digits)
        return f"an integer of about {int.bit_length(value) * 3 // 10} digits" if isinstance(value, int) else "?"
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def convert(
    data: object,
    type_: type[T],
    *,
    path: str = "",
    where: str = "",
    error: type[ValidationError] = ValidationError,
    secret: Collection[str] = (),
) -> T:
    """``data`` (plain JSON/YAML values) as ``type_``, or ``error`` naming the bad field.

    Args:
        path: where ``data`` sits in a larger document (``params.service``), prefixed to field paths.
        where: prefix of the message, e.g. the file name (``/etc/svcreg/services.yaml: ``).
        error: the exception class to raise (``ConfigError`` for files).
        secret: field names whose values are never quoted (``token``).
    """
    try:
        return msgspec.convert(data, type_, str_keys=True)
    except msgspec.ValidationError as exc:
        raise _translate(exc, data, type_, path=path, where=where, error=error, secret=secret) from None
    except RecursionError:
        raise error(f"{where}{path or 'input'} is nested too deeply", field=path or None) from None


def decode_json(
    frame: str | bytes,
    type_: type[T],
    *,
    path: str = "",
    error: type[ValidationError] = ValidationError,
    secret: Collection[str] = (),
) -> T:
    """A JSON document straight into ``type_``; on a validation error the document is read
    again untyped, so the message can quote the bad value."""
    try:
        return msgspec.json.decode(frame, type=type_)
    except msgspec.ValidationError as exc:
        try:
            data = msgspec.json.decode(frame)
        except RecursionError:
            data = _MISSING
        raise _translate(exc, data, type_, path=path, where="", error=error, secret=secret) from None
    except RecursionError:
        raise error(f"{path or 'input'} is nested too deeply", field=path or None) from None


def _translate(
    exc: msgspec.ValidationError,
    data: object,
    type_: Any,
    *,
    path: str,
    where: str,
    error: type[ValidationError],
    secret: Collection[str],
) -> ValidationError:
    match = _MESSAGE.match(str(exc))
    assert match is not None  # the pattern matches any string
    detail, location = match.group("detail"), match.group("path") or ""
    steps, value, leaf = _walk(data, type_, location)
    if match.group("key"):
        key = _first_bad_key(value, leaf)
        field = _join(path, [*steps, str(key)] if key is not _MISSING else steps)
        text, _ = _describe(detail, None)
        return error(f"{where}{field or 'input'}: keys {text}, got {shown(key)}", field=field or None)
    cause = exc.__cause__
    if isinstance(cause, FieldError):
        if cause.field:
            steps.append(cause.field)
            value = _MISSING
        field = _join(path, steps)
        return error(f"{where}{field + ': ' if field else ''}{cause.message}", field=field or None)
    if isinstance(cause, ValidationError):  # a validator we call from __post_init__ said it already
        field = _join(path, [*steps, cause.field] if cause.field else steps)
        return error(f"{where}{field + ': ' if field else ''}{cause.message}", field=field or None)
    text, extra = _describe(detail, leaf)
    if extra is not None:
        steps.append(extra)
        value = _MISSING
    field = _join(path, steps)
    name = field.rsplit(".", 1)[-1]
    if value is not _MISSING and name not in secret:
        text = f"{text}, got {shown(value)}"
    return error(f"{where}{field or 'input'}: {text}", field=field or None)


def _describe(detail: str, leaf: Any) -> tuple[str, str | None]:
    """msgspec's wording, made ours: ``(message, extra path step)``."""
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", detail)
    if unknown:
        fields = _field_names(leaf)
        allowed = f" (expected some of: {', '.join(fields)})" if fields else ""
        return f"unknown field{allowed}", unknown.group(1)
    missing = re.fullmatch(r"Object missing required field `(.*)`", detail)
    if missing:
        return "is required", missing.group(1)
    if detail.startswith("Invalid enum value"):
        choices = _enum_choices(leaf)
        return (f"must be one of {', '.join(choices)}" if choices else "is not one of the allowed values"), None
    expected = re.fullmatch(r"Expected `([\w |]+)`(.*?)(?:, got `[\w |]+`)?", detail)
    if expected:
        names = expected.group(1).split(" | ")
        kinds = [_KINDS.get(name, f"a {name}") for name in names if name != "null"]
        kind = " or ".join(kinds + (["null"] if "null" in names else []))
        bound = expected.group(2).strip()
        if bound.startswith("matching regex"):
            bound = _PATTERNS.get(bound.removeprefix("matching regex").strip(), "in the allowed format")
        return f"must be {kind}{' ' + bound if bound else ''}", None
    return detail[:1].lower() + detail[1:], None


# How the patterns of the schemas read in an error message (keys as msgspec quotes them).
_PATTERNS: Final = {"'^[^\\x00]+$'": "without NUL characters"}


def _walk(data: object, type_: Any, location: str) -> tuple[list[str], object, Any]:
    """Follow msgspec's ``location`` (``.a[0][...]``) through the data and the type.

    Returns the steps in our notation (``a[0].key``), the value found there and its type.
    A ``[...]`` (some dict key) is resolved by finding the first entry that does not convert.
    """
    steps: list[str] = []
    value: object = data
    for name, index in _STEP.findall(location):
        type_ = _concrete(type_, value)
        if name:
            steps.append(name)
            type_ = _field_type(type_, name)
            value = value.get(name, _MISSING) if isinstance(value, Mapping) else _MISSING
        elif index == "...":
            key_type, value_type = _mapping_types(type_)
            key, value = _first_bad_item(value, key_type, value_type)
            steps.append(str(key) if key is not _MISSING else "*")
            type_ = value_type
        else:
            steps[-1:] = [f"{steps[-1] if steps else ''}[{index}]"]
            type_ = _item_type(type_)
            value = value[int(index)] if isinstance(value, list) and int(index) < len(value) else _MISSING
    return steps, value, _concrete(type_, value)


def _join(prefix: str, steps: Iterable[str]) -> str:
    text = ""
    for whole in steps:
        step = whole if len(whole) <= MAX_SHOWN else whole[: MAX_SHOWN - 3] + "..."  # a key may be 5,000 chars
        text = f"{text}{step}" if step.startswith("[") or not text else f"{text}.{step}"
    if prefix and text:
        return f"{prefix}{text}" if text.startswith("[") else f"{prefix}.{text}"
    return prefix or text


def _strip(type_: Any) -> Any:
    while get_origin(type_) is Annotated:
        type_ = get_args(type_)[0]
    return type_


def _concrete(type_: Any, value: object) -> Any:
    """The member of a union that the value was meant for (the non-None one, or the struct)."""
    type_ = _strip(type_)
    if get_origin(type_) in (typing.Union, types.UnionType):
        members = [_strip(member) for member in get_args(type_) if member is not type(None)]
        structs = [member for member in members if isinstance(member, type) and issubclass(member, msgspec.Struct)]
        if isinstance(value, Mapping) and structs:
            return structs[0]
        if len(members) == 1:
            return members[0]
    return type_


def _field_type(type_: Any, name: str) -> Any:
    if isinstance(type_, type) and issubclass(type_, msgspec.Struct):
        for info in msgspec.structs.fields(type_):
            if info.encode_name == name:
                return info.type
    return Any


def _item_type(type_: Any) -> Any:
    args = get_args(_strip(type_))
    return args[0] if args else Any


def _mapping_types(type_: Any) -> tuple[Any, Any]:
    args = get_args(_strip(type_))
    return (args[0], args[1]) if len(args) == 2 else (Any, Any)


def _first_bad_item(value: object, key_type: Any, value_type: Any) -> tuple[object, object]:
    if not isinstance(value, Mapping):
        return _MISSING, _MISSING
    for key, item in value.items():
        try:
            msgspec.convert({key: item}, dict[key_type, value_type], str_keys=True)
        except (msgspec.ValidationError, TypeError):
            return key, item
    return _MISSING, _MISSING


def _first_bad_key(value: object, type_: Any) -> object:
    if not isinstance(value, Mapping):
        return _MISSING
    key_type, _ = _mapping_types(type_)
    for key in value:
        try:
            msgspec.convert(key, key_type)
        except (msgspec.ValidationError, TypeError):
            return key
    return _MISSING


def _field_names(type_: Any) -> list[str]:
    if isinstance(type_, type) and issubclass(type_, msgspec.Struct):
        return [info.encode_name for info in msgspec.structs.fields(type_)]
    return []


def _enum_choices(type_: Any) -> list[str]:
    type_ = _strip(type_)
    if isinstance(type_, type) and issubclass(type_, enum.Enum):
        return [str(member.value) for member in type_]
    if get_origin(type_) is typing.Literal:
        return [str(arg) for arg in get_args(type_)]
    return []
