"""Roles and tokens: who may do what."""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from .exceptions import ConfigError, Unauthorized, ValidationError
from .schema import convert

__all__ = ["TOKEN_PREFIX", "Role", "TokenEntry", "TokenRegistry", "generate_token", "hash_token"]


class Role(enum.IntEnum):
    """What a caller may do; each role includes the ones below it."""

    READ = 1
    WRITE = 2
    ADMIN = 3

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls[value.upper()]
        except KeyError:
            raise ValidationError(f"role {value!r} is not one of read, write, admin", field="role") from None

    @property
    def label(self) -> str:
        return self.name.lower()


# --- tokens ---------------------------------------------------------------------------------------

TOKEN_PREFIX: Final = "svcreg_"
"""Every generated token starts with this, so a leaked one is easy to grep for (and to scan for)."""

_HASH_PREFIX: Final = "sha256:"
_HASH_PATTERN: Final = re.compile(r"sha256:[0-9a-f]{64}")
# Token names double as client-certificate common names (mTLS principals), hence dots and @.
_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")


def generate_token() -> str:
    """A new random bearer token: ``svcreg_`` followed by 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of ``token``: ``"sha256:<hex>"``.

    A fast, unsalted hash is the right tool here: generated tokens carry 256 random bits,
    so there is nothing to brute-force and no dictionary to precompute (GitHub and etcd
    store their tokens the same way). Slow password hashes (bcrypt, argon2) exist for
    low-entropy human passwords and would only make every request slower.

    Raises:
        ValidationError: the token is empty.
    """
    if not isinstance(token, str) or not token:
        raise ValidationError("a token must be a non-empty string", field="token")
    return _HASH_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_entry(name: object, role: object, token_hash: object, *, where: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"{where}.name {name!r} is not a token name (letters, digits, '.', '_', '@', '-'; at most 128)",
            field=f"{where}.name",
        )
    if not isinstance(role, Role):
        raise ConfigError(f"{where}.role {role!r} is not one of read, write, admin", field=f"{where}.role")
    # The value is not echoed: a plain token pasted here by mistake must not reach a log.
    if not isinstance(token_hash, str) or not _HASH_PATTERN.fullmatch(token_hash):
        raise ConfigError(
            f"{where}.hash of token {name!r} is not 'sha256:' followed by 64 lowercase hex digits",
            field=f"{where}.hash",
        )


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """A named token with its role, as stored: only the hash, never the token itself."""

    name: str
    role: Role
    hash: str = field(repr=False)
    sees_all: bool = False
    """``visibility: all``: sees every instance whatever network it connects from (a read token for
    inventories and dashboards), without the rights of an admin."""

    def __post_init__(self) -> None:
        _check_entry(self.name, self.role, self.hash, where="token")

    def to_dict(self) -> dict[str, str]:
        data = {"name": self.name, "role": self.role.label, "hash": self.hash}
        if self.sees_all:
            data["visibility"] = "all"
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "token") -> TokenEntry:
        """Read ``{"name", "role", "hash"}``; ``where`` prefixes field names in errors (``tokens[2]``).

        Raises:
            ConfigError: not a mapping, unknown or missing keys, a bad name, role or hash.
        """
        # The hash is never quoted: a plain token pasted there by mistake must not reach a log.
        stored = convert(data, _StoredToken, path=where, error=ConfigError, secret={"hash"})
        if stored.role.upper() not in Role.__members__:
            raise ConfigError(f"{where}.role {stored.role!r} is not one of read, write, admin", field=f"{where}.role")
        role = Role[stored.role.upper()]
        _check_entry(stored.name, role, stored.hash, where=where)
        return cls(stored.name, role, stored.hash, sees_all=stored.visibility == "all")


class _StoredToken(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A token entry as written in the configuration."""

    name: str
    role: str
    hash: str
    # network (default): location-aware discovery; all: every instance (docs/security.md#roles)
    visibility: Literal["network", "all"] = "network"


class TokenRegistry:
    """The known tokens, by name. Checks a presented token against every entry in constant time."""

    def __init__(self, entries: Iterable[TokenEntry] = ()) -> None:
        self._entries: dict[str, TokenEntry] = {}
        for entry in entries:
            self._insert(entry)

    def __repr__(self) -> str:
        return f"TokenRegistry({len(self._entries)} tokens: {', '.join(self._entries)})"

    @property
    def entries(self) -> tuple[TokenEntry, ...]:
        return tuple(self._entries.values())

    def _insert(self, entry: TokenEntry) -> None:
        if entry.name in self._entries:
            raise ConfigError(f"token name {entry.name!r} is used twice", field="tokens")
        self._entries[entry.name] = entry

    def add(self, name: str, role: Role, *, sees_all: bool = False) -> tuple[TokenEntry, str]:
        """Create a token for ``name``; returns the stored entry and the plain token (show it once).

        Raises:
            ConfigError: the name is taken or not a valid token name.
        """
        if name in self._entries:
            raise ConfigError(f"token name {name!r} is used twice", field="tokens")
        token = generate_token()
        entry = TokenEntry(name, role, hash_token(token), sees_all=sees_all)
        self._insert(entry)
        return entry, token

    def authenticate(self, token: str) -> TokenEntry:
        """The entry whose token this is.

        Every entry is compared, with :func:`hmac.compare_digest`, whether or not an earlier
        one matched, so the time taken says nothing about which entry (or how much of a
        hash) matched.

        Raises:
            Unauthorized: ``"invalid token"``, whatever was wrong (empty, unknown).
        """
        try:
            presented = hash_token(token)
        except ValidationError:
            raise Unauthorized("invalid token") from None
        found: TokenEntry | None = None
        for entry in self._entries.values():
            if hmac.compare_digest(presented, entry.hash):
                found = entry
        if found is None:
            raise Unauthorized("invalid token")
        return found
