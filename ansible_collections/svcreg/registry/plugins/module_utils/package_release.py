# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""A service's directory on the target host: ``releases/``, ``shared/``, ``packages/``, ``current``.

Used by the ``package`` module, standard library only: the paths and the small JSON files kept there
(:class:`Layout`), atomic writes, the per-service lock and the ``shared/env`` file.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
from typing import Any

__all__ = [
    "FAILED",
    "GOOD",
    "PENDING",
    "RELEASE_METADATA",
    "DeployError",
    "DirectoryLock",
    "Layout",
    "env_file_text",
    "parse_env_file",
    "write_atomic",
]

RELEASE_METADATA = ".svcreg-release.json"
GOOD = "good"
FAILED = "failed"
PENDING = "pending"


class DeployError(Exception):
    """A failure reported with ``fail_json``: ``msg`` names what was wrong, ``details`` are extra result keys."""

    def __init__(self, msg: str, **details: Any) -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details


class Layout:
    """The paths under ``<install_base>/<name>`` and the small JSON files kept there."""

    def __init__(self, install_base: str, name: str) -> None:
        self.name = name
        self.base = os.path.join(install_base, name)
        self.releases = os.path.join(self.base, "releases")
        self.shared = os.path.join(self.base, "shared")
        self.env_file = os.path.join(self.shared, "env")
        self.packages = os.path.join(self.base, "packages")
        self.current = os.path.join(self.base, "current")
        self.history_file = os.path.join(self.base, ".svcreg-history.json")
        self.lock_file = os.path.join(self.base, ".lock")

    def release_dir(self, version: str) -> str:
        return os.path.join(self.releases, version)

    def package_path(self, version: str) -> str:
        return os.path.join(self.packages, "%s-%s.tar.gz" % (self.name, version))

    def current_version(self) -> str | None:
        try:
            return os.path.basename(os.readlink(self.current).rstrip("/"))
        except OSError:
            return None

    def read_release(self, version: str) -> dict[str, Any] | None:
        """The release's metadata, or None when it is not installed (or its metadata is unreadable)."""
        try:
            with open(os.path.join(self.release_dir(version), RELEASE_METADATA)) as stream:
                metadata = json.load(stream)
        except (OSError, ValueError):
            return None
        return metadata if isinstance(metadata, dict) else None

    def is_good(self, version: str) -> bool:
        metadata = self.read_release(version)
        return metadata is not None and metadata.get("status") == GOOD

    def write_release(self, version: str, metadata: dict[str, Any]) -> None:
        write_atomic(os.path.join(self.release_dir(version), RELEASE_METADATA), json.dumps(metadata, indent=2), 0o644)

    def set_status(self, version: str, status: str) -> None:
        metadata = self.read_release(version)
        if metadata is not None:
            metadata["status"] = status
            self.write_release(version, metadata)

    def read_history(self) -> list[str]:
        try:
            with open(self.history_file) as stream:
                history = json.load(stream)
        except (OSError, ValueError):
            return []
        return [version for version in history if isinstance(version, str)] if isinstance(history, list) else []

    def write_history(self, history: list[str]) -> None:
        write_atomic(self.history_file, json.dumps(history), 0o644)

    def read_env(self) -> str | None:
        try:
            with open(self.env_file) as stream:
                return stream.read()
        except OSError:
            return None

    def installed_versions(self) -> list[str]:
        """The release directories, oldest deployment first."""
        try:
            names = [entry for entry in os.listdir(self.releases) if not entry.startswith(".")]
        except OSError:
            return []
        return sorted(names, key=lambda version: ((self.read_release(version) or {}).get("deployed_at") or "", version))

    def switch_current(self, version: str) -> None:
        """Point ``current`` at the release atomically (a new symlink renamed over the old one)."""
        tmp = os.path.join(self.base, ".current.tmp-%d" % os.getpid())
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join("releases", version), tmp)
        os.replace(tmp, self.current)

    def remove_current(self) -> None:
        if os.path.lexists(self.current):
            os.unlink(self.current)

    def remove_release(self, version: str) -> None:
        shutil.rmtree(self.release_dir(version), ignore_errors=True)
        package = self.package_path(version)
        if os.path.lexists(package):
            os.unlink(package)


def write_atomic(path: str, text: str, mode: int) -> None:
    """Write ``text`` to a temporary file beside ``path`` with ``mode``, then rename it over ``path``."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


class DirectoryLock:
    """An exclusive ``flock`` on ``<base>/.lock`` (shared, and only if it exists, when ``create`` is false).

    The lock file is removed with the service (state=absent), so a run that waited for it checks that the
    file it locked is still the one on disk, and locks the new one otherwise.
    """

    def __init__(self, layout: Layout, create: bool) -> None:
        self.layout = layout
        self.create = create
        self.fd = None

    def __enter__(self) -> DirectoryLock:
        while True:
            if self.create:
                os.makedirs(self.layout.base, mode=0o755, exist_ok=True)
                fd = os.open(self.layout.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
            else:
                try:
                    fd = os.open(self.layout.lock_file, os.O_RDONLY)
                except FileNotFoundError:
                    return self
            fcntl.flock(fd, fcntl.LOCK_EX if self.create else fcntl.LOCK_SH)
            try:
                on_disk = os.stat(self.layout.lock_file)
            except FileNotFoundError:
                on_disk = None
            locked = os.fstat(fd)
            if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == (locked.st_dev, locked.st_ino):
                self.fd = fd
                return self
            os.close(fd)

    def __exit__(self, *exc_info: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def env_file_text(env: dict[str, str]) -> str:
    lines = ["# Written by svcreg.registry.package; changes are overwritten by the next deployment.\n"]
    lines.extend("export %s=%s\n" % (key, shlex.quote(env[key])) for key in sorted(env))
    return "".join(lines)


def parse_env_file(text: str | None) -> dict[str, str]:
    """The variables of an env file as written by :func:`env_file_text` (``{}`` when it cannot be parsed)."""
    try:
        words = shlex.split(text or "", comments=True)
    except ValueError:
        return {}
    return dict(word.split("=", 1) for word in words if "=" in word)
