# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""The safety checks of a service package's ``.tar.gz``, once, standard library only.

The controller (``registry.package.inspect_package``, through :func:`scan_archive`) checks every package
before sending it; the ``package`` module on the target host checks it again while unpacking it
(:func:`extract_archive`), for a tarball that was altered on the way or in the cache. Both stream the
archive once: each member is checked when its header arrives, before any of its data is read, and the
decompressed stream itself is capped, so a gzip bomb stops at the size limit instead of filling the
disk. Symlinks are created last, once every member is known, so that nothing is ever written through
one. ``tarfile``'s ``filter="data"`` is not relied on (CVE-2025-4517 and friends): every rule is here.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import zlib
from collections.abc import Callable

__all__ = [
    "DEFAULT_MAX_MEMBERS",
    "DEFAULT_MAX_UNPACKED",
    "DIRECTORY",
    "FILE",
    "HARDLINK",
    "SYMLINK",
    "ArchiveContents",
    "ArchiveError",
    "copy_verified",
    "extract_archive",
    "member_path",
    "scan_archive",
    "sha256_file",
]

DEFAULT_MAX_UNPACKED = 1 << 30
DEFAULT_MAX_MEMBERS = 10_000
FILE, DIRECTORY, SYMLINK, HARDLINK = "file", "dir", "symlink", "hardlink"
_CHUNK = 1 << 20
# Per member, headers (512 bytes, more for long names) and padding come on top of the file data.
_HEADER_ALLOWANCE = 2048
_SPECIAL = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


class ArchiveError(Exception):
    """The archive is unreadable or has a member that must not be unpacked; ``member`` names it."""

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.member = member


class ArchiveContents:
    """What :func:`scan_archive` found: each member's kind and mode, the unpacked size, the files read."""

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}
        self.modes: dict[str, int] = {}
        self.unpacked = 0
        self.data: dict[str, bytes] = {}


