"""Service packages: the manifest, validation of a tarball before anything is sent, and building one.

A package is ``NAME-VERSION.tar.gz`` with ``manifest.yaml``, ``bin/…`` and the start/stop
scripts at the top level (see ``docs/packages.md``). :func:`inspect_package` reads the
archive as a stream and refuses it, naming the member and the reason, when any member
could escape the release directory on the target (absolute paths, ``..``, links
pointing outside or through another link), is not a plain file, directory or link,
carries setuid/setgid bits, or when the sizes exceed :class:`Limits` — the unpacked
size is counted while decompressing, so a gzip bomb stops at the limit instead of
filling the disk. ``tarfile``'s ``filter="data"`` is not relied on: its bypasses
(CVE-2025-4517 and friends) are why every member is checked here, by rule.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import re
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import yaml

from .exceptions import PackageError, ValidationError
from .model import Endpoint, validate_service_name

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

MANIFEST_NAME = "manifest.yaml"
PACKAGE_SUFFIX = ".tar.gz"
DEFAULT_START = "scripts/start.sh"
DEFAULT_STOP = "scripts/stop.sh"
MiB = 1024 * 1024

_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+~-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_RESERVED_ENV_PREFIX = "SVCREG_"
_MANIFEST_KEYS = frozenset({"name", "version", "description", "endpoints", "health", "env", "start", "stop"})
_HEALTH_KEYS = frozenset({"tcp", "host", "command", "timeout", "interval"})
_SKIPPED_WHEN_BUILDING = frozenset({".git", ".hg", ".svn", "__pycache__", ".DS_Store"})


@dataclass(frozen=True, slots=True)
class Limits:
    """What a package may weigh. ``max_unpacked`` bounds the decompressed stream (tar headers included)."""

    max_size: int = 256 * MiB
    max_unpacked: int = 1024 * MiB
    max_members: int = 10_000
    max_manifest: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Ready when ``host:tcp`` accepts a connection, or when ``command`` exits 0, within ``timeout`` seconds."""

    tcp: int | None = None
    command: str | None = None
    host: str = "127.0.0.1"
    timeout: float = 30.0
    interval: float = 0.5

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


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    version: str
    description: str = ""
    endpoints: tuple[Endpoint, ...] = ()
    health: HealthCheck | None = None
    env: tuple[EnvVar, ...] = ()
    start: str = DEFAULT_START
    stop: str = DEFAULT_STOP

    @classmethod
    def from_dict(cls, data: object, *, source: str = MANIFEST_NAME) -> Manifest:
        """Validate a parsed manifest; every error names ``source`` and the field."""
        if not isinstance(data, Mapping):
            raise PackageError(f"{source}: must be a mapping, not {type(data).__name__}", member=MANIFEST_NAME)
        unknown = sorted(str(key) for key in data if key not in _MANIFEST_KEYS)
        if unknown:
            raise PackageError(
                f"{source}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_MANIFEST_KEYS))})",
                member=MANIFEST_NAME,
            )
        try:
            return cls(
                name=validate_service_name(data.get("name"), "name"),
                version=_version(data.get("version")),
                description=_description(data.get("description")),
                endpoints=_endpoints(data.get("endpoints")),
                health=_health(data.get("health")),
                env=_env_vars(data.get("env")),
                start=_script_path(data.get("start", DEFAULT_START), "start"),
                stop=_script_path(data.get("stop", DEFAULT_STOP), "stop"),
            )
        except PackageError:
            raise
        except ValidationError as exc:
            raise PackageError(f"{source}: {exc.message}", member=MANIFEST_NAME) from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form the package module and the wire use."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "endpoints": [endpoint.to_dict() for endpoint in self.endpoints],
            "health": self.health.to_dict() if self.health else None,
            "env": {var.name: var.default for var in self.env},
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


def package_file_name(name: str, version: str) -> str:
    return f"{name}-{version}{PACKAGE_SUFFIX}"


