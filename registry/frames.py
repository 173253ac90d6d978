"""Reading a request frame as strict JSON, and saying precisely what is wrong when it is not.

msgspec reads the frame: no NaN or Infinity, no lone surrogates, integers within 64 bits, bounded nesting.
When it refuses, the standard library reads the frame again, leniently (numbers kept as their text), to
name the offending field and to recover the request's id and action, so the answer can go to the caller
and the metrics can count it under its action. Hand-written on purpose: neither parser reports *where*
a value is out of range, and the answer must say it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import msgspec

from .exceptions import ProtocolError
from .schema import MAX_SHOWN, shown

__all__ = ["RequestError", "read_frame", "readable_id"]


class RequestError(ProtocolError):
    """A frame that is not a valid request; ``request_id`` is its id when one could be read,
    ``action`` its action when that is a known one (metrics count the error under it)."""

    def __init__(
        self, message: str, *, request_id: str | None, field: str | None = None, action: str | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.request_id = request_id
        self.action = action


def readable_id(message: Mapping[str, Any], max_length: int = 128) -> str | None:
    """The request id of a parsed frame, if it is a usable one (a non-empty text of at most ``max_length``)."""
    raw_id = message.get("id")
    if isinstance(raw_id, str) and 0 < len(raw_id) <= max_length and _is_text(raw_id):
        return raw_id
    return None


def read_frame(frame: str | bytes, *, actions: Collection[str]) -> Any:
    """The frame's JSON value. msgspec reads it (strict: no NaN, no lone surrogates, integers of
    at most 64 bits); when it refuses, the standard library reads the frame again, leniently, to
    say which field is wrong and to recover the request's id."""
    try:
        return msgspec.json.decode(frame)
    except UnicodeEncodeError:  # a lone surrogate in a str frame: not UTF-8, not JSON
        raise RequestError("the frame is not valid UTF-8 text", request_id=None) from None
    except RecursionError:
        raise RequestError("the frame is nested too deeply to be a request", request_id=None) from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        strict_error = str(exc)
    try:
        lenient = json.loads(frame, parse_int=_Integer, parse_float=_Float, parse_constant=_Constant)
    except (ValueError, RecursionError):
        raise RequestError(f"the frame is not valid JSON: {strict_error}", request_id=None) from None
    request_id = readable_id(lenient) if isinstance(lenient, dict) else None
    action = lenient.get("action") if isinstance(lenient, dict) else None
    action = action if isinstance(action, str) and action in actions else None
    try:
        found = next(((path, problem) for path, value in _leaves(lenient, "") if (problem := _problem(value))), None)
    except RecursionError:
        raise RequestError("the frame is nested too deeply to be a request", request_id=request_id) from None
    if found is not None:
        field = found[0].lstrip(".") or None
        raise RequestError(f"{field or 'the frame'}: {found[1]}", request_id=request_id, field=field, action=action)
    raise RequestError(f"the frame is not valid JSON: {strict_error}", request_id=request_id, action=action)


class _Integer(str):
    """An integer as its digits (the lenient re-read converts none: they may be 5,000 digits long)."""


class _Float(str):
    """A number with a fraction or an exponent, as its text."""


class _Constant(str):
    """NaN, Infinity or -Infinity, which JSON does not have."""


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _problem(value: object) -> str | None:
    if isinstance(value, _Integer):
        digits = value.lstrip("-")
        if len(digits) <= 20 and -(2**63) <= int(value) < 2**64:
            return None
        return f"integer out of range (at most 64 bits), got one of {len(digits)} digits"
    if isinstance(value, _Float):
        return None if math.isfinite(float(value)) else f"number out of range, got {shown(str(value))}"
    if isinstance(value, _Constant):
        return f"{value} is not a JSON number"
    if isinstance(value, str) and not _is_text(value):
        return "not Unicode text: it holds a lone surrogate (\\ud800-\\udfff)"
    return None


def _leaves(value: object, path: str) -> Iterator[tuple[str, object]]:
    """Every key and scalar of a parsed JSON value, with its path (``.params.service.ttl_seconds``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            name = key if len(key) <= MAX_SHOWN else key[: MAX_SHOWN - 3] + "..."  # keys may be 5,000 chars
            step = f"{path}.{name}" if _is_text(key) else f"{path}.?"
            if not _is_text(key):
                yield step, key
            yield from _leaves(item, step)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}[{index}]")
    else:
        yield path, value