def sha256_file(path: str) -> str:
    """Return the sha256 hex digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def copy_verified(src: str, dest: str, checksum: str) -> None:
    """Copy ``src`` to ``dest`` atomically if its sha256 is ``checksum``.

    The digest is computed on the bytes being copied, so the copy is what was verified.

    Raises:
        ArchiveError: the digest differs; ``dest`` is left as it was.
    """
    tmp = "%s.tmp-%d" % (dest, os.getpid())
    digest = hashlib.sha256()
    try:
        with open(src, "rb") as source, open(tmp, "wb") as target:
            for chunk in iter(lambda: source.read(_CHUNK), b""):
                digest.update(chunk)
                target.write(chunk)
            target.flush()
            os.fsync(target.fileno())
        if digest.hexdigest() != checksum:
            raise ArchiveError(
                "checksum mismatch for %s: expected sha256 %s, got %s" % (src, checksum, digest.hexdigest())
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


class _BoundedReader:
    """A read-only stream over the decompressed archive that refuses to yield more than ``budget`` bytes."""

    def __init__(self, stream: gzip.GzipFile, budget: int, archive: str) -> None:
        self._stream = stream
        self._left = budget
        self._archive = archive

    def read(self, size: int = -1) -> bytes:
        # tarfile's stream mode reads in record-sized chunks, so one read never allocates much.
        wanted = self._left + 1 if size < 0 else min(size, self._left + 1)
        data = self._stream.read(wanted)
        self._left -= len(data)
        if self._left < 0:
            raise ArchiveError("%s unpacks to more than the size limit (a gzip bomb?)" % self._archive)
        return data


def member_path(name: str, what: str, member: str | None = None) -> str:
    """``name`` with ``.`` components and slashes normalised; ``""`` is the package root.

    ``what`` starts the error message, e.g. ``member 'a/b'``; ``member`` is the member it is about.

    Raises:
        ArchiveError: an empty or absolute name, control characters, a ``..`` component.
    """
    if not name:
        raise ArchiveError("%s: empty name" % what, member)
    if any(ord(char) < 32 or char == "\x7f" for char in name):
        raise ArchiveError("%s: a NUL byte or another control character in the name" % what, member)
    if name.startswith("/"):
        raise ArchiveError("%s: absolute path" % what, member)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError("%s: '..' path component" % what, member)
    return "/".join(parts)


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class _Checker:
    """The members seen so far and the rules that depend on them."""

    def __init__(self, archive: str, max_unpacked: int, max_members: int) -> None:
        self.archive = archive
        self.max_unpacked = max_unpacked
        self.max_members = max_members
        self.count = 0
        self.contents = ArchiveContents()
        self.parents: set[str] = set()
        self.symlinks: dict[str, str] = {}

    def check(self, member: tarfile.TarInfo) -> str:
        """Refuse the member unless it is safe given the members before it; return its normalised path."""
        self.count += 1
        if self.count > self.max_members:
            raise ArchiveError("%s has more than %d members" % (self.archive, self.max_members))
        name = member.name
        what = "member %r" % name
        path = member_path(name, what, name)
        kinds = self.contents.kinds
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            kind = _SPECIAL.get(member.type, "a special file (type %r)" % member.type)
            raise ArchiveError("%s: %s (only files, directories and links are allowed)" % (what, kind), path)
        if path == "":
            if not member.isdir():
                raise ArchiveError("%s: the package root is not a directory" % what, name)
            return path
        if path in kinds:
            raise ArchiveError("%s: appears twice in the archive (duplicate name)" % what, path)
        if not member.issym() and member.mode & 0o6000:
            raise ArchiveError("%s: setuid or setgid bit (mode %04o)" % (what, member.mode), path)
        for ancestor in _ancestors(path):
            if ancestor in self.symlinks:
                raise ArchiveError("%s: its path passes through symlink member %r" % (what, ancestor), path)
            if kinds.get(ancestor) in (FILE, HARDLINK):
                raise ArchiveError("%s: its path passes through file member %r" % (what, ancestor), path)
        if member.isreg():
            kind = FILE
            self.contents.unpacked += member.size
            if self.contents.unpacked > self.max_unpacked:
                raise ArchiveError(
                    "%s: the package unpacks to more than %d bytes (a gzip bomb?)" % (what, self.max_unpacked), path
                )
        elif member.isdir():
            kind = DIRECTORY
        elif member.issym():
            kind = SYMLINK
            if path in self.parents:
                raise ArchiveError("%s: a symlink where earlier members have a directory" % what, path)
            self._check_symlink(path, member.linkname)
            self.symlinks[path] = member.linkname
        else:
            kind = HARDLINK
            target = member_path(member.linkname, "%s: hard link target %r" % (what, member.linkname), path)
            if kinds.get(target) not in (FILE, HARDLINK):
                raise ArchiveError(
                    "%s: hard link target %r is not an earlier file member" % (what, member.linkname), path
                )
        kinds[path] = kind
        self.contents.modes[path] = member.mode
        self.parents.update(_ancestors(path))
        return path

    def _check_symlink(self, path: str, linkname: str) -> None:
        """A symlink must point, relatively, inside the package, and not through another symlink member."""
        what = "member %r" % path
        if not linkname or "\x00" in linkname:
            raise ArchiveError("%s: empty symlink target or NUL byte in it" % what, path)
        if linkname.startswith("/"):
            raise ArchiveError("%s: absolute symlink target %r" % (what, linkname), path)
        resolved = path.split("/")[:-1]
        for part in linkname.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    raise ArchiveError("%s: symlink target %r points outside the package" % (what, linkname), path)
                resolved.pop()
                continue
            resolved.append(part)
            step = "/".join(resolved)
            if step in self.symlinks:
                raise ArchiveError(
                    "%s: symlink target %r goes through another symlink (member %r)" % (what, linkname, step), path
                )

    def finish(self) -> None:
        """The rules that need every member: a symlink may point through a symlink that came after it."""
        for path, linkname in self.symlinks.items():
            self._check_symlink(path, linkname)


def _walk(
    archive: str,
    max_unpacked: int,
    max_members: int,
    handle: Callable[[tarfile.TarFile, tarfile.TarInfo, str], None],
    label: str | None = None,
) -> _Checker:
    """Stream the archive once, checking every member and passing the good ones to ``handle``."""
    checker = _Checker(label or archive, max_unpacked, max_members)
    budget = max_unpacked + _HEADER_ALLOWANCE * (max_members + 1)
    try:
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            stream = _BoundedReader(unzipped, budget, checker.archive)
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    path = checker.check(member)
                    if path:
                        handle(tar, member, path)
        checker.finish()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ArchiveError(
            "%s is not a valid .tar.gz: not a readable gzip-compressed tar archive (%s)" % (checker.archive, error)
        ) from None
    return checker


def scan_archive(
    archive: str,
    *,
    max_unpacked: int = DEFAULT_MAX_UNPACKED,
    max_members: int = DEFAULT_MAX_MEMBERS,
    read: tuple[str, ...] = (),
    max_read: int = 64 * 1024,
    label: str | None = None,
) -> ArchiveContents:
    """Check every member of the ``.tar.gz`` at ``archive`` (as :func:`extract_archive`) without unpacking it.

    The regular files named in ``read`` (normalised paths) are read, up to ``max_read`` bytes each.
    ``label`` names the archive in messages (default: its path).

    Raises:
        ArchiveError: as :func:`extract_archive`, or a file to read is over ``max_read`` bytes.
        OSError: the archive cannot be opened.
    """
    data: dict[str, bytes] = {}

    def keep(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        if path in read and member.isreg():
            if member.size > max_read:
                raise ArchiveError("%s: %d bytes, over the %d-byte limit" % (path, member.size, max_read), path)
            source = tar.extractfile(member)
            data[path] = source.read() if source else b""

    contents = _walk(archive, max_unpacked, max_members, keep, label).contents
    contents.data = data
    return contents


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise ArchiveError("member %r: no data" % member.name, member.name)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(source, out, _CHUNK)
        os.fchmod(out.fileno(), (member.mode & 0o755) | 0o600)


def extract_archive(
    archive: str,
    dest: str,
    *,
    max_unpacked: int = DEFAULT_MAX_UNPACKED,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> int:
    """Check every member of the ``.tar.gz`` at ``archive`` and unpack it into the new directory ``dest``.

    Refused: absolute paths, ``..`` components, empty names or control characters, anything but regular
    files, directories, symlinks and hard links (devices, FIFOs, ...), setuid/setgid bits, duplicate names,
    members whose path goes through a symlink or file member, symlinks with an absolute target, one
    leading outside the package or through another symlink member, hard links to anything but an earlier
    file member, more than ``max_members`` members and more than ``max_unpacked`` bytes of file data
    (counted before the data is read, and on the decompressed stream itself). Owners in the archive are
    ignored; files keep their permission bits without write access for group and others.

    Returns:
        The number of members.

    Raises:
        ArchiveError: naming the member and what is wrong with it; ``dest`` has been removed again.
    """
    os.mkdir(dest, 0o755)
    dir_modes: dict[str, int] = {}

    def unpack(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        if hasattr(tarfile, "data_filter"):
            # Python >= 3.11.4 (3.8.17, 3.9.17, 3.10.12) has tarfile's own checks too; run them as well.
            try:
                tarfile.data_filter(member, dest)
            except tarfile.FilterError as error:
                raise ArchiveError("member %r refused by tarfile's data filter: %s" % (member.name, error)) from None
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if member.isdir():
            os.makedirs(target, mode=0o700, exist_ok=True)
            dir_modes[target] = (member.mode & 0o755) | 0o700
        elif member.islnk():
            os.link(os.path.join(dest, member_path(member.linkname, "hard link target", path)), target)
        elif member.isreg():
            _write_file(tar, member, target)

    try:
        checker = _walk(archive, max_unpacked, max_members, unpack)
        for path, linkname in checker.symlinks.items():
            os.symlink(linkname, os.path.join(dest, path))
        # Deepest first: a directory made read-only must not stop the chmod of one inside it.
        for target in sorted(dir_modes, key=len, reverse=True):
            os.chmod(target, dir_modes[target])
    except ArchiveError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except OSError as error:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError("cannot unpack %s into %s: %s" % (archive, dest, error)) from None
    return checker.count