def resolve_env(manifest: Manifest, given: Mapping[str, object]) -> dict[str, str]:
    """The environment a deployment injects: the manifest's defaults, overridden by ``given``.

    Refuses names the manifest does not declare (a typo would otherwise be silently ignored
    by the service), reserved ``SVCREG_*`` names, and missing required variables. Errors name
    variables, never values.
    """
    declared = {var.name: var for var in manifest.env}
    unknown = sorted(name for name in given if name not in declared)
    if unknown:
        raise ValidationError(
            f"package {manifest.name} does not declare env variable(s) {', '.join(unknown)}"
            f" (declared: {', '.join(sorted(declared)) or 'none'})",
            field="env",
        )
    values: dict[str, str] = {}
    for name, var in declared.items():
        if name in given:
            value = given[name]
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValidationError(f"env variable {name} must be a string or a number", field=f"env.{name}")
            values[name] = str(value)
        elif var.default is not None:
            values[name] = var.default
    missing = sorted(var.name for var in manifest.env if var.required and var.name not in values)
    if missing:
        raise ValidationError(
            f"package {manifest.name} needs env variable(s) {', '.join(missing)}, which have no default", field="env"
        )
    return values


# --- manifest fields ------------------------------------------------------------------


def _version(value: object) -> str:
    if not isinstance(value, str) or not _VERSION.fullmatch(value):
        raise ValidationError(
            f"version {value!r} is invalid: use 1-64 letters, digits and . _ + ~ -, starting with a letter or digit",
            field="version",
        )
    return value


