#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)

from __future__ import annotations

DOCUMENTATION = r"""
module: package
short_description: Deploy, roll back or remove a service package on the target host
version_added: 0.1.0
description:
  - Installs a svcreg service package (C(NAME-VERSION.tar.gz) with a C(manifest.yaml) and start/stop scripts)
    under O(install_base)C(/NAME), in the layout made popular by ansistrano
    (C(releases/VERSION), C(shared/), a C(current) symlink switched atomically), starts it, checks its
    health and, when that fails, goes back to the previous good release.
  - Reads the installed state first and does nothing when the wanted release is current, its checksum and
    environment are the same and its health check passes, so a second identical run reports C(changed=false)
    and does not restart the service.
  - Runs on the target host with the Python standard library only. The action plugin of the same name
    validates the package on the controller, computes its checksum, copies it
    to the target unless the cached copy there already has that checksum, and passes O(src), O(checksum) and
    O(manifest); call the module through it rather than directly.
  - The tarball is checked again on the target before it is unpacked (its checksum, then each member; no
    absolute paths, no C(..), no devices, FIFOs, setuid or setgid bits, no links leading outside the package
    or through another symlink, a size and member count limit).
  - Runs of the module for the same service wait for each other (a lock file in the service directory).
  - "Layout: C(releases/VERSION/) holds the unpacked package and its C(.svcreg-release.json) (version,
    checksum, status V(good), V(failed) or V(pending), deployment time, manifest); C(shared/env) (mode
    C(0600)) has one C(export NAME='value') line per environment variable; C(packages/) caches the verified
    tarballs; C(.svcreg-history.json) lists the versions that became current, oldest first."
  - Scripts run directly (they must be executable) in the release directory with the environment of the
    module plus the manifest's defaults, O(env), and C(SVCREG_NAME), C(SVCREG_VERSION), C(SVCREG_RELEASE_DIR)
    and C(SVCREG_SHARED_DIR); their standard input is C(/dev/null) and their output goes to temporary files,
    so a daemon they start may keep its inherited output open. A start script that outlives O(script_timeout)
    is killed with its process group.
author:
  - svcreg maintainers (@svcreg)
options:
  name:
    description:
      - The service (package) name; also the directory under O(install_base).
    type: str
    required: true
  version:
    description:
      - The version to deploy. Required when O(state=present), unless O(rollback=true).
    type: str
  state:
    description:
      - V(present) deploys O(version) (or rolls back, with O(rollback=true)).
      - V(absent) stops the current release and removes O(install_base)C(/NAME) entirely.
    type: str
    default: present
    choices: [present, absent]
  rollback:
    description:
      - Go back to the most recent good release before the current one in the history, start it and
        remove the release rolled back from. Fails when there is none.
    type: bool
    default: false
  install_base:
    description:
      - The directory that holds one directory per service.
    type: path
    default: /opt
  src:
    description:
      - The path on the target of the C(NAME-VERSION.tar.gz) tarball; it may be the cached copy in
        C(packages/).
      - Needed when the release is not installed yet with O(checksum) (and not in check mode). When it is
        not given, the cached copy is used if there is one.
    type: path
  checksum:
    description:
      - The sha256 (hex) of the tarball; O(src) must have it before anything is unpacked.
      - Required when O(state=present), unless O(rollback=true).
    type: str
  manifest:
    description:
      - The package's manifest, validated by the controller, as a dictionary with the keys C(name), C(version)
        (both must equal O(name) and O(version)), C(description), C(endpoints), C(health), C(env), C(start)
        and C(stop).
      - C(start) and C(stop) are script paths relative to the release directory.
      - C(health) is null, C({tcp, host, timeout, interval}) (a TCP connection to C(host:tcp) must succeed)
        or C({command, timeout, interval}) (the command, run in the release directory, must exit 0).
      - C(env) maps variable names to default values; a null default makes the variable required in O(env).
      - Required when O(state=present), unless O(rollback=true).
    type: dict
  env:
    description:
      - Environment variables for the service, on top of the manifest's defaults; written to C(shared/env)
        and passed to the scripts. Values never appear in the module's output.
    type: dict
    default: {}
  keep_releases:
    description:
      - How many good releases to keep besides the current one; older ones and failed ones are removed after
        a successful deployment, with their cached tarballs.
    type: int
    default: 5
  force:
    description:
      - Unpack, restart and health-check the release even when nothing changed, and replace an installed
        release of the same version whose checksum differs.
    type: bool
    default: false
  script_timeout:
    description:
      - Seconds a start or stop script may run before it is killed.
    type: int
    default: 60
  health_timeout:
    description:
      - Seconds to wait for the health check to pass after the start script; overrides the manifest's
        C(health.timeout) (30 when the manifest has none).
    type: float
attributes:
  check_mode:
    support: full
    description: Predicts the action without writing anything or running any script (a TCP health check is probed).
  diff_mode:
    support: none
    description: Reports the action, not a diff.
notes:
  - The service's start script should send its daemon's output to a log file; the module reads the script's
    output only until the script exits.
  - A failed restart of an unchanged release (its health probe failed) keeps that release current; it is
    still the last good one, and the failure may not be the release's fault.
"""

