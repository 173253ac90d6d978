# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""Checking and unpacking a service package (a ``.tar.gz``) on the target host, standard library only.

The controller validates every package before sending it; this is the second line of defence, for a
tarball that was altered on the way or in the cache. :func:`extract_archive` streams the archive once:
each member is checked when its header arrives, before any of its data is read, and regular files are
written as they come, so a gzip bomb stops at the size limit instead of filling the disk. Symlinks are
created last, once every member is known, so that nothing is ever written through one.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import posixpath
import shutil
import tarfile
import zlib

__all__ = [
    "DEFAULT_MAX_MEMBERS",
    "DEFAULT_MAX_UNPACKED",
    "ArchiveError",
    "copy_verified",
    "extract_archive",
    "sha256_file",
]

# The controller's limits (registry.package.Limits): whatever it accepts unpacks here too.
DEFAULT_MAX_UNPACKED = 1 << 30
DEFAULT_MAX_MEMBERS = 10_000
_CHUNK = 1 << 20
# Per member, headers (512 bytes, more for long names) and padding come on top of the file data.
_HEADER_ALLOWANCE = 2048


class ArchiveError(Exception):
    """The archive is unreadable or has a member that must not be unpacked."""


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
            raise ArchiveError("checksum mismatch for %s: expected sha256 %s, got %s" % (src, checksum, digest.hexdigest()))
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
            raise ArchiveError("%s unpacks to more than the size limit" % self._archive)
        return data


