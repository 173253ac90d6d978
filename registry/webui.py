"""The web UI's HTTP side: static files from ``registry/ui/``, security headers, the Origin check.

Pure functions over a websockets HTTP request; the server calls :func:`process_request`
from its ``process_request`` hook and returns what it returns. The UI itself is plain
JavaScript modules and CSS shipped as package data: no build step, nothing fetched from
elsewhere.

Only files that exist in the package's ``ui`` folder (and its ``views`` folder) when the
server first serves one are reachable, looked up by exact name in a table built from the
folder listing, so no request path can reach anything else (``..``, percent-encodings, ``//``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Final
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .exceptions import ValidationError

__all__ = ["UI_PREFIX", "normalize_origins", "origin_allowed", "process_request", "security_headers"]

UI_PREFIX: Final = "/ui/"

_CONTENT_TYPES: Final[Mapping[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# What a file name inside ui/ may look like; anything else is never served.
_FILE_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]*\.[a-z]+")
# A Host header we are willing to echo into the CSP: a DNS name, IPv4 or [IPv6], optional port.
_HOST: Final = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_ORIGIN: Final = re.compile(r"https?://(?:[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str
    etag: str


@cache
def _files() -> Mapping[str, _File]:
    """Every servable file, by its path under ``/ui/`` (read once: the package does not change)."""
    root = resources.files("registry") / "ui"
    table: dict[str, _File] = {}
    folders = [("", root), ("views/", root / "views")]
    for prefix, folder in folders:
        if not folder.is_dir():
            continue
        for item in folder.iterdir():
            suffix = "." + item.name.rpartition(".")[2]
            if not item.is_file() or not _FILE_NAME.fullmatch(item.name) or suffix not in _CONTENT_TYPES:
                continue
            body = item.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            table[prefix + item.name] = _File(body, _CONTENT_TYPES[suffix], etag)
    return table


def normalize_origins(origins: Iterable[str]) -> frozenset[str]:
    """Check and normalise an allow-list of browser origins (``https://ops.example:8443``).

    Raises:
        ValidationError: an entry is not ``scheme://host[:port]`` (no path, no trailing slash).
    """
    allowed = set()
    for index, origin in enumerate(origins):
        value = origin.strip().lower() if isinstance(origin, str) else origin
        if not isinstance(value, str) or not _ORIGIN.fullmatch(value) or not _valid_port(value):
            raise ValidationError(
                f"allowed origin {origin!r} must look like https://host[:port] (no path)",
                field=f"allowed_origins[{index}]",
            )
        allowed.add(_strip_default_port(value))
    return frozenset(allowed)


def _valid_port(origin: str) -> bool:
    try:
        return urlsplit(origin).port != 0
    except ValueError:
        return False


def _strip_default_port(origin: str) -> str:
    parts = urlsplit(origin)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:  # out of range: no browser sends it, and it equals nothing we allow
        return origin
    if port is not None and port == default:
        return f"{parts.scheme}://{parts.netloc.rpartition(':')[0]}"
    return origin


def origin_allowed(origin: str | None, host: str | None, allowed: frozenset[str]) -> bool:
    """A WebSocket handshake's ``Origin``: none (not a browser), our own, or an allowed one."""
    if origin is None:
        return True
    own = _strip_default_port(f"https://{host.lower()}") if host and _HOST.fullmatch(host) else None
    value = _strip_default_port(origin.strip().lower()) if _ORIGIN.fullmatch(origin.strip().lower()) else None
    return value is not None and (value == own or value in allowed)


def security_headers(host: str | None) -> list[tuple[str, str]]:
    """The headers of every UI response; the CSP lets the page open a WebSocket to its own origin only."""
    # 'self' covers wss: to the same host in current browsers; the explicit origin is for older ones.
    # Trusted Types make the browser itself refuse any string-to-HTML sink (innerHTML...) in our code.
    own_socket = f" wss://{host}" if host and _HOST.fullmatch(host) else ""
    policy = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self'{own_socket}; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'; require-trusted-types-for 'script'"
    )
    return [
        ("Content-Security-Policy", policy),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("X-Frame-Options", "DENY"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
    ]


def _response(status: int, reason: str, headers: list[tuple[str, str]], body: bytes = b"") -> Response:
    all_headers = Headers(headers)
    all_headers["Content-Length"] = str(len(body))
    return Response(status, reason, all_headers, body)


def _text(status: int, reason: str, message: str, host: str | None) -> Response:
    headers = [*security_headers(host), ("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
    return _response(status, reason, headers, message.encode())


def process_request(request: Request, *, allowed_origins: frozenset[str] = frozenset()) -> Response | None:
    """The UI's answer to a request, or None to let the server go on with it.

    - a WebSocket handshake from a browser origin that is neither ours nor allowed: 403;
    - ``GET /`` and ``GET /ui`` without an upgrade: a redirect to ``/ui/``;
    - ``GET /ui/<file>``: the file (``no-cache`` + ETag, 304 on a match), else 404.
    """
    headers = request.headers
    host = headers.get("Host")
    path = request.path.split("?", 1)[0]
    if headers.get("Upgrade", "").lower() == "websocket":
        if origin_allowed(headers.get("Origin"), host, allowed_origins):
            return None
        return _text(403, "Forbidden", "forbidden: this Origin may not open the registry's WebSocket\n", host)
    if path in ("/", "/ui"):
        return _response(
            302, "Found", [*security_headers(host), ("Location", UI_PREFIX), ("Cache-Control", "no-store")]
        )
    if not path.startswith(UI_PREFIX):
        return None
    name = path[len(UI_PREFIX) :] or "index.html"
    found = _files().get(name)
    if found is None:
        return _text(404, "Not Found", "not found\n", host)
    cache_headers = [("Cache-Control", "no-cache"), ("ETag", found.etag)]
    if found.etag in (tag.strip() for tag in headers.get("If-None-Match", "").split(",")):
        return _response(304, "Not Modified", [*security_headers(host), *cache_headers])
    return _response(
        200, "OK", [*security_headers(host), ("Content-Type", found.content_type), *cache_headers], found.body
    )