EXAMPLES = r"""
- name: Deploy version 1.4.0 of the API server (through the action plugin, which copies the package)
  svcreg.registry.package:
    name: api-server
    version: 1.4.0
    src: dist/api-server-1.4.0.tar.gz
    env:
      DATABASE_URL: "{{ vault_database_url }}"
    keep_releases: 3

- name: Go back to the previous good release
  svcreg.registry.package:
    name: api-server
    rollback: true

- name: Stop and remove the service
  svcreg.registry.package:
    name: api-server
    state: absent
"""

RETURN = r"""
action:
  description:
    - What was done (or, in check mode, would be done).
    - V(deployed) a release was unpacked or switched to and started; V(unchanged) nothing to do;
      V(restarted) the release was current but failed its health probe and was restarted;
      V(rolled_back) went back to the previous good release; V(removed) the service was removed;
      V(absent) there was nothing to remove.
  returned: success
  type: str
  sample: deployed
name:
  description: The service name.
  returned: always
  type: str
  sample: api-server
version:
  description: The version that is current after the task (the one rolled back to for O(rollback=true), the
    removed one for O(state=absent)).
  returned: success
  type: str
  sample: 1.4.0
previous_version:
  description: The version that was current before the task, if any.
  returned: always
  type: str
  sample: 1.3.2
release_dir:
  description: The directory of the release in RV(version).
  returned: success
  type: str
  sample: /opt/api-server/releases/1.4.0
checksum:
  description: The sha256 of the release's tarball.
  returned: success
  type: str
  sample: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
health:
  description: The result of the health check, null when nothing was checked.
  returned: always
  type: dict
  contains:
    ok:
      description: Whether the check passed; null when the manifest defines no health check.
      type: bool
    detail:
      description: What was checked and what happened.
      type: str
  sample: {ok: true, detail: "127.0.0.1:8080 accepted a TCP connection after 0.4 s"}
start:
  description: The start script's exit code and output, null when no script ran.
  returned: always
  type: dict
  contains:
    rc:
      description: The exit code, null when the script was killed after O(script_timeout).
      type: int
    stdout:
      description: Its standard output (the last 64 KiB).
      type: str
    stderr:
      description: Its standard error (the last 64 KiB).
      type: str
  sample: {rc: 0, stdout: "api-server 1.4.0 started\n", stderr: ""}
releases:
  description: The installed releases after the task, oldest first (the current one included).
  returned: success
  type: list
  elements: str
  sample: [1.3.1, 1.3.2, 1.4.0]
warnings:
  description: Problems that did not stop the task, for example a failing stop script of the old release.
  returned: when there are any
  type: list
  elements: str
rc:
  description: The exit code of the script that failed (null when it was killed).
  returned: failure of a start script or health check
  type: int
stdout:
  description: The standard output of the script that failed.
  returned: failure of a start script or health check
  type: str
stderr:
  description: The standard error of the script that failed.
  returned: failure of a start script or health check
  type: str
failed_release:
  description: The version that failed to start or to pass its health check.
  returned: failure of a start script or health check
  type: str
rolled_back_to:
  description: The version made current again after the failure, null when there was none.
  returned: failure of a start script or health check
  type: str
rollback_error:
  description: Why starting the release rolled back to failed too, null when it worked.
  returned: failure of a start script or health check
  type: str
"""

import datetime
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.parameters import remove_values
from ansible_collections.svcreg.registry.plugins.module_utils.package_archive import (
    ArchiveError,
    copy_verified,
    extract_archive,
    sha256_file,
)