def _description(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 1024:
        raise ValidationError("description must be a string of at most 1024 characters", field="description")
    return value


def _endpoints(value: object) -> tuple[Endpoint, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValidationError("endpoints must be a list of {name, port[, protocol]}", field="endpoints")
    endpoints = tuple(Endpoint.from_dict(item) for item in value)
    names = [endpoint.name for endpoint in endpoints]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValidationError(f"endpoint name(s) {', '.join(duplicates)} appear twice", field="endpoints")
    return endpoints


def _seconds(value: object, field_name: str, default: float, *, most: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= most:
        raise ValidationError(f"{field_name} must be a number of seconds in (0, {most:g}]", field=field_name)
    return float(value)


def _health(value: object) -> HealthCheck | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValidationError("health must be a mapping with tcp: PORT or command: COMMAND", field="health")
    unknown = sorted(str(key) for key in value if key not in _HEALTH_KEYS)
    if unknown:
        raise ValidationError(f"health: unknown key(s) {', '.join(unknown)}", field="health")
    tcp, command = value.get("tcp"), value.get("command")
    if (tcp is None) == (command is None):
        raise ValidationError("health needs exactly one of tcp: PORT or command: COMMAND", field="health")
    if tcp is not None and (isinstance(tcp, bool) or not isinstance(tcp, int) or not 1 <= tcp <= 65535):
        raise ValidationError(f"health.tcp {tcp!r} is not a port (1-65535)", field="health.tcp")
    if command is not None and (not isinstance(command, str) or not command.strip()):
        raise ValidationError("health.command must be a non-empty string", field="health.command")
    host = value.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise ValidationError("health.host must be a host name or address", field="health.host")
    return HealthCheck(
        tcp=tcp,
        command=command,
        host=host,
        timeout=_seconds(value.get("timeout"), "health.timeout", 30.0, most=3600),
        interval=_seconds(value.get("interval"), "health.interval", 0.5, most=60),
    )


def _env_vars(value: object) -> tuple[EnvVar, ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ValidationError("env must be a mapping of NAME: default (null: no default, required)", field="env")
    variables = []
    for name, default in value.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValidationError(f"env name {name!r} is not a valid variable name", field="env")
        if name.startswith(_RESERVED_ENV_PREFIX):
            raise ValidationError(f"env name {name} is reserved (SVCREG_* is set by the deployer)", field="env")
        if default is not None and (not isinstance(default, str | int | float) or isinstance(default, bool)):
            raise ValidationError(f"env {name}: the default must be a string, a number or null", field=f"env.{name}")
        variables.append(EnvVar(name, None if default is None else str(default)))
    return tuple(variables)


def _script_path(value: object, field_name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{field_name} must be a path inside the package", field=field_name)
    try:
        return _normalise(value)
    except PackageError as exc:
        raise ValidationError(f"{field_name}: {exc.message}", field=field_name) from None


# --- archive checks -------------------------------------------------------------------


def _normalise(name: str) -> str:
    """A member name as a clean relative path, or PackageError saying why it cannot be one."""
    if not name:
        raise PackageError("empty member name", member=name)
    if any(ord(char) < 32 or char == "\x7f" for char in name):
        raise PackageError(f"member {name!r}: control characters in the name", member=name)
    if name.startswith("/"):
        raise PackageError(f"member {name}: absolute path", member=name)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise PackageError(f"member {name}: '..' path component", member=name)
    if not parts:
        raise PackageError(f"member {name!r}: names the package root", member=name)
    return "/".join(parts)


class _CountingReader(io.RawIOBase):
    """Reads a decompressed stream, refusing to go past ``limit`` bytes."""

    def __init__(self, source: IO[bytes], limit: int, package: str) -> None:
        self._source = source
        self._limit = limit
        self._package = package
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        self.count += len(data)
        if self.count > self._limit:
            raise PackageError(
                f"{self._package}: unpacks to more than the {self._limit:,}-byte limit (a gzip bomb?)",
                package=self._package,
            )
        buffer[: len(data)] = data
        return len(data)


@dataclass(slots=True)
class _Scan:
    kinds: dict[str, str] = field(default_factory=dict)  # name -> "file" | "dir" | "symlink" | "hardlink"
    modes: dict[str, int] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)  # name -> raw target
    manifest: bytes | None = None
    unpacked: int = 0


def _check_member(member: tarfile.TarInfo, scan: _Scan, limits: Limits) -> str:
    name = _normalise(member.name)
    if name in scan.kinds:
        raise PackageError(f"member {name}: appears twice in the archive", member=name)
    if member.mode & (stat.S_ISUID | stat.S_ISGID):
        raise PackageError(f"member {name}: setuid/setgid bits (mode {member.mode:o})", member=name)
    if member.isreg():
        kind = "file"
    elif member.isdir():
        kind = "dir"
    elif member.issym():
        kind = "symlink"
        scan.symlinks[name] = member.linkname
    elif member.islnk():
        kind = "hardlink"
        try:
            target = _normalise(member.linkname)
        except PackageError:
            raise PackageError(
                f"member {name}: hard link to {member.linkname!r} points outside the package", member=name
            ) from None
        if scan.kinds.get(target) != "file":
            raise PackageError(
                f"member {name}: hard link to {member.linkname!r}, which is not an earlier regular file of the package",
                member=name,
            )
    else:
        kind = {
            tarfile.CHRTYPE: "character device",
            tarfile.BLKTYPE: "block device",
            tarfile.FIFOTYPE: "FIFO",
        }.get(member.type, f"type {member.type!r}")
        raise PackageError(f"member {name}: a {kind} (only files, directories and links are allowed)", member=name)
    scan.kinds[name] = kind
    scan.modes[name] = member.mode
    scan.unpacked += member.size
    if len(scan.kinds) > limits.max_members:
        raise PackageError(f"more than {limits.max_members:,} members", member=name)
    return name


def _check_links(scan: _Scan) -> None:
    """Checks that need every member: symlink targets, and paths that pass through a symlink."""
    for name in scan.kinds:
        parent = PurePosixPath(name).parent
        for prefix in [*reversed(parent.parents), parent][1:]:
            if str(prefix) in scan.symlinks:
                raise PackageError(f"member {name}: its path goes through the symlink {prefix}", member=name)
    for name, target in scan.symlinks.items():
        if not target or target.startswith("/"):
            raise PackageError(f"member {name}: symlink to the absolute path {target!r}", member=name)
        resolved: list[str] = list(PurePosixPath(name).parent.parts)
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    raise PackageError(f"member {name}: symlink to {target!r} points outside the package", member=name)
                resolved.pop()
                continue
            resolved.append(part)
            if "/".join(resolved) in scan.symlinks:
                raise PackageError(
                    f"member {name}: symlink to {target!r} goes through another symlink ({'/'.join(resolved)})",
                    member=name,
                )


def _read_archive(path: Path, limits: Limits, label: str) -> _Scan:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PackageError(f"{path}: cannot read the package ({exc.strerror})", package=label) from None
    if size > limits.max_size:
        raise PackageError(f"{label}: {size:,} bytes is over the {limits.max_size:,}-byte limit", package=label)
    scan = _Scan()
    try:
        with path.open("rb") as raw:
            counted = _CountingReader(gzip.GzipFile(fileobj=raw, mode="rb"), limits.max_unpacked, label)
            with tarfile.open(fileobj=io.BufferedReader(counted), mode="r|") as archive:
                for member in archive:
                    name = _check_member(member, scan, limits)
                    if name == MANIFEST_NAME and member.isreg():
                        if member.size > limits.max_manifest:
                            raise PackageError(
                                f"{MANIFEST_NAME}: {member.size:,} bytes, over the {limits.max_manifest:,}-byte limit",
                                member=name,
                            )
                        extracted = archive.extractfile(member)
                        scan.manifest = extracted.read() if extracted else b""
    except PackageError:
        raise
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise PackageError(f"{label}: not a readable .tar.gz archive ({exc})", package=label) from None
    except OSError as exc:
        raise PackageError(f"{label}: cannot read the package ({exc})", package=label) from None
    return scan


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_manifest(scan: _Scan, label: str) -> Manifest:
    kind = scan.kinds.get(MANIFEST_NAME)
    if kind is None:
        raise PackageError(f"{label}: no {MANIFEST_NAME} at the top level", member=MANIFEST_NAME, package=label)
    if kind != "file" or scan.manifest is None:
        raise PackageError(f"{label}: {MANIFEST_NAME} must be a regular file, not a {kind}", member=MANIFEST_NAME)
    try:
        data = yaml.safe_load(scan.manifest.decode("utf-8"))
    except UnicodeDecodeError:
        raise PackageError(f"{label}: {MANIFEST_NAME} is not UTF-8 text", member=MANIFEST_NAME) from None
    except yaml.YAMLError as exc:
        raise PackageError(f"{label}: {MANIFEST_NAME} is not valid YAML: {exc}", member=MANIFEST_NAME) from None
    return Manifest.from_dict(data, source=f"{label}: {MANIFEST_NAME}")


def _check_scripts(manifest: Manifest, scan: _Scan, label: str) -> None:
    for role, script in (("start", manifest.start), ("stop", manifest.stop)):
        kind = scan.kinds.get(script)
        if kind is None:
            raise PackageError(f"{label}: the {role} script {script} is missing", member=script, package=label)
        if kind not in ("file", "hardlink"):
            raise PackageError(
                f"{label}: the {role} script {script} must be a regular file, not a {kind}", member=script
            )
        if not scan.modes[script] & 0o100:
            raise PackageError(
                f"{label}: the {role} script {script} is not executable (mode {scan.modes[script]:o}; chmod +x it)",
                member=script,
            )


def inspect_package(path: str | os.PathLike[str], limits: Limits | None = None) -> Package:
    """Validate a package file completely; raise :class:`PackageError` naming the member and the reason."""
    path = Path(path)
    return _inspect(path, limits or Limits(), file_name=path.name)


def _inspect(path: Path, limits: Limits, *, file_name: str) -> Package:
    if not file_name.endswith(PACKAGE_SUFFIX):
        raise PackageError(f"{file_name}: a package file is named NAME-VERSION{PACKAGE_SUFFIX}", package=file_name)
    scan = _read_archive(path, limits, file_name)
    _check_links(scan)
    manifest = _parse_manifest(scan, file_name)
    expected = package_file_name(manifest.name, manifest.version)
    if file_name != expected:
        raise PackageError(
            f"{file_name}: the manifest says {manifest.name} {manifest.version}, so the file must be named {expected}",
            package=file_name,
        )
    _check_scripts(manifest, scan, file_name)
    return Package(
        path=path,
        manifest=manifest,
        sha256=_sha256(path),
        size=path.stat().st_size,
        unpacked_size=scan.unpacked,
        members=tuple(scan.kinds),
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
        manifest = Manifest.from_dict(yaml.safe_load(text), source=str(manifest_path))
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