def _member_path(name: str, what: str) -> str:
    """Return the path ``name`` with ``.`` components and slashes normalised; ``""`` is the package root.

    ``what`` starts the error message, e.g. ``member 'a/b'``.
    """
    if not name or "\x00" in name:
        raise ArchiveError("%s: empty name or NUL byte in the name" % what)
    if name.startswith("/"):
        raise ArchiveError("%s: absolute path" % what)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError("%s: '..' path component" % what)
    return "/".join(parts)


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class _Unpacker:
    """The members seen so far and the checks that depend on them."""

    def __init__(self, archive: str, dest: str, max_unpacked: int, max_members: int) -> None:
        self.archive = archive
        self.dest = dest
        self.max_unpacked = max_unpacked
        self.max_members = max_members
        self.unpacked = 0
        self.count = 0
        self.seen: set[str] = set()
        self.files: set[str] = set()
        self.parents: set[str] = set()
        self.symlinks: dict[str, str] = {}
        self.dir_modes: dict[str, int] = {}

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.count += 1
        if self.count > self.max_members:
            raise ArchiveError("%s has more than %d members" % (self.archive, self.max_members))
        path = self.check(member)
        if path == "":
            return
        if hasattr(tarfile, "data_filter"):
            # Python >= 3.11.4 (3.8.17, 3.9.17, 3.10.12) has tarfile's own checks too; run them as well.
            try:
                tarfile.data_filter(member, self.dest)
            except tarfile.FilterError as error:
                raise ArchiveError("member %r refused by tarfile's data filter: %s" % (member.name, error)) from None
        self.seen.add(path)
        self.parents.update(_ancestors(path))
        target = os.path.join(self.dest, path)
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if member.isdir():
            os.makedirs(target, mode=0o700, exist_ok=True)
            self.dir_modes[target] = (member.mode & 0o755) | 0o700
        elif member.issym():
            self.symlinks[path] = member.linkname
        elif member.islnk():
            os.link(os.path.join(self.dest, _member_path(member.linkname, "hard link target")), target)
            self.files.add(path)
        else:
            self.write_file(tar, member, target)
            self.files.add(path)

    def check(self, member: tarfile.TarInfo) -> str:
        """Refuse the member unless it is safe given the members before it; return its normalised path."""
        name = member.name
        path = _member_path(name, "member %r" % name)
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            kind = "device" if member.ischr() or member.isblk() else "FIFO" if member.isfifo() else "special file"
            raise ArchiveError("member %r: %s (only files, directories and links are allowed)" % (name, kind))
        if path == "":
            if not member.isdir():
                raise ArchiveError("member %r: the package root is not a directory" % name)
            return path
        if path in self.seen:
            raise ArchiveError("member %r: duplicate name" % name)
        if not member.issym() and member.mode & 0o6000:
            raise ArchiveError("member %r: setuid or setgid bit (mode %04o)" % (name, member.mode))
        for ancestor in _ancestors(path):
            if ancestor in self.symlinks:
                raise ArchiveError("member %r: its path passes through symlink member %r" % (name, ancestor))
            if ancestor in self.files:
                raise ArchiveError("member %r: its path passes through file member %r" % (name, ancestor))
        if member.issym() and path in self.parents:
            raise ArchiveError("member %r: a symlink where earlier members have a directory" % name)
        if member.issym():
            self.check_symlink_target(path, member.linkname, name)
        if member.islnk():
            target = _member_path(member.linkname, "member %r: hard link target %r" % (name, member.linkname))
            if target not in self.files:
                raise ArchiveError(
                    "member %r: hard link target %r is not an earlier file member" % (name, member.linkname)
                )
        if member.isreg():
            self.unpacked += member.size
            if self.unpacked > self.max_unpacked:
                raise ArchiveError(
                    "member %r: the package unpacks to more than %d bytes" % (name, self.max_unpacked)
                )
        return path

    def check_symlink_target(self, path: str, linkname: str, name: str) -> None:
        """A symlink must point, relatively, inside the package; ``finish`` checks the rest."""
        if not linkname or "\x00" in linkname:
            raise ArchiveError("member %r: empty symlink target or NUL byte in it" % name)
        if linkname.startswith("/"):
            raise ArchiveError("member %r: absolute symlink target %r" % (name, linkname))
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), linkname))
        if resolved == ".." or resolved.startswith("../"):
            raise ArchiveError("member %r: symlink target %r points outside the package" % (name, linkname))

    def write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
        source = tar.extractfile(member)
        if source is None:
            raise ArchiveError("member %r: no data" % member.name)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
            os.fchmod(out.fileno(), (member.mode & 0o755) | 0o600)

    def finish(self) -> None:
        """Create the symlinks, now that every member is known, then give directories their modes."""
        for path, linkname in self.symlinks.items():
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), linkname))
            for step in [*_ancestors(resolved), resolved]:
                if step in self.symlinks:
                    raise ArchiveError(
                        "member %r: symlink target %r goes through symlink member %r" % (path, linkname, step)
                    )
            os.symlink(linkname, os.path.join(self.dest, path))
        # Deepest first: a directory made read-only must not stop the chmod of one inside it.
        for target in sorted(self.dir_modes, key=len, reverse=True):
            os.chmod(target, self.dir_modes[target])


def extract_archive(
    archive: str,
    dest: str,
    *,
    max_unpacked: int = DEFAULT_MAX_UNPACKED,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> int:
    """Check every member of the ``.tar.gz`` at ``archive`` and unpack it into the new directory ``dest``.

    Refused: absolute paths, ``..`` components, empty names or NUL bytes, anything but regular files,
    directories, symlinks and hard links (devices, FIFOs, ...), setuid/setgid bits, duplicate names,
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
    unpacker = _Unpacker(archive, dest, max_unpacked, max_members)
    budget = max_unpacked + _HEADER_ALLOWANCE * (max_members + 1)
    try:
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            with tarfile.open(fileobj=_BoundedReader(unzipped, budget, archive), mode="r|") as tar:
                for member in tar:
                    unpacker.add(tar, member)
        unpacker.finish()
    except ArchiveError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError("%s is not a valid .tar.gz: %s" % (archive, error)) from None
    except OSError as error:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError("cannot unpack %s into %s: %s" % (archive, dest, error)) from None
    return unpacker.count