ARGUMENT_SPEC = {
    "name": {"type": "str", "required": True},
    "version": {"type": "str"},
    "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
    "rollback": {"type": "bool", "default": False},
    "install_base": {"type": "path", "default": "/opt"},
    "src": {"type": "path"},
    "checksum": {"type": "str"},
    "manifest": {"type": "dict"},
    "env": {"type": "dict", "default": {}, "no_log": True},
    "keep_releases": {"type": "int", "default": 5},
    "force": {"type": "bool", "default": False},
    "script_timeout": {"type": "int", "default": 60},
    "health_timeout": {"type": "float"},
}

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+~-]*$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
RELEASE_METADATA = ".svcreg-release.json"
DEFAULT_HEALTH_TIMEOUT = 30.0
DEFAULT_HEALTH_INTERVAL = 1.0
PROBE_TIMEOUT = 3.0
OUTPUT_LIMIT = 64 * 1024
GOOD = "good"
FAILED = "failed"
PENDING = "pending"


class DeployError(Exception):
    """A failure reported with ``fail_json``: ``msg`` names what was wrong, ``details`` are extra result keys."""

    def __init__(self, msg, **details):
        super().__init__(msg)
        self.msg = msg
        self.details = details


class Layout:
    """The paths under ``<install_base>/<name>`` and the small JSON files kept there."""

    def __init__(self, install_base, name):
        self.name = name
        self.base = os.path.join(install_base, name)
        self.releases = os.path.join(self.base, "releases")
        self.shared = os.path.join(self.base, "shared")
        self.env_file = os.path.join(self.shared, "env")
        self.packages = os.path.join(self.base, "packages")
        self.current = os.path.join(self.base, "current")
        self.history_file = os.path.join(self.base, ".svcreg-history.json")
        self.lock_file = os.path.join(self.base, ".lock")

    def release_dir(self, version):
        return os.path.join(self.releases, version)

    def package_path(self, version):
        return os.path.join(self.packages, "%s-%s.tar.gz" % (self.name, version))

    def current_version(self):
        try:
            return os.path.basename(os.readlink(self.current).rstrip("/"))
        except OSError:
            return None

    def read_release(self, version):
        """The release's metadata, or None when it is not installed (or its metadata is unreadable)."""
        try:
            with open(os.path.join(self.release_dir(version), RELEASE_METADATA)) as stream:
                metadata = json.load(stream)
        except (OSError, ValueError):
            return None
        return metadata if isinstance(metadata, dict) else None

    def is_good(self, version):
        metadata = self.read_release(version)
        return metadata is not None and metadata.get("status") == GOOD

    def write_release(self, version, metadata):
        write_atomic(os.path.join(self.release_dir(version), RELEASE_METADATA), json.dumps(metadata, indent=2), 0o644)

    def set_status(self, version, status):
        metadata = self.read_release(version)
        if metadata is not None:
            metadata["status"] = status
            self.write_release(version, metadata)

    def read_history(self):
        try:
            with open(self.history_file) as stream:
                history = json.load(stream)
        except (OSError, ValueError):
            return []
        return [version for version in history if isinstance(version, str)] if isinstance(history, list) else []

    def write_history(self, history):
        write_atomic(self.history_file, json.dumps(history), 0o644)

    def read_env(self):
        try:
            with open(self.env_file) as stream:
                return stream.read()
        except OSError:
            return None

    def installed_versions(self):
        """The release directories, oldest deployment first."""
        try:
            names = [entry for entry in os.listdir(self.releases) if not entry.startswith(".")]
        except OSError:
            return []
        return sorted(names, key=lambda version: ((self.read_release(version) or {}).get("deployed_at") or "", version))

    def switch_current(self, version):
        """Point ``current`` at the release atomically (a new symlink renamed over the old one)."""
        tmp = os.path.join(self.base, ".current.tmp-%d" % os.getpid())
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join("releases", version), tmp)
        os.replace(tmp, self.current)

    def remove_current(self):
        if os.path.lexists(self.current):
            os.unlink(self.current)

    def remove_release(self, version):
        shutil.rmtree(self.release_dir(version), ignore_errors=True)
        package = self.package_path(version)
        if os.path.lexists(package):
            os.unlink(package)


def write_atomic(path, text, mode):
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

    def __init__(self, layout, create):
        self.layout = layout
        self.create = create
        self.fd = None

    def __enter__(self):
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

    def __exit__(self, *exc_info):
        if self.fd is not None:
            os.close(self.fd)


class ScriptResult:
    def __init__(self, rc, stdout, stderr, timed_out=False):
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out

    @property
    def ok(self):
        return self.rc == 0

    def as_dict(self):
        return {"rc": self.rc, "stdout": self.stdout, "stderr": self.stderr}


