"""Tokens: generation, hashing, the token registry, and that no secret leaks into text."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from registry import auth
from registry.auth import Role, TokenEntry, TokenRegistry, generate_token, hash_token
from registry.exceptions import ConfigError, Unauthorized, ValidationError


@pytest.fixture
def tokens() -> tuple[TokenRegistry, dict[str, str]]:
    registry = TokenRegistry()
    plain = {role.label: registry.add(role.label, role)[1] for role in Role}
    return registry, plain


def test_generated_tokens_are_prefixed_random_and_url_safe() -> None:
    made = {generate_token() for _ in range(100)}
    assert len(made) == 100
    for token in made:
        assert re.fullmatch(r"svcreg_[A-Za-z0-9_-]{43}", token)


def test_hash_format_is_sha256_hex() -> None:
    token = generate_token()
    assert hash_token(token) == "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", hash_token(token))
    assert hash_token(token) != hash_token(token + "x")


@pytest.mark.parametrize("empty", ["", None])
def test_hash_refuses_empty_tokens(empty: object) -> None:
    with pytest.raises(ValidationError, match="non-empty") as caught:
        hash_token(empty)  # type: ignore[arg-type]
    assert caught.value.field == "token"


def test_authenticate_finds_the_entry(tokens: tuple[TokenRegistry, dict[str, str]]) -> None:
    registry, plain = tokens
    for role in Role:
        entry = registry.authenticate(plain[role.label])
        assert (entry.name, entry.role) == (role.label, role)


@pytest.mark.parametrize("wrong", ["", "svcreg_wrong", None, "späti", "x" * 10_000])
def test_authenticate_refuses_wrong_and_empty_tokens_without_detail(
    tokens: tuple[TokenRegistry, dict[str, str]], wrong: object
) -> None:
    registry, _ = tokens
    with pytest.raises(Unauthorized) as caught:
        registry.authenticate(wrong)  # type: ignore[arg-type]
    assert caught.value.message == "invalid token"
    assert caught.value.details == {}


def test_a_token_one_character_off_is_refused(tokens: tuple[TokenRegistry, dict[str, str]]) -> None:
    registry, plain = tokens
    token = plain["admin"]
    with pytest.raises(Unauthorized, match=r"^invalid token$"):
        registry.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B"))


def test_authenticate_compares_every_entry_in_constant_time(
    tokens: tuple[TokenRegistry, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spy over the real compare_digest: it runs once per entry whether the first entry matches or none does."""
    registry, plain = tokens
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    registry.authenticate(plain["read"])  # the first entry
    assert len(calls) == len(registry.entries) == 3
    calls.clear()
    with pytest.raises(Unauthorized):
        registry.authenticate("svcreg_nope")
    assert len(calls) == 3
    assert {stored for _, stored in calls} == {entry.hash for entry in registry.entries}


def test_add_refuses_duplicate_names(tokens: tuple[TokenRegistry, dict[str, str]]) -> None:
    registry, _ = tokens
    with pytest.raises(ConfigError, match="'admin' is used twice"):
        registry.add("admin", Role.READ)
    with pytest.raises(ConfigError, match="'x' is used twice"):
        TokenRegistry([TokenEntry("x", Role.READ, hash_token("a")), TokenEntry("x", Role.ADMIN, hash_token("b"))])
    assert [entry.name for entry in registry.entries] == ["read", "write", "admin"]


def test_entries_never_hold_the_plain_token() -> None:
    registry = TokenRegistry()
    entry, token = registry.add("ci", Role.WRITE)
    assert token.startswith("svcreg_")
    assert entry.hash == hash_token(token)
    assert token not in repr(entry.to_dict())
    assert all(token not in str(value) for value in (entry.name, entry.role, entry.hash))


def test_no_secret_in_repr_str_or_errors(tokens: tuple[TokenRegistry, dict[str, str]]) -> None:
    registry, plain = tokens
    entry = registry.authenticate(plain["admin"])
    texts = [repr(entry), str(entry), repr(registry), str(registry)]
    for token in [*plain.values(), "svcreg_attempt"]:
        try:
            registry.authenticate(token + "!")
        except Unauthorized as exc:
            texts += [str(exc), repr(exc), repr(exc.to_dict())]
    for text in texts:
        for token in plain.values():
            assert token not in text
        for stored in registry.entries:
            assert stored.hash not in text
            assert stored.hash.removeprefix("sha256:") not in text
    assert "hash" not in repr(entry)
    assert repr(registry) == "TokenRegistry(3 tokens: read, write, admin)"


def test_entry_round_trip() -> None:
    entry = TokenEntry("deploy@ci.example.com", Role.WRITE, hash_token("t"))
    assert entry.to_dict() == {"name": "deploy@ci.example.com", "role": "write", "hash": hash_token("t")}
    assert TokenEntry.from_dict(entry.to_dict()) == entry


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"name": "a", "role": "root", "hash": hash_token("t")}, "tokens[0].role", "'root' is not one of"),
        ({"name": "a", "role": "read", "hash": "md5:abc"}, "tokens[0].hash", "not 'sha256:' followed by 64"),
        ({"name": "a", "role": "read", "hash": "sha256:" + "A" * 64}, "tokens[0].hash", "lowercase hex"),
        ({"name": "has space", "role": "read", "hash": hash_token("t")}, "tokens[0].name", "'has space'"),
        ({"name": "a", "role": "read"}, "tokens[0].hash", "tokens[0].hash: is required"),
        ({"name": "a", "role": "read", "hash": hash_token("t"), "token": "x"}, "tokens[0].token", "unknown field"),
        ({"name": "a", "role": 3, "hash": hash_token("t")}, "tokens[0].role", "must be a string, got 3"),
        (["a"], "tokens[0]", "tokens[0]: must be an object"),
    ],
)
def test_entry_from_dict_names_the_field(data: object, field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        TokenEntry.from_dict(data, where="tokens[0]")  # type: ignore[arg-type]
    assert caught.value.field == field
    assert "tokens[0]" in caught.value.message


def test_a_plain_token_pasted_as_hash_is_not_echoed() -> None:
    token = generate_token()
    for pasted in (token, [token]):
        with pytest.raises(ConfigError) as caught:
            TokenEntry.from_dict({"name": "oops", "role": "admin", "hash": pasted})
        assert token not in str(caught.value)
        assert token not in repr(caught.value.to_dict())


def test_entry_constructor_validates_too() -> None:
    with pytest.raises(ConfigError, match=r"token\.role"):
        TokenEntry("a", "admin", hash_token("t"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"token\.hash"):
        TokenEntry("a", Role.ADMIN, "plain")
