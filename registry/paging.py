"""Optional paging of the list actions (docs/protocol.md#paging): keyset pages with an opaque cursor.

A request with ``limit`` gets at most that many items, in key order, and a ``next_cursor`` beside the
result when more remain; the next request passes it back as ``cursor``. The cursor holds the key of the
last item returned (base64url of JSON, tagged with its action), so a walk through the pages while
writes happen returns every item that existed throughout exactly once, and items added or removed
meanwhile at most once. Without ``limit`` (and without ``cursor``) the answer is the whole list.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from .exceptions import ValidationError

__all__ = ["MAX_PAGE", "Page", "decode_cursor", "encode_cursor", "page"]

MAX_PAGE: Final = 10_000
"""The largest ``limit`` a request may ask for."""

T = TypeVar("T")
Key = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list answer; ``next_cursor`` is None on the last page."""

    items: list[T]
    next_cursor: str | None = None


def encode_cursor(action: str, key: Key) -> str:
    text = json.dumps([action, *key], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(action: str, cursor: str, kinds: Sequence[type]) -> Key:
    """The key in ``cursor``; a cursor that is not one of this action's is a ``bad_request``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        value = None
    if (
        isinstance(value, list)
        and len(value) == len(kinds) + 1
        and value[0] == action
        and all(type(part) is kind for part, kind in zip(value[1:], kinds, strict=True))
    ):
        return tuple(value[1:])
    raise ValidationError(
        f"params.cursor: not a cursor of {action}; pass the next_cursor of the previous page", field="params.cursor"
    )


def page(
    action: str,
    items: Iterable[T],
    *,
    limit: int | None,
    cursor: str | None,
    key: Callable[[T], Key],
    kinds: Sequence[type],
) -> list[T] | Page[T]:
    """The items a request asked for: all of them (a list) without ``limit`` and ``cursor``, else a page."""
    if limit is None and cursor is None:
        return list(items)
    keyed = sorted(((key(item), item) for item in items), key=lambda pair: pair[0])
    if cursor is not None:
        after: Any = decode_cursor(action, cursor, kinds)
        keyed = [pair for pair in keyed if pair[0] > after]
    if limit is None or len(keyed) <= limit:
        return Page([item for _, item in keyed])
    chosen = keyed[:limit]
    return Page([item for _, item in chosen], encode_cursor(action, chosen[-1][0]))