def _read_tail(stream):
    size = stream.seek(0, os.SEEK_END)
    stream.seek(max(0, size - OUTPUT_LIMIT))
    return stream.read(OUTPUT_LIMIT).decode("utf-8", "replace")


def run_program(argv, cwd, env, timeout):
    """Run ``argv`` in its own session, output to temporary files; kill its process group after ``timeout``.

    Pipes would not do: a daemon started by a start script inherits them, and reading a pipe until its end
    would then wait for the daemon to exit.
    """
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        try:
            process = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True
            )
        except OSError as error:
            return ScriptResult(None, "", "cannot run %s: %s" % (argv[0], error))
        try:
            rc = process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
            rc, timed_out = None, True
        return ScriptResult(rc, _read_tail(stdout), _read_tail(stderr), timed_out)


def relative_path(value, what):
    """A path inside the release: relative, without ``..``."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise DeployError("%s must be a non-empty path, got %r" % (what, value))
    if value.startswith("/") or ".." in value.split("/"):
        raise DeployError("%s %r must be a path inside the package (relative, without '..')" % (what, value))
    return value


def positive_number(value, default, what):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise DeployError("%s must be a positive number, got %r" % (what, value))
    return float(value)


def checked_manifest(manifest, name, version):
    """The manifest's fields the module uses, after checking them (the controller checked them already)."""
    for field, wanted in (("name", name), ("version", version)):
        if manifest.get(field) != wanted:
            raise DeployError("manifest %s %r does not match %s %r" % (field, manifest.get(field), field, wanted))
    health = manifest.get("health")
    if health is not None:
        if not isinstance(health, dict) or ("tcp" in health) == ("command" in health):
            raise DeployError("manifest health must be null or have either 'tcp' or 'command', got %r" % (health,))
        checked = {
            "timeout": positive_number(health.get("timeout"), DEFAULT_HEALTH_TIMEOUT, "manifest health.timeout"),
            "interval": positive_number(health.get("interval"), DEFAULT_HEALTH_INTERVAL, "manifest health.interval"),
        }
        if "tcp" in health:
            port = health["tcp"]
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise DeployError("manifest health.tcp must be a port number, got %r" % (port,))
            checked.update(tcp=port, host=str(health.get("host") or "127.0.0.1"))
        else:
            if not isinstance(health["command"], str) or not shlex.split(health["command"]):
                raise DeployError("manifest health.command must be a command line, got %r" % (health["command"],))
            checked["command"] = health["command"]
        health = checked
    defaults = manifest.get("env") or {}
    if not isinstance(defaults, dict):
        raise DeployError("manifest env must be a mapping, got %r" % (defaults,))
    for key, value in defaults.items():
        if not ENV_NAME_PATTERN.match(str(key)) or not (value is None or isinstance(value, str)):
            raise DeployError("manifest env %r: the name must be a variable name and the default a string or null" % key)
    return {
        "name": name,
        "version": version,
        "start": relative_path(manifest.get("start"), "manifest start"),
        "stop": relative_path(manifest.get("stop"), "manifest stop"),
        "health": health,
        "env": defaults,
    }


def wanted_env(manifest, values):
    """The manifest's defaults overridden by ``values``; fails naming every required variable without a value."""
    for key, value in values.items():
        if not ENV_NAME_PATTERN.match(key) or key.startswith("SVCREG_"):
            raise DeployError("env: %r is not a valid environment variable name (SVCREG_* are reserved)" % key)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DeployError("env: the value of %s must be a string or a number" % key)
    env = {key: value for key, value in manifest["env"].items() if value is not None}
    env.update((key, str(value)) for key, value in values.items())
    missing = sorted(key for key, value in manifest["env"].items() if value is None and key not in env)
    if missing:
        raise DeployError(
            "%s %s needs environment variables without a default: %s; pass them in env"
            % (manifest["name"], manifest["version"], ", ".join(missing))
        )
    return env


def env_file_text(env):
    lines = ["# Written by svcreg.registry.package; changes are overwritten by the next deployment.\n"]
    lines.extend("export %s=%s\n" % (key, shlex.quote(env[key])) for key in sorted(env))
    return "".join(lines)


def parse_env_file(text):
    """The variables of an env file as written by :func:`env_file_text` (``{}`` when it cannot be parsed)."""
    try:
        words = shlex.split(text or "", comments=True)
    except ValueError:
        return {}
    return dict(word.split("=", 1) for word in words if "=" in word)


