"""Service packages: the manifest, validation of a tarball before anything is sent, and building one.

A package is ``NAME-VERSION.tar.gz`` with ``manifest.yaml``, ``bin/…`` and the start/stop
scripts at the top level (see ``docs/packages.md``). :func:`inspect_package` reads the
archive as a stream and refuses it, naming the member and the reason, when any member
could escape the release directory on the target (absolute paths, ``..``, links
pointing outside or through another link), is not a plain file, directory or link,
carries setuid/setgid bits, or when the sizes exceed :class:`Limits` — the unpacked
size is counted before any data is read and on the decompressed stream, so a gzip bomb
stops at the limit instead of filling the disk.

The archive rules and the name/version/env rules are not here: they live once in the
Ansible collection's ``module_utils`` (``package_archive``, ``package_format``, standard
library only), because the ``package`` module applies them again on the target host,
where svcreg is not installed. The distribution ships the collection, so the import
works from a checkout and from an install alike.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
import yaml

from ansible_collections.svcreg.registry.plugins.module_utils import package_format
from ansible_collections.svcreg.registry.plugins.module_utils.package_archive import (
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_UNPACKED,
    FILE,
    HARDLINK,
    ArchiveContents,
    ArchiveError,
    member_path,
    scan_archive,
)
from ansible_collections.svcreg.registry.plugins.module_utils.package_format import (
    MANIFEST_NAME,
    NAME_PATTERN,
    PACKAGE_SUFFIX,
    VERSION_PATTERN,
    PackageRuleError,
    env_name_problem,
    package_file_name,
)

from .exceptions import PackageError, ValidationError
from .model import Endpoint
from .schema import FieldError, convert

__all__ = [
    "MANIFEST_NAME",
    "EnvVar",
    "HealthCheck",
    "Limits",
    "Manifest",
    "Package",
    "build_package",
    "inspect_package",
    "package_file_name",
    "resolve_env",
]

DEFAULT_START = "scripts/start.sh"
DEFAULT_STOP = "scripts/stop.sh"
MiB = 1024 * 1024

_SKIPPED_WHEN_BUILDING = frozenset({".git", ".hg", ".svn", "__pycache__", ".DS_Store"})


@dataclass(frozen=True, slots=True)
class Limits:
    """What a package may weigh. ``max_unpacked`` bounds the file data (and, with an allowance for
    headers, the decompressed stream); the target host applies the same defaults."""

    max_size: int = 256 * MiB
    max_unpacked: int = DEFAULT_MAX_UNPACKED
    max_members: int = DEFAULT_MAX_MEMBERS
    max_manifest: int = 64 * 1024


class HealthCheck(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Ready when ``host:tcp`` accepts a connection, or when ``command`` exits 0, within ``timeout`` seconds."""

    tcp: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    command: str | None = None
    host: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    interval: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.5

    def __post_init__(self) -> None:
        if (self.tcp is None) == (self.command is None):
            raise FieldError(None, "needs exactly one of tcp: PORT or command: COMMAND")
        if self.command is not None and not self.command.strip():
            raise FieldError("command", "must be a non-empty command line")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"timeout": self.timeout, "interval": self.interval}
        if self.tcp is not None:
            data.update(tcp=self.tcp, host=self.host)
        else:
            data["command"] = self.command
        return data


