"""Packages for tests: a valid sample, and a corpus of malicious or broken ones.

Every corpus entry is written with ``tarfile`` directly (``build_package`` refuses to make
them) and names the substring the refusal must contain.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CORPUS", "BadPackage", "base_members", "manifest_text", "write_package"]

START = b"#!/bin/sh\necho started\n"
STOP = b"#!/bin/sh\necho stopped\n"


def manifest_text(name: str = "demo", version: str = "1.0.0", extra: str = "") -> bytes:
    return (f"name: {name}\nversion: {version}\n" + textwrap.dedent(extra)).encode()


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _special(name: str, kind: bytes, *, linkname: str = "", mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    return info, b""


def base_members(manifest: bytes | None = None) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        _file("manifest.yaml", manifest if manifest is not None else manifest_text()),
        _special("scripts", tarfile.DIRTYPE),
        _file("scripts/start.sh", START, 0o755),
        _file("scripts/stop.sh", STOP, 0o755),
    ]


def write_package(
    directory: Path,
    members: list[tuple[tarfile.TarInfo, bytes]] | None = None,
    *,
    file_name: str = "demo-1.0.0.tar.gz",
) -> Path:
    """Write members (default: a valid minimal package) as a .tar.gz; no checks at all."""
    path = directory / file_name
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members if members is not None else base_members():
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    path.write_bytes(gzip.compress(buffer.getvalue()))
    return path


def _gzip_bomb(directory: Path) -> Path:
    """A package whose one file unpacks to 100 MiB of zeros (~100 KiB compressed); test with a 64 MiB limit."""
    path = directory / "demo-1.0.0.tar.gz"
    size = 100 * 1024 * 1024
    with (
        gzip.open(path, "wb", compresslevel=9) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for info, data in base_members():
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
        info = tarfile.TarInfo("bin/zeros")
        info.size = size
        archive.addfile(info, _Zeros(size))
    return path


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


@dataclass(frozen=True)
class BadPackage:
    id: str
    make: Callable[[Path], Path]
    reason: str  # a substring of the error message

    def __str__(self) -> str:
        return self.id


def _with(*extra: tuple[tarfile.TarInfo, bytes], manifest: bytes | None = None) -> Callable[[Path], Path]:
    return lambda directory: write_package(directory, [*base_members(manifest), *extra])


def _raw(path_name: str, data: bytes) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / path_name
        path.write_bytes(data)
        return path

    return make


CORPUS: list[BadPackage] = [
    BadPackage("absolute-path", _with(_file("/etc/cron.d/evil", b"x")), "'/etc/cron.d/evil': absolute path"),
    BadPackage("dotdot", _with(_file("bin/../../evil", b"x")), "'..' path component"),
    BadPackage("dotdot-leading", _with(_file("../evil", b"x")), "'..' path component"),
    BadPackage(
        "symlink-absolute",
        _with(_special("bin/passwd", tarfile.SYMTYPE, linkname="/etc/passwd")),
        "absolute symlink target",
    ),
    BadPackage(
        "symlink-outside",
        _with(_special("bin/up", tarfile.SYMTYPE, linkname="../../etc")),
        "points outside the package",
    ),
    BadPackage(
        "symlink-through-symlink",
        _with(
            _special("a", tarfile.SYMTYPE, linkname="scripts"),
            _special("b", tarfile.SYMTYPE, linkname="a/../.."),
        ),
        "goes through another symlink",
    ),
    BadPackage(
        "member-through-symlink",
        _with(_special("d", tarfile.SYMTYPE, linkname="scripts"), _file("d/evil", b"x")),
        "its path passes through symlink member 'd'",
    ),
    BadPackage("hardlink-outside", _with(_special("bin/shadow", tarfile.LNKTYPE, linkname="/etc/shadow")), "hard link"),
    BadPackage("hardlink-to-missing", _with(_special("bin/x", tarfile.LNKTYPE, linkname="bin/nothing")), "hard link"),
    BadPackage("char-device", _with(_special("dev/null", tarfile.CHRTYPE)), "character device"),
    BadPackage("block-device", _with(_special("dev/sda", tarfile.BLKTYPE)), "block device"),
    BadPackage("fifo", _with(_special("bin/pipe", tarfile.FIFOTYPE)), "FIFO"),
    BadPackage("setuid", _with(_file("bin/su", b"x", 0o4755)), "setuid or setgid bit"),
    BadPackage("setgid", _with(_file("bin/sg", b"x", 0o2755)), "setuid or setgid bit"),
    BadPackage("duplicate", _with(_file("scripts/start.sh", b"#!/bin/sh\n", 0o755)), "appears twice"),
    BadPackage("no-manifest", lambda d: write_package(d, base_members()[1:]), "no manifest.yaml"),
    BadPackage("manifest-not-yaml", _with(manifest=b"name: [unclosed\n"), "not valid YAML"),
    BadPackage("manifest-not-mapping", _with(manifest=b"- a\n- b\n"), "must be an object"),
    BadPackage("manifest-unknown-key", _with(manifest=manifest_text(extra="colour: red\n")), "colour: unknown field"),
    BadPackage("manifest-bad-name", _with(manifest=manifest_text(name="Bad_Name")), "Bad_Name"),
    BadPackage("manifest-bad-version", _with(manifest=manifest_text(version="1.0/../x")), "version"),
    BadPackage(
        "manifest-bad-port", _with(manifest=manifest_text(extra="endpoints: [{name: http, port: 0}]\n")), "port"
    ),
    BadPackage(
        "manifest-symlink",
        lambda d: write_package(
            d, [_special("manifest.yaml", tarfile.SYMTYPE, linkname="scripts/start.sh"), *base_members()[1:]]
        ),
        "manifest.yaml must be a regular file",
    ),
    BadPackage(
        "missing-start",
        lambda d: write_package(d, [m for m in base_members() if m[0].name != "scripts/start.sh"]),
        "start script scripts/start.sh is missing",
    ),
    BadPackage(
        "start-not-executable",
        lambda d: write_package(d, [*base_members()[:2], _file("scripts/start.sh", START, 0o644), base_members()[3]]),
        "not executable",
    ),
    BadPackage(
        "name-mismatch", lambda d: write_package(d, file_name="other-1.0.0.tar.gz"), "must be named demo-1.0.0.tar.gz"
    ),
    BadPackage(
        "version-mismatch", lambda d: write_package(d, file_name="demo-2.0.0.tar.gz"), "must be named demo-1.0.0.tar.gz"
    ),
    BadPackage("wrong-suffix", lambda d: write_package(d, file_name="demo-1.0.0.zip"), "NAME-VERSION.tar.gz"),
    BadPackage("not-gzip", _raw("demo-1.0.0.tar.gz", b"PK\x03\x04 not a tarball"), "is not a valid .tar.gz"),
    BadPackage("truncated", lambda d: _truncate(write_package(d)), "is not a valid .tar.gz"),
    BadPackage("gzip-bomb", _gzip_bomb, "gzip bomb"),
]


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