class Service:
    """Starting, stopping and checking the releases of one service."""

    def __init__(self, module, layout):
        self.module = module
        self.layout = layout
        self.script_timeout = module.params["script_timeout"]
        self.health_timeout = module.params["health_timeout"]

    def warn(self, message):
        # Warnings are not masked like the rest of the result (ansible-core 2.19 sends them as objects).
        self.module.warn(remove_values(message, self.module.no_log_values))

    def environment(self, version, env):
        environ = dict(os.environ)
        environ.update(env)
        environ.update(
            SVCREG_NAME=self.layout.name,
            SVCREG_VERSION=version,
            SVCREG_RELEASE_DIR=self.layout.release_dir(version),
            SVCREG_SHARED_DIR=self.layout.shared,
        )
        return environ

    def executable(self, directory, relative, what):
        """The absolute path of a script of the release in ``directory``; fails unless it is an executable file there."""
        path = os.path.join(directory, relative)
        real_dir = os.path.realpath(directory)
        if os.path.commonpath([os.path.realpath(path), real_dir]) != real_dir:
            raise DeployError("%s %s of %s resolves outside %s" % (what, relative, self.layout.name, directory))
        try:
            mode = os.stat(path).st_mode
        except OSError as error:
            raise DeployError("%s %s is missing in %s: %s" % (what, relative, directory, error.strerror)) from None
        if not os.path.isfile(path):
            raise DeployError("%s %s in %s is not a regular file" % (what, relative, directory))
        if not mode & 0o111:
            raise DeployError("%s %s in %s is not executable (mode %04o)" % (what, relative, directory, mode & 0o7777))
        return path

    def health_argv(self, directory, command):
        argv = shlex.split(command)
        if "/" in argv[0] and not argv[0].startswith("/"):
            argv[0] = self.executable(directory, argv[0], "health command")
        return argv

    def preflight(self, directory, manifest):
        """Fail before anything is stopped if the new release's scripts cannot run."""
        self.executable(directory, manifest["start"], "start script")
        self.executable(directory, manifest["stop"], "stop script")
        if manifest["health"] and "command" in manifest["health"]:
            self.health_argv(directory, manifest["health"]["command"])

    def start(self, version, manifest, env):
        directory = self.layout.release_dir(version)
        try:
            script = self.executable(directory, manifest["start"], "start script")
        except DeployError as error:
            return ScriptResult(None, "", error.msg)
        return run_program([script], directory, self.environment(version, env), self.script_timeout)

    def stop(self, version, env):
        """Run the release's stop script; a failure is a warning, never fatal."""
        metadata = self.layout.read_release(version)
        manifest = (metadata or {}).get("manifest")
        if not manifest:
            self.warn("cannot stop %s %s: its release metadata is missing" % (self.layout.name, version))
            return
        directory = self.layout.release_dir(version)
        try:
            script = self.executable(directory, manifest["stop"], "stop script")
        except DeployError as error:
            self.warn("cannot stop %s %s: %s" % (self.layout.name, version, error.msg))
            return
        result = run_program([script], directory, self.environment(version, env), self.script_timeout)
        if not result.ok:
            self.warn(
                "stop script %s of %s %s %s; stderr: %s"
                % (manifest["stop"], self.layout.name, version, script_failure(result, self.script_timeout), result.stderr)
            )

    def probe(self, version, health, env, timeout):
        """Probe the release's health once; return (ok, what happened, the failed command's result or None)."""
        if "tcp" in health:
            address = "%s:%d" % (health["host"], health["tcp"])
            try:
                socket.create_connection((health["host"], health["tcp"]), timeout=timeout).close()
            except OSError as error:
                return False, "no TCP connection to %s (%s)" % (address, error), None
            return True, "%s accepted a TCP connection" % address, None
        directory = self.layout.release_dir(version)
        try:
            argv = self.health_argv(directory, health["command"])
        except DeployError as error:
            return False, error.msg, None
        result = run_program(argv, directory, self.environment(version, env), timeout)
        if result.ok:
            return True, "%s exited 0" % health["command"], None
        return False, "%s %s" % (health["command"], script_failure(result, timeout)), result

    def health_check(self, version, manifest, env, quick=False):
        """Probe until the health check passes or times out (once, shortly, when ``quick``).

        Returns:
            (ok, detail, the failed command's result or None); ok is None when there is no health check.
        """
        health = manifest["health"]
        if not health:
            return None, "the manifest defines no health check", None
        timeout = self.health_timeout or health["timeout"]
        began = time.monotonic()
        deadline = began + (min(timeout, PROBE_TIMEOUT) if quick else timeout)
        while True:
            ok, detail, result = self.probe(version, health, env, max(deadline - time.monotonic(), 0.1))
            left = deadline - time.monotonic()
            if ok or quick or left <= 0:
                return ok, "%s after %.1f s" % (detail, time.monotonic() - began), result
            time.sleep(min(health["interval"], left))

    def start_and_check(self, version, manifest, env):
        """Start the release and check its health.

        Returns:
            (start result, health dict or None, failure message or None, the failed script's result or None).
        """
        started = self.start(version, manifest, env)
        if not started.ok:
            failure = "start script %s of %s %s %s" % (
                manifest["start"], self.layout.name, version, script_failure(started, self.script_timeout))
            return started, None, failure, started
        ok, detail, failed = self.health_check(version, manifest, env)
        health = {"ok": ok, "detail": detail}
        if ok is False:
            return started, health, "health check of %s %s failed: %s" % (self.layout.name, version, detail), failed or started
        return started, health, None, None