@dataclass(frozen=True, slots=True)
class EnvVar:
    """A variable the service reads; without a default it must be given at deploy time."""

    name: str
    default: str | None = None

    @property
    def required(self) -> bool:
        return self.default is None


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``manifest.yaml``. Name and version follow the rules the target host applies too
    (``package_format`` in the collection's module_utils)."""

    name: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
    version: Annotated[str, msgspec.Meta(pattern=VERSION_PATTERN)]
    description: Annotated[str, msgspec.Meta(max_length=1024)] | None = ""
    # Checked by the model's own Endpoint.from_dict (unknown keys too), which msgspec's dataclass support is not.
    endpoint_data: tuple[dict[str, Any], ...] = msgspec.field(default=(), name="endpoints")
    health: HealthCheck | None = None
    env_defaults: dict[str, Any] = msgspec.field(default_factory=dict, name="env")
    start: Annotated[str, msgspec.Meta(min_length=1)] = DEFAULT_START
    stop: Annotated[str, msgspec.Meta(min_length=1)] = DEFAULT_STOP

    def __post_init__(self) -> None:
        for index, item in enumerate(self.endpoint_data):
            try:
                Endpoint.from_dict(item)
            except ValidationError as exc:
                raise FieldError(f"endpoints[{index}]", exc.message) from None
        names = [endpoint.name for endpoint in self.endpoints]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise FieldError("endpoints", f"endpoint name(s) {', '.join(duplicates)} appear twice")
        defaults: dict[str, str | None] = {}
        for name, default in self.env_defaults.items():
            problem = env_name_problem(name)
            if problem:
                raise FieldError("env", problem)
            if default is not None and (not isinstance(default, str | int | float) or isinstance(default, bool)):
                raise FieldError(f"env.{name}", "the default must be a string, a number or null")
            defaults[name] = None if default is None else str(default)
        scripts = {}
        for role in ("start", "stop"):
            try:
                scripts[role] = member_path(getattr(self, role), f"the {role} script")
            except ArchiveError as exc:
                raise FieldError(role, exc.message) from None
            if not scripts[role]:
                raise FieldError(role, "must be a path inside the package")
        msgspec.structs.force_setattr(self, "env_defaults", defaults)
        msgspec.structs.force_setattr(self, "description", self.description or "")
        for role, path in scripts.items():
            msgspec.structs.force_setattr(self, role, path)

    @classmethod
    def parse(cls, data: object, *, source: str = MANIFEST_NAME) -> Manifest:
        """Validate a parsed manifest; every error names ``source`` and the field path."""
        try:
            return convert(data, cls)
        except ValidationError as exc:
            raise PackageError(f"{source}: {exc.message}", member=MANIFEST_NAME) from None

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(Endpoint.from_dict(item) for item in self.endpoint_data)

    @property
    def env(self) -> tuple[EnvVar, ...]:
        return tuple(EnvVar(name, default) for name, default in self.env_defaults.items())

    def to_dict(self) -> dict[str, Any]:
        """The JSON form the package module and the wire use."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "endpoints": [endpoint.to_dict() for endpoint in self.endpoints],
            "health": self.health.to_dict() if self.health else None,
            "env": dict(self.env_defaults),
            "start": self.start,
            "stop": self.stop,
        }


@dataclass(frozen=True, slots=True)
class Package:
    """A validated package file."""

    path: Path
    manifest: Manifest
    sha256: str
    size: int
    unpacked_size: int
    members: tuple[str, ...] = field(repr=False)

    @property
    def file_name(self) -> str:
        return self.path.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "file_name": self.file_name,
            "sha256": self.sha256,
            "size": self.size,
            "unpacked_size": self.unpacked_size,
            "members": len(self.members),
            "manifest": self.manifest.to_dict(),
        }


def resolve_env(manifest: Manifest, given: Mapping[str, object]) -> dict[str, str]:
    """The environment a deployment injects: the manifest's defaults, overridden by ``given``.

    Refuses names the manifest does not declare (a typo would otherwise be silently ignored
    by the service), reserved ``SVCREG_*`` names, and missing required variables. Errors name
    variables, never values.
    """
    label = f"{manifest.name} {manifest.version}"
    try:
        return package_format.resolve_env(label, manifest.env_defaults, given)
    except PackageRuleError as exc:
        raise ValidationError(exc.message, field=exc.field) from None


# --- the package file -------------------------------------------------------------------


def _scan(path: Path, limits: Limits, label: str) -> ArchiveContents:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PackageError(f"{path}: cannot read the package ({exc.strerror})", package=label) from None
    if size > limits.max_size:
        raise PackageError(f"{label}: {size:,} bytes is over the {limits.max_size:,}-byte limit", package=label)
    try:
        return scan_archive(
            str(path),
            max_unpacked=limits.max_unpacked,
            max_members=limits.max_members,
            read=(MANIFEST_NAME,),
            max_read=limits.max_manifest,
            label=label,
        )
    except ArchiveError as exc:
        raise PackageError(exc.message, member=exc.member, package=label) from None
    except OSError as exc:
        raise PackageError(f"{label}: cannot read the package ({exc})", package=label) from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_manifest(contents: ArchiveContents, label: str) -> Manifest:
    kind = contents.kinds.get(MANIFEST_NAME)
    if kind is None:
        raise PackageError(f"{label}: no {MANIFEST_NAME} at the top level", member=MANIFEST_NAME, package=label)
    text = contents.data.get(MANIFEST_NAME)
    if kind != FILE or text is None:
        raise PackageError(f"{label}: {MANIFEST_NAME} must be a regular file, not a {kind}", member=MANIFEST_NAME)
    try:
        data = yaml.safe_load(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise PackageError(f"{label}: {MANIFEST_NAME} is not UTF-8 text", member=MANIFEST_NAME) from None
    except yaml.YAMLError as exc:
        raise PackageError(f"{label}: {MANIFEST_NAME} is not valid YAML: {exc}", member=MANIFEST_NAME) from None
    return Manifest.parse(data, source=f"{label}: {MANIFEST_NAME}")


def _check_scripts(manifest: Manifest, contents: ArchiveContents, label: str) -> None:
    for role, script in (("start", manifest.start), ("stop", manifest.stop)):
        kind = contents.kinds.get(script)
        if kind is None:
            raise PackageError(f"{label}: the {role} script {script} is missing", member=script, package=label)
        if kind not in (FILE, HARDLINK):
            raise PackageError(
                f"{label}: the {role} script {script} must be a regular file, not a {kind}", member=script
            )
        mode = contents.modes[script]
        if not mode & 0o100:
            raise PackageError(
                f"{label}: the {role} script {script} is not executable (mode {mode:o}; chmod +x it)", member=script
            )


def inspect_package(path: str | os.PathLike[str], limits: Limits | None = None) -> Package:
    """Validate a package file completely; raise :class:`PackageError` naming the member and the reason."""
    path = Path(path)
    return _inspect(path, limits or Limits(), file_name=path.name)


def _inspect(path: Path, limits: Limits, *, file_name: str) -> Package:
    if not file_name.endswith(PACKAGE_SUFFIX):
        raise PackageError(f"{file_name}: a package file is named NAME-VERSION{PACKAGE_SUFFIX}", package=file_name)
    contents = _scan(path, limits, file_name)
    manifest = _parse_manifest(contents, file_name)
    expected = package_file_name(manifest.name, manifest.version)
    if file_name != expected:
        raise PackageError(
            f"{file_name}: the manifest says {manifest.name} {manifest.version}, so the file must be named {expected}",
            package=file_name,
        )
    _check_scripts(manifest, contents, file_name)
    return Package(
        path=path,
        manifest=manifest,
        sha256=_sha256(path),
        size=path.stat().st_size,
        unpacked_size=contents.unpacked,
        members=tuple(contents.kinds),
    )


# --- building -------------------------------------------------------------------------


def _source_files(directory: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(name for name in dirs if name not in _SKIPPED_WHEN_BUILDING)
        yield Path(root)
        for name in sorted(files):
            if name not in _SKIPPED_WHEN_BUILDING and not name.endswith(".pyc"):
                yield Path(root) / name


def _tar_entry(archive: tarfile.TarFile, path: Path, arcname: str, mtime: int | None) -> None:
    info = archive.gettarinfo(str(path), arcname)
    if not (info.isreg() or info.isdir() or info.issym()):
        raise PackageError(f"{path}: only files, directories and symlinks can go into a package", member=arcname)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if mtime is not None:
        info.mtime = mtime
    if info.isreg():
        with path.open("rb") as handle:
            archive.addfile(info, handle)
    else:
        archive.addfile(info)


def build_package(
    directory: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None, limits: Limits | None = None
) -> Package:
    """Make ``NAME-VERSION.tar.gz`` from ``directory`` (which holds ``manifest.yaml``) and validate it.

    Owners become root, modes are kept, VCS folders and ``__pycache__`` are left out, and
    ``SOURCE_DATE_EPOCH`` (when set) fixes every timestamp, for reproducible packages. The
    file appears only once it is valid.
    """
    directory = Path(directory)
    limits = limits or Limits()
    manifest_path = directory / MANIFEST_NAME
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PackageError(f"{manifest_path}: cannot read the manifest ({exc})", member=MANIFEST_NAME) from None
    try:
        manifest = Manifest.parse(yaml.safe_load(text), source=str(manifest_path))
    except yaml.YAMLError as exc:
        raise PackageError(f"{manifest_path}: not valid YAML: {exc}", member=MANIFEST_NAME) from None
    output = Path(output_dir) if output_dir is not None else directory.parent
    output.mkdir(parents=True, exist_ok=True)
    target = output / package_file_name(manifest.name, manifest.version)
    if target.resolve().is_relative_to(directory.resolve()):
        raise PackageError(f"{target}: the output must be outside the package directory {directory}")
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    mtime = int(epoch) if epoch and epoch.isdigit() else None
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=output)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime or 0) as compressed,
            tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive,
        ):
            for path in _source_files(directory):
                if path == directory:
                    continue
                _tar_entry(archive, path, path.relative_to(directory).as_posix(), mtime)
        os.chmod(temporary, 0o644)
        package = _inspect(Path(temporary), limits, file_name=target.name)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    os.replace(temporary, target)
    return dataclasses.replace(package, path=target)
