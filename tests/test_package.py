"""Package format: building, inspecting, and refusing every member that could escape or harm."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

from ansible_collections.svcreg.registry.plugins.module_utils.package_format import name_problem
from registry.exceptions import PackageError, ValidationError
from registry.model import validate_service_name
from registry.package import Limits, build_package, inspect_package, resolve_env

from .package_corpus import CORPUS, BadPackage, base_members, manifest_text, write_package

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello"
LIMITS = Limits(max_unpacked=64 * 1024 * 1024)  # the corpus's gzip bomb unpacks to 100 MiB


@pytest.mark.parametrize("bad", CORPUS, ids=str)
def test_bad_packages_are_refused_naming_the_reason(bad: BadPackage, tmp_path: Path) -> None:
    path = bad.make(tmp_path)
    with pytest.raises(PackageError) as caught:
        inspect_package(path, LIMITS)
    assert bad.reason in str(caught.value)
    assert caught.value.code == "bad_request"


def test_gzip_bomb_stops_at_the_unpacked_limit_not_the_end(tmp_path: Path) -> None:
    bomb = next(bad for bad in CORPUS if bad.id == "gzip-bomb").make(tmp_path)
    assert bomb.stat().st_size < 1024 * 1024
    with pytest.raises(PackageError, match="gzip bomb"):
        inspect_package(bomb, Limits(max_unpacked=10 * 1024 * 1024))
    assert inspect_package(bomb, Limits(max_unpacked=200 * 1024 * 1024)).unpacked_size > 100 * 1024 * 1024


def test_file_size_limit(tmp_path: Path) -> None:
    path = write_package(tmp_path)
    with pytest.raises(PackageError, match="over the 100-byte limit"):
        inspect_package(path, Limits(max_size=100))


def test_member_count_limit(tmp_path: Path) -> None:
    path = build_package(_copy_example(tmp_path), tmp_path / "out")
    with pytest.raises(PackageError, match="more than 3 members"):
        inspect_package(path.path, Limits(max_members=3))


def test_member_names_are_reported(tmp_path: Path) -> None:
    path = next(bad for bad in CORPUS if bad.id == "setuid").make(tmp_path)
    with pytest.raises(PackageError) as caught:
        inspect_package(path)
    assert caught.value.details["member"] == "bin/su"


def test_symlinks_inside_the_package_are_fine(tmp_path: Path) -> None:
    link = tarfile.TarInfo("bin/start")
    link.type = tarfile.SYMTYPE
    link.linkname = "../scripts/start.sh"
    path = write_package(tmp_path, [*_valid_members(), (link, b"")])
    assert "bin/start" in inspect_package(path).members


def test_example_builds_and_inspects(tmp_path: Path) -> None:
    package = build_package(EXAMPLE, tmp_path)
    assert package.path == tmp_path / "hello-1.0.0.tar.gz"
    assert package.manifest.name == "hello"
    assert [endpoint.port for endpoint in package.manifest.endpoints] == [8080]
    assert package.manifest.health is not None and package.manifest.health.tcp == 8080
    again = inspect_package(package.path)
    assert again.sha256 == package.sha256 and len(package.sha256) == 64
    with tarfile.open(package.path) as archive:
        members = {member.name: member for member in archive.getmembers()}
    assert {"manifest.yaml", "bin/hello", "scripts/start.sh", "scripts/stop.sh"} <= set(members)
    assert all(member.uid == 0 and member.uname == "root" for member in members.values())
    assert members["scripts/start.sh"].mode & 0o111


def test_build_is_reproducible_with_source_date_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first = build_package(EXAMPLE, tmp_path / "a")
    source = _copy_example(tmp_path)
    os.utime(source / "bin" / "hello", (1, 1))
    second = build_package(source, tmp_path / "b")
    assert first.sha256 == second.sha256


def test_build_leaves_out_vcs_and_caches(tmp_path: Path) -> None:
    source = _copy_example(tmp_path)
    (source / ".git").mkdir()
    (source / ".git" / "config").write_text("secret remote")
    (source / "bin" / "__pycache__").mkdir()
    (source / "bin" / "__pycache__" / "x.pyc").write_bytes(b"")
    package = build_package(source, tmp_path / "out")
    assert not [name for name in package.members if ".git" in name or "__pycache__" in name]


def test_build_refuses_an_invalid_directory_and_writes_nothing(tmp_path: Path) -> None:
    source = _copy_example(tmp_path)
    (source / "scripts" / "start.sh").chmod(0o644)
    out = tmp_path / "out"
    with pytest.raises(PackageError, match=r"start script scripts/start.sh is not executable"):
        build_package(source, out)
    assert list(out.iterdir()) == []
    (source / "scripts" / "start.sh").chmod(0o755)
    (source / "manifest.yaml").write_text("name: hello\nversion: [1]\n")
    with pytest.raises(PackageError, match="version"):
        build_package(source, out)
    (source / "manifest.yaml").unlink()
    with pytest.raises(PackageError, match="cannot read the manifest"):
        build_package(source, out)


def test_build_refuses_special_files(tmp_path: Path) -> None:
    source = _copy_example(tmp_path)
    os.mkfifo(source / "bin" / "pipe")
    with pytest.raises(PackageError, match="only files, directories and symlinks"):
        build_package(source, tmp_path / "out")


def test_build_output_inside_the_source_is_refused(tmp_path: Path) -> None:
    source = _copy_example(tmp_path)
    with pytest.raises(PackageError, match="outside the package directory"):
        build_package(source, source / "dist")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("health: {tcp: 80, command: x}\n", "exactly one of"),
        ("health: {tcp: 70000}\n", "health.tcp: must be an integer <= 65535"),
        ("health: {tcp: 80, timeout: -1}\n", "health.timeout"),
        ("env: {SVCREG_X: a}\n", "reserved"),
        ("env: {'1BAD': a}\n", "not a valid environment variable name"),
        ("env: {A: [1]}\n", "default must be"),
        ("endpoints: [{name: a, port: 1}, {name: a, port: 2}]\n", "appear twice"),
        ("endpoints: [{name: a, port: 1, colour: red}]\n", r"endpoints\[0\]: .*unknown field"),
        ("description: [1]\n", "description: "),
        ("start: /bin/sh\n", "absolute path"),
        ("stop: ../x.sh\n", "'..'"),
    ],
)
def test_manifest_field_errors(tmp_path: Path, extra: str, message: str) -> None:
    path = write_package(tmp_path, _valid_members(manifest_text(extra=extra)))
    with pytest.raises(PackageError, match=message):
        inspect_package(path)


def test_resolve_env_defaults_overrides_and_errors(tmp_path: Path) -> None:
    path = write_package(tmp_path, _valid_members(manifest_text(extra="env: {PORT: 8080, TOKEN: null}\n")))
    manifest = inspect_package(path).manifest
    assert resolve_env(manifest, {"TOKEN": "s3cret"}) == {"PORT": "8080", "TOKEN": "s3cret"}
    assert resolve_env(manifest, {"TOKEN": "x", "PORT": 9}) == {"PORT": "9", "TOKEN": "x"}
    with pytest.raises(ValidationError, match=r"needs environment variables without a default: TOKEN"):
        resolve_env(manifest, {})
    with pytest.raises(ValidationError, match=r"does not declare env variable.*TOKN"):
        resolve_env(manifest, {"TOKN": "s3cret"})
    with pytest.raises(ValidationError) as caught:
        resolve_env(manifest, {"TOKEN": ["s3cret"]})
    assert "s3cret" not in str(caught.value)


def _valid_members(manifest: bytes | None = None) -> list[tuple[tarfile.TarInfo, bytes]]:
    return base_members(manifest)


def _copy_example(tmp_path: Path) -> Path:
    target = tmp_path / "src" / "hello"
    shutil.copytree(EXAMPLE, target, symlinks=True)
    return target


@pytest.mark.parametrize(
    "name", ["api", "api-server", "a" * 63, "a" * 64, "Api", "api_server", "-api", "api-", "", "api.v2", "api\n"]
)
def test_package_names_are_service_names(name: str) -> None:
    """The package name rule (module_utils/package_format, applied on the target too) is the service-name rule."""
    try:
        validate_service_name(name)
    except ValidationError:
        service_name_ok = False
    else:
        service_name_ok = True
    assert (name_problem(name) is None) is service_name_ok


def test_a_root_directory_entry_is_fine_as_on_the_host(tmp_path: Path) -> None:
    """``tar -C dir .`` writes ``./`` and ``./name`` members; the host's checks accept them, so the controller does."""
    root = tarfile.TarInfo("./")
    root.type = tarfile.DIRTYPE
    root.mode = 0o755
    members = [(root, b"")]
    for info, data in _valid_members():
        info.name = "./" + info.name
        members.append((info, data))
    package = inspect_package(write_package(tmp_path, members))
    assert {"manifest.yaml", "scripts/start.sh"} <= set(package.members)