def script_failure(result, timeout):
    if result.timed_out:
        return "did not finish within %s s and was killed" % timeout
    if result.rc is None:
        return "could not run: %s" % result.stderr
    return "exited with %d" % result.rc


class Deployment:
    """One run of the module for state=present, rollback or absent, under the service's lock."""

    def __init__(self, module):
        self.module = module
        self.params = module.params
        self.check_mode = module.check_mode
        self.name = self.params["name"]
        self.layout = Layout(self.params["install_base"], self.name)
        self.service = Service(module, self.layout)

    def result(self, changed, action, version, previous, **extra):
        layout = self.layout
        metadata = layout.read_release(version) if version else None
        result = {
            "changed": changed,
            "action": action,
            "name": self.name,
            "version": version,
            "previous_version": previous,
            "release_dir": layout.release_dir(version) if version else None,
            "checksum": (metadata or {}).get("checksum"),
            "health": None,
            "start": None,
            "releases": layout.installed_versions(),
        }
        result.update(extra)
        return result

    # state=present

    def present(self):
        params = self.params
        version = params["version"]
        checksum = params["checksum"].lower()
        if not SHA256_PATTERN.match(checksum):
            raise DeployError("checksum must be a sha256 hex digest (64 hex digits), got %r" % params["checksum"])
        manifest = checked_manifest(params["manifest"], self.name, version)
        env = wanted_env(manifest, params["env"])
        env_text = env_file_text(env)
        layout = self.layout
        with DirectoryLock(layout, create=not self.check_mode):
            current = layout.current_version()
            metadata = layout.read_release(version)
            installed_good = metadata is not None and metadata.get("status") == GOOD
            same_package = installed_good and metadata.get("checksum") == checksum
            if installed_good and not same_package and not params["force"]:
                raise DeployError(
                    "%s version %s is installed with a different checksum (%s); bump the version or use force"
                    % (self.name, version, metadata.get("checksum"))
                )
            old_env_text = layout.read_env()
            if same_package and current == version and old_env_text == env_text and not params["force"]:
                return self.keep_running(version, manifest, env)
            if self.check_mode:
                return self.result(True, "deployed", version, current, checksum=checksum)
            reuse = same_package and not params["force"]
            return self.deploy(version, checksum, manifest, env, env_text, current, old_env_text, reuse)

    def keep_running(self, version, manifest, env):
        """The release is current and unchanged: probe it once, restart it if the probe fails."""
        service = self.service
        if self.check_mode and manifest["health"] and "command" in manifest["health"]:
            health = {"ok": None, "detail": "the health command is not run in check mode"}
            return self.result(False, "unchanged", version, version, health=health)
        ok, detail = service.health_check(version, manifest, env, quick=True)[:2]
        if ok is not False:
            return self.result(False, "unchanged", version, version, health={"ok": ok, "detail": detail})
        if self.check_mode:
            return self.result(True, "restarted", version, version, health={"ok": ok, "detail": detail})
        service.stop(version, env)
        started, health, failure, failed = service.start_and_check(version, manifest, env)
        if failure:
            service.stop(version, env)
            raise DeployError(
                "%s (restarting it after a failed health probe: %s); %s %s stays current"
                % (failure, detail, self.name, version),
                **self.failure_details(version, version, started, health, failed, None, None),
            )
        return self.result(True, "restarted", version, version, health=health, start=started.as_dict())

    def deploy(self, version, checksum, manifest, env, env_text, current, old_env_text, reuse):
        layout = self.layout
        for directory in (layout.releases, layout.packages):
            os.makedirs(directory, mode=0o755, exist_ok=True)
        os.makedirs(layout.shared, mode=0o700, exist_ok=True)
        os.chmod(layout.shared, 0o700)
        fallback = self.previous_good(version, current)
        unpacked = None
        try:
            if reuse:
                self.service.preflight(layout.release_dir(version), manifest)
            else:
                unpacked = self.unpack(version, checksum)
                self.service.preflight(unpacked, manifest)
            if old_env_text != env_text:
                write_atomic(layout.env_file, env_text, 0o600)
            if current is not None:
                self.service.stop(current, parse_env_file(old_env_text))
            if unpacked is not None:
                self.replace_release(version, unpacked)
                unpacked = None
        finally:
            if unpacked is not None:
                shutil.rmtree(unpacked, ignore_errors=True)
        layout.write_release(version, {
            "version": version,
            "checksum": checksum,
            "status": PENDING,
            "deployed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
            "manifest": manifest,
        })
        layout.switch_current(version)
        started, health = self.activate(version, manifest, env, current, fallback, old_env_text)
        layout.set_status(version, GOOD)
        history = [entry for entry in layout.read_history() if entry != version]
        layout.write_history(history + [version])
        self.prune(version)
        return self.result(True, "deployed", version, current, health=health, start=started.as_dict())

    def previous_good(self, version, current):
        """The release to go back to if ``version`` fails: the current one if good, else the latest good in history."""
        for candidate in [current] + self.layout.read_history()[::-1]:
            if candidate and candidate != version and self.layout.is_good(candidate):
                return candidate
        return None

    def unpack(self, version, checksum):
        """Verify and cache the tarball, then unpack it into a temporary directory under releases/."""
        layout = self.layout
        cached = layout.package_path(version)
        src = self.params["src"]
        if src is None and not os.path.exists(cached):
            raise DeployError(
                "src is required: %s %s is not installed with checksum %s and %s is not cached"
                % (self.name, version, checksum, cached)
            )
        try:
            if src is None or (os.path.exists(cached) and os.path.samefile(src, cached)):
                actual = sha256_file(cached)
                if actual != checksum:
                    raise DeployError(
                        "checksum mismatch for %s: expected sha256 %s, got %s" % (cached, checksum, actual)
                    )
            else:
                copy_verified(src, cached, checksum)
        except ArchiveError as error:
            raise DeployError(str(error)) from None
        except OSError as error:
            raise DeployError("cannot read the package %s: %s" % (error.filename or src, error.strerror)) from None
        tmp = os.path.join(layout.releases, ".tmp-%s-%d" % (version, os.getpid()))
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            extract_archive(cached, tmp)
        except ArchiveError as error:
            os.unlink(cached)
            raise DeployError("package %s refused: %s" % (cached, error)) from None
        return tmp

    def replace_release(self, version, unpacked):
        """Move the unpacked release into place, replacing a failed (or, with force, any) one of that version."""
        target = self.layout.release_dir(version)
        if os.path.lexists(target):
            old = os.path.join(self.layout.releases, ".old-%s-%d" % (version, os.getpid()))
            os.rename(target, old)
            os.rename(unpacked, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(unpacked, target)

    def activate(self, version, manifest, env, previous, fallback, fallback_env_text):
        """Start the (already current) release; on failure go back to ``fallback`` and raise DeployError."""
        layout, service = self.layout, self.service
        started, health, failure, failed = service.start_and_check(version, manifest, env)
        if failure is None:
            return started, health
        layout.set_status(version, FAILED)
        service.stop(version, env)
        rollback_error = None
        if fallback is None:
            layout.remove_current()
            failure += "; there is no previous good release to go back to, so %s has no current release" % self.name
        else:
            if fallback_env_text is not None and fallback_env_text != layout.read_env():
                write_atomic(layout.env_file, fallback_env_text, 0o600)
            fallback_env = parse_env_file(layout.read_env())
            fallback_manifest = layout.read_release(fallback)["manifest"]
            layout.switch_current(fallback)
            rollback_error = service.start_and_check(fallback, fallback_manifest, fallback_env)[2]
            if rollback_error is None:
                failure += "; %s %s is current again" % (self.name, fallback)
            else:
                failure += "; %s %s is current again but failed too: %s" % (self.name, fallback, rollback_error)
        raise DeployError(failure, **self.failure_details(
            version, previous, started, health, failed, fallback, rollback_error))

    def failure_details(self, version, previous, started, health, failed, rolled_back_to, rollback_error):
        return {
            "name": self.name,
            "version": version,
            "previous_version": previous,
            "rc": failed.rc if failed else None,
            "stdout": failed.stdout if failed else "",
            "stderr": failed.stderr if failed else "",
            "start": started.as_dict(),
            "health": health,
            "failed_release": version,
            "rolled_back_to": rolled_back_to,
            "rollback_error": rollback_error,
        }

    def prune(self, current):
        """Remove failed releases and the good ones beyond keep_releases (oldest first), with their tarballs."""
        layout = self.layout
        for entry in os.listdir(layout.releases):
            if entry.startswith("."):
                shutil.rmtree(os.path.join(layout.releases, entry), ignore_errors=True)
        good = []
        for version in layout.installed_versions():
            if version == current:
                continue
            if layout.is_good(version):
                good.append(version)
            else:
                layout.remove_release(version)
        for version in good[: max(len(good) - self.params["keep_releases"], 0)]:
            layout.remove_release(version)
        kept = set(layout.installed_versions())
        for entry in os.listdir(layout.packages):
            if entry not in {os.path.basename(layout.package_path(version)) for version in kept}:
                os.unlink(os.path.join(layout.packages, entry))
        layout.write_history([version for version in layout.read_history() if version in kept])

    # rollback: true

    def rollback(self):
        layout = self.layout
        with DirectoryLock(layout, create=not self.check_mode):
            current = layout.current_version()
            if current is None:
                raise DeployError("%s has no current release to roll back from (%s)" % (self.name, layout.current))
            history = layout.read_history()
            target = next((v for v in reversed(history) if v != current and layout.is_good(v)), None)
            if target is None:
                raise DeployError(
                    "%s has no good release before %s to roll back to (history: %s)"
                    % (self.name, current, ", ".join(history) or "empty")
                )
            if self.check_mode:
                return self.result(True, "rolled_back", target, current)
            env = parse_env_file(layout.read_env())
            self.service.stop(current, env)
            layout.switch_current(target)
            fallback = current if (layout.read_release(current) or {}).get("manifest") else None
            started, health = self.activate(target, layout.read_release(target)["manifest"], env, current, fallback, None)
            layout.remove_release(current)
            layout.write_history([v for v in history if v not in (current, target)] + [target])
            return self.result(True, "rolled_back", target, current, health=health, start=started.as_dict())

    # state=absent

    def absent(self):
        layout = self.layout
        if not os.path.lexists(layout.base):
            return self.result(False, "absent", None, None)
        with DirectoryLock(layout, create=not self.check_mode):
            current = layout.current_version()
            if self.check_mode:
                return self.result(True, "removed", current, current)
            result = self.result(True, "removed", current, current)
            if current is not None:
                self.service.stop(current, parse_env_file(layout.read_env()))
            shutil.rmtree(layout.base)
            result["releases"] = []
            return result


def check_params(params):
    if not NAME_PATTERN.match(params["name"]):
        raise DeployError("name %r must be letters, digits, '.', '_' and '-', starting with a letter or digit" % params["name"])
    if params["state"] == "absent":
        if params["rollback"]:
            raise DeployError("rollback=true needs state=present")
        return
    if params["keep_releases"] < 1:
        raise DeployError("keep_releases must be at least 1, got %d" % params["keep_releases"])
    if params["script_timeout"] < 1:
        raise DeployError("script_timeout must be at least 1 second, got %d" % params["script_timeout"])
    if params["health_timeout"] is not None and params["health_timeout"] <= 0:
        raise DeployError("health_timeout must be positive, got %s" % params["health_timeout"])
    if params["rollback"]:
        return
    missing = [option for option in ("version", "checksum", "manifest") if params[option] is None]
    if missing:
        raise DeployError("state=present needs %s (unless rollback=true)" % ", ".join(missing))
    if not VERSION_PATTERN.match(params["version"]):
        raise DeployError(
            "version %r must be letters, digits, '.', '_', '+', '~' and '-', starting with a letter or digit"
            % params["version"]
        )


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    try:
        check_params(module.params)
        deployment = Deployment(module)
        if module.params["state"] == "absent":
            result = deployment.absent()
        elif module.params["rollback"]:
            result = deployment.rollback()
        else:
            result = deployment.present()
    except DeployError as error:
        module.fail_json(msg=error.msg, **error.details)
    except OSError as error:
        module.fail_json(msg="%s: %s" % (error.filename or "svcreg.registry.package", error.strerror or error))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
