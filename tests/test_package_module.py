"""The svcreg.registry.package module, run for real as Ansible runs it on a target host.

Every test runs `package.py ARGS.json` in a subprocess on this machine, against an install base in the test's
temporary directory, with packages built here with tarfile: real shell scripts start a real HTTP server
(`python -m http.server`, serving the release directory, so GET /VERSION says which release runs) and the
health checks are real TCP connections to free ports on 127.0.0.1. Every server a test starts is killed when
the test ends, whatever happened.

The second half checks package_archive's refusal of each kind of malicious member, in-process.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.svcreg.registry.plugins.module_utils.package_archive import ArchiveError, extract_archive

from .helpers import free_port

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "ansible_collections/svcreg/registry/plugins/modules/package.py"
NAME = "demo"
SECRET = "hunter2-'quoted' $HOME value"
# Where ansible.module_utils comes from when the module runs on another interpreter (Ansible ships it to targets).
ANSIBLE_PATH = sysconfig.get_paths()["purelib"]

START_SH = f"""#!/bin/sh
set -e
echo "starting $SVCREG_NAME $SVCREG_VERSION on port $PORT"
cd "$SVCREG_RELEASE_DIR"
{sys.executable} -m http.server "$PORT" --bind 127.0.0.1 >"$SVCREG_SHARED_DIR/http-$SVCREG_VERSION.log" 2>&1 &
echo $! >"$SVCREG_RELEASE_DIR/service.pid"
echo $! >>"$PIDLOG"
"""

STOP_SH = """#!/bin/sh
pidfile="$SVCREG_RELEASE_DIR/service.pid"
[ -f "$pidfile" ] || exit 0
pid=$(cat "$pidfile")
kill "$pid" 2>/dev/null
running() { [ -e "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
n=0
while running "$pid" && [ "$n" -lt 100 ]; do sleep 0.05; n=$((n + 1)); done
rm -f "$pidfile"
"""

# Fails once the test drops a file named "broken" into the release.
BREAKABLE_START_SH = START_SH.replace(
    "set -e\n", 'set -e\n[ ! -e "$SVCREG_RELEASE_DIR/broken" ] || { echo "broken release" >&2; exit 4; }\n'
)

FAILING_START_SH = """#!/bin/sh
echo "starting $SVCREG_VERSION"
echo "cannot open the database" >&2
exit 3
"""

NOOP_SH = "#!/bin/sh\nexit 0\n"


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def served_version(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/VERSION", timeout=5) as response:
        return response.read().decode().strip()


def tar_add(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields: Any) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything about the tree that a write would change."""
    found: dict[str, tuple[Any, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for entry in [directory, *(os.path.join(directory, name) for name in dirs + files)]:
            info = os.lstat(entry)
            link = os.readlink(entry) if stat.S_ISLNK(info.st_mode) else None
            found[entry] = (info.st_mode, info.st_mtime_ns, info.st_size, info.st_ino, link)
    return found


class Target:
    """An install base, a package directory and a port for one test; `run` runs the module against them."""

    def __init__(self, root: Path, python: str = sys.executable) -> None:
        self.root = root
        self.python = python
        self.install_base = root / "opt"
        self.base = self.install_base / NAME
        self.dist = root / "dist"
        self.dist.mkdir()
        self.pidlog = root / "pids"
        self.pidlog.touch()
        self.port = free_port()

    def package(
        self,
        version: str,
        *,
        start: str = START_SH,
        stop: str = STOP_SH,
        start_mode: int = 0o755,
        extra: bytes = b"",
    ) -> tuple[Path, str]:
        """Build NAME-VERSION.tar.gz reproducibly (same content, same checksum); return its path and sha256."""
        path = self.dist / f"{NAME}-{version}.tar.gz"
        with (
            path.open("wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as packed,
            tarfile.open(fileobj=packed, mode="w") as tar,
        ):
            tar_add(tar, "./", type=tarfile.DIRTYPE, mode=0o755)
            tar_add(tar, "./manifest.yaml", f"name: {NAME}\nversion: {version}\n".encode())
            tar_add(tar, "./VERSION", f"{version}\n".encode() + extra)
            tar_add(tar, "./scripts", type=tarfile.DIRTYPE, mode=0o755)
            tar_add(tar, "./scripts/start.sh", start.encode(), mode=start_mode)
            tar_add(tar, "./scripts/stop.sh", stop.encode(), mode=0o755)
            tar_add(tar, "./scripts/health.sh", NOOP_SH.encode(), mode=0o755)
        return path, hashlib.sha256(path.read_bytes()).hexdigest()

    def manifest(self, version: str, *, health: Any = "tcp", env: dict[str, Any] | None = None) -> dict[str, Any]:
        if health == "tcp":
            health = {"tcp": self.port, "host": "127.0.0.1", "timeout": 10, "interval": 0.1}
        return {
            "name": NAME,
            "version": version,
            "description": "a test service",
            "endpoints": [{"name": "http", "port": self.port, "protocol": "tcp"}],
            "health": health,
            "env": {"PORT": str(self.port), "PIDLOG": str(self.pidlog), **(env or {})},
            "start": "scripts/start.sh",
            "stop": "scripts/stop.sh",
        }

    def present(
        self,
        version: str,
        *,
        package: dict[str, Any] | None = None,
        manifest: dict[str, Any] | None = None,
        **args: Any,
    ) -> dict[str, Any]:
        """The arguments the action plugin would pass to deploy VERSION."""
        src, checksum = self.package(version, **(package or {}))
        return {
            "name": NAME,
            "version": version,
            "install_base": str(self.install_base),
            "src": str(src),
            "checksum": checksum,
            "manifest": manifest or self.manifest(version),
            **args,
        }

    def run(self, args: dict[str, Any], *, check: bool = False) -> tuple[dict[str, Any], str]:
        """Run the module; return its result and everything it printed."""
        module_args = {"install_base": str(self.install_base), **args}
        if check:
            module_args["_ansible_check_mode"] = True
        args_file = self.root / "args.json"
        args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": module_args}))
        process = subprocess.run(
            [self.python, str(MODULE), str(args_file)],
            env={**os.environ, "PYTHONPATH": f"{REPO}:{ANSIBLE_PATH}"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert process.stdout.strip(), process.stderr
        return json.loads(process.stdout), process.stdout + process.stderr

    def deploy(self, version: str, **kwargs: Any) -> dict[str, Any]:
        result, output = self.run(self.present(version, **kwargs))
        assert not result.get("failed"), output
        return result

    def current(self) -> str | None:
        link = self.base / "current"
        return os.readlink(link) if link.is_symlink() else None

    def release(self, version: str) -> dict[str, Any]:
        return json.loads((self.base / "releases" / version / ".svcreg-release.json").read_text())

    def history(self) -> list[str]:
        return json.loads((self.base / ".svcreg-history.json").read_text())

    def pid(self, version: str) -> int:
        return int((self.base / "releases" / version / "service.pid").read_text())

    def started_pids(self) -> list[int]:
        return [int(line) for line in self.pidlog.read_text().split()]

    def kill_all(self) -> None:
        for pid in self.started_pids():
            if alive(pid) and b"http.server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    target = Target(tmp_path)
    try:
        yield target
    finally:
        target.kill_all()


@pytest.fixture(scope="session")
def python_without_data_filter(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An interpreter whose tarfile has no data filter, like Debian 12's Python 3.11.2 on the targets.

    A real one when the machine has it; otherwise this Python with ``tarfile.data_filter`` removed at
    start-up (a ``sitecustomize`` put first on PYTHONPATH), so the test always runs.
    """
    probe = "import sys, tarfile; sys.exit(hasattr(tarfile, 'data_filter'))"
    for candidate in ("/usr/bin/python3", "/usr/bin/python3.11"):
        if os.path.exists(candidate) and subprocess.run([candidate, "-c", probe]).returncode == 0:
            return candidate
    folder = tmp_path_factory.mktemp("no-data-filter")
    (folder / "sitecustomize.py").write_text("import tarfile\n\ndel tarfile.data_filter\n")
    wrapper = folder / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{folder}:$PYTHONPATH" exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    assert subprocess.run([str(wrapper), "-c", probe]).returncode == 0
    return str(wrapper)


def wait_dead(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


# state=present


def test_first_deploy_starts_the_release_and_lays_out_the_directory(target: Target) -> None:
    result = target.deploy("1.0.0")

    assert result["changed"] is True
    assert result["action"] == "deployed"
    assert result["version"] == "1.0.0"
    assert result["previous_version"] is None
    assert result["release_dir"] == str(target.base / "releases/1.0.0")
    assert result["releases"] == ["1.0.0"]
    assert result["health"]["ok"] is True
    assert f"127.0.0.1:{target.port} accepted a TCP connection" in result["health"]["detail"]
    assert result["start"]["rc"] == 0
    assert f"starting demo 1.0.0 on port {target.port}" in result["start"]["stdout"]
    assert served_version(target.port) == "1.0.0"
    assert target.current() == "releases/1.0.0"
    metadata = target.release("1.0.0")
    assert metadata["status"] == "good"
    assert metadata["checksum"] == result["checksum"]
    assert metadata["version"] == "1.0.0"
    assert metadata["deployed_at"].endswith("+00:00")
    assert target.history() == ["1.0.0"]
    cached = target.base / "packages/demo-1.0.0.tar.gz"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == result["checksum"]
    assert stat.S_IMODE((target.base / "shared").stat().st_mode) == 0o700
    assert (target.base / ".lock").exists()


def test_redeploy_unchanged_does_not_restart(target: Target) -> None:
    target.deploy("1.0.0")
    pid = target.pid("1.0.0")

    result = target.deploy("1.0.0")

    assert result["changed"] is False
    assert result["action"] == "unchanged"
    assert result["health"]["ok"] is True
    assert result["start"] is None
    assert target.pid("1.0.0") == pid
    assert alive(pid)
    assert target.started_pids() == [pid]


def test_unchanged_release_that_fails_its_probe_is_restarted(target: Target) -> None:
    target.deploy("1.0.0")
    old_pid = target.pid("1.0.0")
    os.kill(old_pid, signal.SIGKILL)
    assert wait_dead(old_pid)

    result = target.deploy("1.0.0")

    assert result["changed"] is True
    assert result["action"] == "restarted"
    assert result["health"]["ok"] is True
    new_pid = target.pid("1.0.0")
    assert new_pid != old_pid
    assert alive(new_pid)
    assert served_version(target.port) == "1.0.0"


def test_new_version_stops_the_old_one_and_switches_current(target: Target) -> None:
    target.deploy("1.0.0")
    old_pid = target.pid("1.0.0")

    result = target.deploy("2.0.0")

    assert result["action"] == "deployed"
    assert result["changed"] is True
    assert result["previous_version"] == "1.0.0"
    assert result["releases"] == ["1.0.0", "2.0.0"]
    assert not alive(old_pid)
    assert alive(target.pid("2.0.0"))
    assert served_version(target.port) == "2.0.0"
    assert target.current() == "releases/2.0.0"
    assert target.history() == ["1.0.0", "2.0.0"]


def test_failing_start_script_rolls_back_to_the_previous_release(target: Target) -> None:
    target.deploy("1.0.0")
    old_pid = target.pid("1.0.0")

    result, _ = target.run(target.present("2.0.0", package={"start": FAILING_START_SH}))

    assert result["failed"] is True
    assert "start script scripts/start.sh of demo 2.0.0 exited with 3" in result["msg"]
    assert "demo 1.0.0 is current again" in result["msg"]
    assert result["rc"] == 3
    assert "starting 2.0.0" in result["stdout"]
    assert "cannot open the database" in result["stderr"]
    assert result["failed_release"] == "2.0.0"
    assert result["rolled_back_to"] == "1.0.0"
    assert result["rollback_error"] is None
    assert not alive(old_pid)
    assert alive(target.pid("1.0.0"))
    assert served_version(target.port) == "1.0.0"
    assert target.current() == "releases/1.0.0"
    assert target.release("2.0.0")["status"] == "failed"
    assert target.history() == ["1.0.0"]


def test_health_check_timeout_rolls_back(target: Target) -> None:
    target.deploy("1.0.0")
    silent_port = free_port()
    manifest = target.manifest("2.0.0", health={"tcp": silent_port, "host": "127.0.0.1", "timeout": 1, "interval": 0.2})

    result, _ = target.run(target.present("2.0.0", package={"start": NOOP_SH}, manifest=manifest))

    assert result["failed"] is True
    assert f"health check of demo 2.0.0 failed: no TCP connection to 127.0.0.1:{silent_port}" in result["msg"]
    assert result["health"]["ok"] is False
    assert result["rc"] == 0
    assert result["rolled_back_to"] == "1.0.0"
    assert served_version(target.port) == "1.0.0"
    assert target.current() == "releases/1.0.0"
    assert target.release("2.0.0")["status"] == "failed"


def test_health_timeout_option_overrides_the_manifest(target: Target) -> None:
    manifest = target.manifest("1.0.0", health={"tcp": free_port(), "host": "127.0.0.1", "timeout": 60})
    began = time.monotonic()

    result, _ = target.run(target.present("1.0.0", manifest=manifest, health_timeout=0.5))

    assert result["failed"] is True
    assert "health check of demo 1.0.0 failed" in result["msg"]
    assert time.monotonic() - began < 30


def test_failing_first_deploy_leaves_no_current_release(target: Target) -> None:
    result, _ = target.run(target.present("1.0.0", package={"start": FAILING_START_SH}))

    assert result["failed"] is True
    assert "no previous good release" in result["msg"]
    assert result["rolled_back_to"] is None
    assert result["failed_release"] == "1.0.0"
    assert target.current() is None
    assert not (target.base / "current").exists()
    assert target.release("1.0.0")["status"] == "failed"

    retried = target.deploy("1.0.0", package={"extra": b"fixed"}, force=True)
    assert retried["action"] == "deployed"
    assert served_version(target.port) == "1.0.0\nfixed"


def test_start_script_timeout_kills_its_process_group(target: Target) -> None:
    sleeper = target.root / "sleeper.pid"
    hanging = f"#!/bin/sh\nsleep 60 &\necho $! >{sleeper}\nwait\n"

    result, _ = target.run(target.present("1.0.0", package={"start": hanging}, script_timeout=1))

    assert result["failed"] is True
    assert "start script scripts/start.sh of demo 1.0.0 did not finish within 1 s and was killed" in result["msg"]
    assert result["rc"] is None
    assert wait_dead(int(sleeper.read_text()))


def test_health_command(target: Target) -> None:
    health = {"command": "scripts/health.sh", "timeout": 5, "interval": 0.2}

    result = target.deploy("1.0.0", manifest=target.manifest("1.0.0", health=health))

    assert result["health"] == {"ok": True, "detail": result["health"]["detail"]}
    assert result["health"]["detail"].startswith("scripts/health.sh exited 0 after")
    again = target.deploy("1.0.0", manifest=target.manifest("1.0.0", health=health))
    assert again["action"] == "unchanged"


def test_no_health_check(target: Target) -> None:
    result = target.deploy("1.0.0", manifest=target.manifest("1.0.0", health=None))

    assert result["health"] == {"ok": None, "detail": "the manifest defines no health check"}
    assert target.deploy("1.0.0", manifest=target.manifest("1.0.0", health=None))["action"] == "unchanged"


def test_keep_releases_prunes_old_and_failed_releases_and_their_packages(target: Target) -> None:
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        result = target.deploy(version, keep_releases=1)

    assert result["releases"] == ["2.0.0", "3.0.0"]
    assert sorted(os.listdir(target.base / "releases")) == ["2.0.0", "3.0.0"]
    assert sorted(os.listdir(target.base / "packages")) == ["demo-2.0.0.tar.gz", "demo-3.0.0.tar.gz"]
    assert target.history() == ["2.0.0", "3.0.0"]

    failed, _ = target.run(target.present("4.0.0", package={"start": FAILING_START_SH}, keep_releases=1))
    assert failed["rolled_back_to"] == "3.0.0"
    assert sorted(os.listdir(target.base / "releases")) == ["2.0.0", "3.0.0", "4.0.0"]

    result = target.deploy("5.0.0", keep_releases=1)
    assert result["releases"] == ["3.0.0", "5.0.0"]
    assert sorted(os.listdir(target.base / "packages")) == ["demo-3.0.0.tar.gz", "demo-5.0.0.tar.gz"]
    assert target.history() == ["3.0.0", "5.0.0"]


def test_env_file_is_private_and_quoted_and_a_change_redeploys(target: Target) -> None:
    manifest = target.manifest("1.0.0", env={"API_TOKEN": None, "GREETING": "hello world"})

    target.deploy("1.0.0", manifest=manifest, env={"API_TOKEN": SECRET, "EXTRA": 7})

    env_file = target.base / "shared/env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    lines = env_file.read_text().splitlines()
    assert lines[0].startswith("#")
    assert lines[1:] == [
        "export API_TOKEN='hunter2-'\"'\"'quoted'\"'\"' $HOME value'",
        "export EXTRA=7",
        "export GREETING='hello world'",
        f"export PIDLOG={target.pidlog}",
        f"export PORT={target.port}",
    ]
    sourced = subprocess.run(
        ["sh", "-c", f'. {env_file} && printf %s "$API_TOKEN"'], capture_output=True, text=True, check=True
    )
    assert sourced.stdout == SECRET
    assert not list((target.base / "shared").glob(".env*"))

    pid = target.pid("1.0.0")
    changed = target.deploy("1.0.0", manifest=manifest, env={"API_TOKEN": "rotated", "EXTRA": 7})
    assert changed["action"] == "deployed"
    assert not alive(pid)
    assert "export API_TOKEN=rotated" in env_file.read_text()


def test_secret_never_appears_in_the_output(target: Target) -> None:
    leak = 'echo "token=$API_TOKEN"\necho "token=$API_TOKEN" >&2\n'
    needs_token = {"API_TOKEN": None}
    leaky = {"start": START_SH + leak, "stop": STOP_SH + leak + "exit 1\n"}

    result, output = target.run(
        target.present(
            "1.0.0", package=leaky, manifest=target.manifest("1.0.0", env=needs_token), env={"API_TOKEN": SECRET}
        )
    )
    assert result["action"] == "deployed"
    assert SECRET not in output
    assert "token=********" in result["start"]["stdout"]
    assert "token=********" in result["start"]["stderr"]

    result, output = target.run(
        target.present("2.0.0", manifest=target.manifest("2.0.0", env=needs_token), env={"API_TOKEN": SECRET})
    )
    assert result["action"] == "deployed"
    assert SECRET not in output
    assert "stop script scripts/stop.sh of demo 1.0.0 exited with 1; stderr: token=********" in str(result["warnings"])

    failing = {"start": START_SH + leak + "exit 1\n"}
    result, output = target.run(
        target.present(
            "3.0.0", package=failing, manifest=target.manifest("3.0.0", env=needs_token), env={"API_TOKEN": SECRET}
        )
    )
    assert result["failed"] is True
    assert SECRET not in output
    assert "token=********" in result["stdout"]

    forms = (SECRET.encode(), shlex.quote(SECRET).encode())
    written = {path for path in target.root.rglob("*") if path.is_file() and any(f in path.read_bytes() for f in forms)}
    assert written == {target.root / "args.json", target.base / "shared/env"}


def test_checksum_mismatch_installs_nothing(target: Target) -> None:
    args = target.present("1.0.0")
    args["checksum"] = hashlib.sha256(b"something else").hexdigest()

    result, _ = target.run(args)

    assert result["failed"] is True
    assert result["msg"].startswith(f"checksum mismatch for {args['src']}: expected sha256 {args['checksum']}, got ")
    assert os.listdir(target.base / "releases") == []
    assert os.listdir(target.base / "packages") == []
    assert target.current() is None


def test_missing_required_env_fails_before_stopping_anything(target: Target) -> None:
    target.deploy("1.0.0")
    pid = target.pid("1.0.0")
    manifest = target.manifest("2.0.0", env={"API_TOKEN": None, "DB_URL": None, "OPTIONAL": "x"})

    result, _ = target.run(target.present("2.0.0", manifest=manifest, env={"UNRELATED": "y"}))

    assert result["failed"] is True
    assert (
        result["msg"] == "demo 2.0.0 needs environment variables without a default: API_TOKEN, DB_URL; pass them in env"
    )
    assert alive(pid)
    assert target.current() == "releases/1.0.0"
    assert sorted(os.listdir(target.base / "releases")) == ["1.0.0"]


def test_same_version_with_another_checksum_needs_force(target: Target) -> None:
    target.deploy("1.0.0")
    pid = target.pid("1.0.0")

    result, _ = target.run(target.present("1.0.0", package={"extra": b"rebuilt"}))

    assert result["failed"] is True
    assert "demo version 1.0.0 is installed with a different checksum" in result["msg"]
    assert "bump the version or use force" in result["msg"]
    assert alive(pid)

    forced = target.deploy("1.0.0", package={"extra": b"rebuilt"}, force=True)
    assert forced["action"] == "deployed"
    assert forced["previous_version"] == "1.0.0"
    assert not alive(pid)
    assert served_version(target.port) == "1.0.0\nrebuilt"
    assert target.history() == ["1.0.0"]


def test_force_restarts_an_unchanged_release(target: Target) -> None:
    target.deploy("1.0.0")
    pid = target.pid("1.0.0")

    result = target.deploy("1.0.0", force=True)

    assert result["action"] == "deployed"
    assert result["changed"] is True
    assert not alive(pid)
    assert alive(target.pid("1.0.0"))


def test_start_script_not_executable_fails_before_stopping_anything(target: Target) -> None:
    target.deploy("1.0.0")
    pid = target.pid("1.0.0")

    result, _ = target.run(target.present("2.0.0", package={"start_mode": 0o644}))

    assert result["failed"] is True
    assert "start script scripts/start.sh in " in result["msg"]
    assert "is not executable (mode 0644)" in result["msg"]
    assert alive(pid)
    assert target.current() == "releases/1.0.0"
    assert os.listdir(target.base / "releases") == ["1.0.0"]


def test_src_is_needed_only_when_the_release_is_not_installed(target: Target) -> None:
    args = target.present("1.0.0")
    del args["src"]
    result, _ = target.run(args)
    assert result["failed"] is True
    assert result["msg"].startswith("src is required: demo 1.0.0 is not installed with checksum")

    target.deploy("1.0.0")
    (target.base / "packages/demo-1.0.0.tar.gz").unlink()
    manifest = target.manifest("1.0.0", env={"GREETING": "changed"})
    args = target.present("1.0.0", manifest=manifest)
    del args["src"]
    result, output = target.run(args)
    assert result["action"] == "deployed", output
    assert "export GREETING=changed" in (target.base / "shared/env").read_text()


def test_cached_package_is_used_as_src(target: Target) -> None:
    target.deploy("1.0.0")
    target.deploy("2.0.0")
    args = target.present("1.0.0", force=True)
    args["src"] = str(target.base / "packages/demo-1.0.0.tar.gz")

    result, output = target.run(args)

    assert result["action"] == "deployed", output
    assert served_version(target.port) == "1.0.0"


def test_malicious_package_is_refused_by_the_module(target: Target) -> None:
    target.deploy("1.0.0")
    src = target.dist / "evil-2.0.0.tar.gz"
    with tarfile.open(src, "w:gz") as tar:
        tar_add(tar, "scripts/start.sh", START_SH.encode(), mode=0o755)
        tar_add(tar, "../escaped", b"x")
    args = {**target.present("2.0.0"), "src": str(src), "checksum": hashlib.sha256(src.read_bytes()).hexdigest()}

    result, _ = target.run(args)

    assert result["failed"] is True
    assert "member '../escaped': '..' path component" in result["msg"]
    assert os.listdir(target.base / "releases") == ["1.0.0"]
    assert os.listdir(target.base / "packages") == ["demo-1.0.0.tar.gz"]
    assert not (target.base / "escaped").exists()
    assert target.current() == "releases/1.0.0"


def test_bad_arguments_fail_with_a_message(target: Target) -> None:
    cases = [
        ({"name": NAME, "version": "1.0.0"}, "state=present needs checksum, manifest (unless rollback=true)"),
        ({"name": "../etc"}, "name '../etc' must be letters"),
        ({"name": NAME, "version": "../x", "checksum": "0" * 64, "manifest": {}}, "version '../x' must be letters"),
        ({**target.present("1.0.0"), "checksum": "abc"}, "checksum must be a sha256 hex digest"),
        ({**target.present("1.0.0"), "keep_releases": 0}, "keep_releases must be at least 1, got 0"),
        ({**target.present("1.0.0"), "manifest": target.manifest("9.9")}, "manifest version '9.9' does not match"),
        ({"name": NAME, "state": "absent", "rollback": True}, "rollback=true needs state=present"),
        ({**target.present("1.0.0"), "env": {"SVCREG_VERSION": "x"}}, "'SVCREG_VERSION' is not a valid environment"),
        ({**target.present("1.0.0"), "env": {"DEBUG": True}}, "env: the value of DEBUG must be a string or a number"),
    ]
    for args, message in cases:
        result, output = target.run(args)
        assert result["failed"] is True, args
        assert message in result["msg"], result["msg"]
        assert "Traceback" not in output


def test_runs_for_the_same_service_wait_for_each_other(target: Target) -> None:
    target.deploy("1.0.0")
    args_file = target.root / "waiting.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": target.present("1.0.0")}))

    with (target.base / ".lock").open() as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = subprocess.Popen(
            [sys.executable, str(MODULE), str(args_file)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            text=True,
        )
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=2)
    output, _ = waiting.communicate(timeout=60)

    assert json.loads(output)["action"] == "unchanged"


def test_module_runs_without_the_tarfile_data_filter(tmp_path: Path, python_without_data_filter: str) -> None:
    target = Target(tmp_path, python=python_without_data_filter)
    try:
        assert target.deploy("1.0.0")["action"] == "deployed"
        assert target.deploy("2.0.0")["action"] == "deployed"
        assert target.deploy("2.0.0")["action"] == "unchanged"
        assert served_version(target.port) == "2.0.0"
    finally:
        target.kill_all()


# rollback and state=absent


def test_explicit_rollback(target: Target) -> None:
    target.deploy("1.0.0")
    target.deploy("2.0.0")
    new_pid = target.pid("2.0.0")

    result, output = target.run({"name": NAME, "rollback": True})

    assert result["action"] == "rolled_back", output
    assert result["changed"] is True
    assert result["version"] == "1.0.0"
    assert result["previous_version"] == "2.0.0"
    assert result["health"]["ok"] is True
    assert result["releases"] == ["1.0.0"]
    assert not alive(new_pid)
    assert served_version(target.port) == "1.0.0"
    assert target.current() == "releases/1.0.0"
    assert not (target.base / "releases/2.0.0").exists()
    assert not (target.base / "packages/demo-2.0.0.tar.gz").exists()
    assert target.history() == ["1.0.0"]

    again, _ = target.run({"name": NAME, "rollback": True})
    assert again["failed"] is True
    assert again["msg"] == "demo has no good release before 1.0.0 to roll back to (history: 1.0.0)"


def test_rollback_to_a_release_that_no_longer_starts_goes_back(target: Target) -> None:
    target.deploy("1.0.0", package={"start": BREAKABLE_START_SH})
    target.deploy("2.0.0", package={"start": BREAKABLE_START_SH})
    (target.base / "releases/1.0.0/broken").touch()

    result, _ = target.run({"name": NAME, "rollback": True})

    assert result["failed"] is True
    assert result["msg"] == "start script scripts/start.sh of demo 1.0.0 exited with 4; demo 2.0.0 is current again"
    assert result["stderr"] == "broken release\n"
    assert (result["failed_release"], result["rolled_back_to"]) == ("1.0.0", "2.0.0")
    assert served_version(target.port) == "2.0.0"
    assert target.current() == "releases/2.0.0"
    assert target.release("1.0.0")["status"] == "failed"

    (target.base / "releases/2.0.0/broken").touch()
    result, _ = target.run(target.present("3.0.0", package={"start": FAILING_START_SH}))

    assert result["failed"] is True
    assert result["rolled_back_to"] == "2.0.0"
    assert result["rollback_error"] == "start script scripts/start.sh of demo 2.0.0 exited with 4"
    assert result["msg"].endswith("; demo 2.0.0 is current again but failed too: " + result["rollback_error"])


def test_rollback_without_any_release_fails(target: Target) -> None:
    result, _ = target.run({"name": NAME, "rollback": True})

    assert result["failed"] is True
    assert result["msg"].startswith("demo has no current release to roll back from")


def test_state_absent_stops_and_removes_everything(target: Target) -> None:
    target.deploy("1.0.0")
    pid = target.pid("1.0.0")

    result, _ = target.run({"name": NAME, "state": "absent"})

    assert result["changed"] is True
    assert result["action"] == "removed"
    assert result["version"] == "1.0.0"
    assert not alive(pid)
    assert not target.base.exists()

    again, _ = target.run({"name": NAME, "state": "absent"})
    assert again["changed"] is False
    assert again["action"] == "absent"


# check mode


def test_check_mode_predicts_each_present_action_without_touching_anything(target: Target) -> None:
    first, _ = target.run(target.present("1.0.0"), check=True)
    assert (first["changed"], first["action"]) == (True, "deployed")
    assert not target.base.exists()

    target.deploy("1.0.0")
    pid = target.pid("1.0.0")
    before = snapshot(target.base)

    unchanged, _ = target.run(target.present("1.0.0"), check=True)
    assert (unchanged["changed"], unchanged["action"]) == (False, "unchanged")
    new_version, _ = target.run(target.present("2.0.0"), check=True)
    assert (new_version["changed"], new_version["action"]) == (True, "deployed")
    env_change, _ = target.run(target.present("1.0.0", manifest=target.manifest("1.0.0", env={"X": "y"})), check=True)
    assert (env_change["changed"], env_change["action"]) == (True, "deployed")
    forced, _ = target.run(target.present("1.0.0", force=True), check=True)
    assert (forced["changed"], forced["action"]) == (True, "deployed")
    assert snapshot(target.base) == before
    assert alive(pid)

    os.kill(pid, signal.SIGKILL)
    assert wait_dead(pid)
    restart, _ = target.run(target.present("1.0.0"), check=True)
    assert (restart["changed"], restart["action"]) == (True, "restarted")
    assert snapshot(target.base) == before
    assert target.started_pids() == [pid]


def test_check_mode_rollback_and_absent_touch_nothing(target: Target) -> None:
    target.deploy("1.0.0")
    target.deploy("2.0.0")
    pid = target.pid("2.0.0")
    before = snapshot(target.base)

    rollback, _ = target.run({"name": NAME, "rollback": True}, check=True)
    assert (rollback["changed"], rollback["action"], rollback["version"]) == (True, "rolled_back", "1.0.0")
    absent, _ = target.run({"name": NAME, "state": "absent"}, check=True)
    assert (absent["changed"], absent["action"]) == (True, "removed")

    assert snapshot(target.base) == before
    assert alive(pid)
    assert served_version(target.port) == "2.0.0"
    nothing, _ = target.run({"name": "never-installed", "state": "absent"}, check=True)
    assert (nothing["changed"], nothing["action"]) == (False, "absent")


# package_archive: malicious members


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the extraction directory that a malicious member aims at."""
    directory = tmp_path / "outside"
    directory.mkdir()
    return directory


def build_archive(path: Path, members: list[tuple[str, dict[str, Any]]]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, fields in members:
            tar_add(tar, name, **fields)
    return path


SYMLINK = tarfile.SYMTYPE
HARDLINK = tarfile.LNKTYPE


def malicious_cases(outside: Path) -> dict[str, tuple[list[tuple[str, dict[str, Any]]], str]]:
    regular: dict[str, Any] = {"data": b"x"}
    return {
        "absolute": ([(str(outside / "evil"), regular)], "absolute path"),
        "dotdot": ([("../outside/evil", regular)], "'..' path component"),
        "dotdot inside": ([("a/../../outside/evil", regular)], "'..' path component"),
        "symlink outside": (
            [("link", {"type": SYMLINK, "linkname": "../outside"})],
            "symlink target '../outside' points outside the package",
        ),
        "symlink absolute": (
            [("link", {"type": SYMLINK, "linkname": str(outside)})],
            "absolute symlink target",
        ),
        "symlink through symlink": (
            [
                ("dir", {"type": tarfile.DIRTYPE, "mode": 0o755}),
                ("dir/file", regular),
                ("first", {"type": SYMLINK, "linkname": "dir"}),
                ("second", {"type": SYMLINK, "linkname": "first/file"}),
            ],
            "symlink target 'first/file' goes through another symlink (member 'first')",
        ),
        "member through symlink": (
            [("link", {"type": SYMLINK, "linkname": "."}), ("link/evil", regular)],
            "its path passes through symlink member 'link'",
        ),
        "symlink over a directory": (
            [("dir/file", regular), ("dir", {"type": SYMLINK, "linkname": "."})],
            "a symlink where earlier members have a directory",
        ),
        "hardlink outside": (
            [("link", {"type": HARDLINK, "linkname": "../outside/target"})],
            "'..' path component",
        ),
        "hardlink absolute": (
            [("link", {"type": HARDLINK, "linkname": str(outside / "target")})],
            "absolute path",
        ),
        "hardlink to a later member": (
            [("link", {"type": HARDLINK, "linkname": "file"}), ("file", regular)],
            "hard link target 'file' is not an earlier file member",
        ),
        "character device": ([("null", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})], "device"),
        "block device": ([("disk", {"type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0})], "device"),
        "fifo": ([("pipe", {"type": tarfile.FIFOTYPE})], "FIFO"),
        "setuid": ([("tool", {"data": b"x", "mode": 0o4755})], "setuid or setgid bit (mode 4755)"),
        "setgid": ([("bin", {"type": tarfile.DIRTYPE, "mode": 0o2755})], "setuid or setgid bit (mode 2755)"),
        "duplicate": ([("file", regular), ("./file", regular)], "duplicate name"),
        "inside a file": ([("file", regular), ("file/inner", regular)], "passes through file member 'file'"),
        "nul byte": ([("evil", {**regular, "pax_headers": {"path": "evil\x00name"}})], "NUL byte"),
        "empty name": ([("", regular)], "empty name"),
    }


CASE_NAMES = list(malicious_cases(Path("/x")))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_archive_refuses_malicious_member(case: str, tmp_path: Path, outside: Path) -> None:
    members, message = malicious_cases(outside)[case]
    archive = build_archive(tmp_path / "evil.tar.gz", members)
    dest = tmp_path / "dest"

    with pytest.raises(ArchiveError, match="member") as refused:
        extract_archive(str(archive), str(dest))

    assert message in str(refused.value)
    assert not dest.exists()
    assert list(outside.iterdir()) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["evil.tar.gz", "outside"]


EXTRACT_EACH = """
import json, sys
from ansible_collections.svcreg.registry.plugins.module_utils.package_archive import ArchiveError, extract_archive
refusals = {}
for case, archive, dest in json.loads(sys.argv[1]):
    try:
        extract_archive(archive, dest)
        refusals[case] = None
    except ArchiveError as error:
        refusals[case] = str(error)
print(json.dumps(refusals))
"""


def test_archive_checks_do_not_need_the_tarfile_data_filter(tmp_path: Path, python_without_data_filter: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    cases = malicious_cases(outside)
    jobs = []
    for index, (case, (members, _)) in enumerate(cases.items()):
        archive = build_archive(tmp_path / f"evil-{index}.tar.gz", members)
        jobs.append((case, str(archive), str(tmp_path / f"dest-{index}")))

    extracted = subprocess.run(
        [python_without_data_filter, "-c", EXTRACT_EACH, json.dumps(jobs)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )

    refusals = json.loads(extracted.stdout)
    for case, (_, message) in cases.items():
        assert refusals[case] is not None, case
        assert message in refusals[case], case
    assert list(outside.iterdir()) == []
    assert not list(tmp_path.glob("dest-*"))


def test_archive_refuses_a_gzip_bomb_at_the_size_limit(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < 1 << 20

    with pytest.raises(ArchiveError, match="member 'zeros': the package unpacks to more than 1048576 bytes"):
        extract_archive(str(archive), str(tmp_path / "dest"), max_unpacked=1 << 20)

    assert not (tmp_path / "dest").exists()


def test_archive_counts_size_over_all_members(tmp_path: Path) -> None:
    chunk = {"data": bytes(400 << 10)}
    archive = build_archive(tmp_path / "many.tar.gz", [("a", chunk), ("b", chunk), ("c", chunk)])

    with pytest.raises(ArchiveError, match="member 'c': the package unpacks to more than"):
        extract_archive(str(archive), str(tmp_path / "dest"), max_unpacked=1 << 20)


def test_archive_stream_limit_stops_huge_headers(tmp_path: Path) -> None:
    """A 4 MiB pax header carries no file data, but the decompressed stream is capped all the same."""
    archive = tmp_path / "pax.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("small")
        info.pax_headers = {"comment": "x" * (4 << 20)}
        tar.addfile(info)

    with pytest.raises(ArchiveError, match="unpacks to more than the size limit"):
        extract_archive(str(archive), str(tmp_path / "dest"), max_unpacked=1 << 20, max_members=10)


def test_archive_member_count_limit(tmp_path: Path) -> None:
    archive = build_archive(tmp_path / "many.tar.gz", [(f"f{index}", {}) for index in range(5)])

    with pytest.raises(ArchiveError, match="has more than 3 members"):
        extract_archive(str(archive), str(tmp_path / "dest"), max_members=3)


def test_archive_refuses_a_file_that_is_not_a_tar_gz(tmp_path: Path) -> None:
    archive = tmp_path / "plain.tar.gz"
    archive.write_bytes(b"not gzip at all")

    with pytest.raises(ArchiveError, match=r"is not a valid \.tar\.gz"):
        extract_archive(str(archive), str(tmp_path / "dest"))
    assert not (tmp_path / "dest").exists()


def test_archive_unpacks_a_good_package(tmp_path: Path) -> None:
    archive = build_archive(
        tmp_path / "good.tar.gz",
        [
            ("./", {"type": tarfile.DIRTYPE, "mode": 0o755}),
            ("bin", {"type": tarfile.DIRTYPE, "mode": 0o555}),
            ("bin/tool", {"data": b"#!/bin/sh\n", "mode": 0o777, "uid": 4242, "gid": 4242}),
            ("bin/alias", {"type": HARDLINK, "linkname": "bin/tool"}),
            ("lib/deep/file.txt", {"data": b"data"}),
            ("current-tool", {"type": SYMLINK, "linkname": "bin/tool"}),
            ("lib/deep/up", {"type": SYMLINK, "linkname": "../../bin"}),
        ],
    )
    dest = tmp_path / "dest"

    assert extract_archive(str(archive), str(dest)) == 7

    tool = dest / "bin/tool"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o755
    assert tool.stat().st_uid == os.getuid()
    assert (dest / "bin/alias").stat().st_ino == tool.stat().st_ino
    assert stat.S_IMODE((dest / "bin").stat().st_mode) == 0o755
    assert os.readlink(dest / "current-tool") == "bin/tool"
    assert (dest / "lib/deep/up/tool").read_bytes() == b"#!/bin/sh\n"
    assert (dest / "lib/deep/file.txt").read_bytes() == b"data"
