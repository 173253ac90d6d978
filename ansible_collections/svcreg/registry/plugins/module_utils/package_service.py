# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""Starting, stopping and health-checking the releases of one service on the target host.

Used by the ``package`` module, standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from typing import IO, Any

from ansible.module_utils.common.parameters import remove_values

from ansible_collections.svcreg.registry.plugins.module_utils.package_release import DeployError, Layout

__all__ = ["ScriptResult", "Service", "run_program", "script_failure"]

PROBE_TIMEOUT = 3.0
OUTPUT_LIMIT = 64 * 1024


class ScriptResult:
    def __init__(self, rc: int | None, stdout: str, stderr: str, timed_out: bool = False) -> None:
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def as_dict(self) -> dict[str, Any]:
        return {"rc": self.rc, "stdout": self.stdout, "stderr": self.stderr}


def _read_tail(stream: IO[bytes]) -> str:
    size = stream.seek(0, os.SEEK_END)
    stream.seek(max(0, size - OUTPUT_LIMIT))
    return stream.read(OUTPUT_LIMIT).decode("utf-8", "replace")


def run_program(argv: list[str], cwd: str, env: dict[str, str], timeout: float) -> ScriptResult:
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
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc, timed_out = None, True
        return ScriptResult(rc, _read_tail(stdout), _read_tail(stderr), timed_out)


class Service:
    """Starting, stopping and checking the releases of one service."""

    def __init__(self, module: Any, layout: Layout) -> None:
        self.module = module
        self.layout = layout
        self.script_timeout = module.params["script_timeout"]
        self.health_timeout = module.params["health_timeout"]

    def warn(self, message: str) -> None:
        # Warnings are not masked like the rest of the result (ansible-core 2.19 sends them as objects).
        self.module.warn(remove_values(message, self.module.no_log_values))

    def environment(self, version: str, env: dict[str, str]) -> dict[str, str]:
        environ = dict(os.environ)
        environ.update(env)
        environ.update(
            SVCREG_NAME=self.layout.name,
            SVCREG_VERSION=version,
            SVCREG_RELEASE_DIR=self.layout.release_dir(version),
            SVCREG_SHARED_DIR=self.layout.shared,
        )
        return environ

    def executable(self, directory: str, relative: str, what: str) -> str:
        """The absolute path of a script of the release in ``directory``; fails unless it is an executable file."""
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

    def health_argv(self, directory: str, command: str) -> list[str]:
        argv = shlex.split(command)
        if "/" in argv[0] and not argv[0].startswith("/"):
            argv[0] = self.executable(directory, argv[0], "health command")
        return argv

    def preflight(self, directory: str, manifest: dict[str, Any]) -> None:
        """Fail before anything is stopped if the new release's scripts cannot run."""
        self.executable(directory, manifest["start"], "start script")
        self.executable(directory, manifest["stop"], "stop script")
        if manifest["health"] and "command" in manifest["health"]:
            self.health_argv(directory, manifest["health"]["command"])

    def start(self, version: str, manifest: dict[str, Any], env: dict[str, str]) -> ScriptResult:
        directory = self.layout.release_dir(version)
        try:
            script = self.executable(directory, manifest["start"], "start script")
        except DeployError as error:
            return ScriptResult(None, "", error.msg)
        return run_program([script], directory, self.environment(version, env), self.script_timeout)

    def stop(self, version: str, env: dict[str, str]) -> None:
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
                % (
                    manifest["stop"],
                    self.layout.name,
                    version,
                    script_failure(result, self.script_timeout),
                    result.stderr,
                )
            )

    def probe(
        self, version: str, health: dict[str, Any], env: dict[str, str], timeout: float
    ) -> tuple[bool, str, ScriptResult | None]:
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

    def health_check(
        self, version: str, manifest: dict[str, Any], env: dict[str, str], quick: bool = False
    ) -> tuple[bool | None, str, ScriptResult | None]:
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

    def start_and_check(
        self, version: str, manifest: dict[str, Any], env: dict[str, str]
    ) -> tuple[ScriptResult, dict[str, Any] | None, str | None, ScriptResult | None]:
        """Start the release and check its health.

        Returns:
            (start result, health dict or None, failure message or None, the failed script's result or None).
        """
        started = self.start(version, manifest, env)
        if not started.ok:
            failure = "start script %s of %s %s %s" % (
                manifest["start"],
                self.layout.name,
                version,
                script_failure(started, self.script_timeout),
            )
            return started, None, failure, started
        ok, detail, failed = self.health_check(version, manifest, env)
        health = {"ok": ok, "detail": detail}
        if ok is False:
            return (
                started,
                health,
                "health check of %s %s failed: %s" % (self.layout.name, version, detail),
                failed or started,
            )
        return started, health, None, None


def script_failure(result: ScriptResult, timeout: float) -> str:
    if result.timed_out:
        return "did not finish within %s s and was killed" % timeout
    if result.rc is None:
        return "could not run: %s" % result.stderr
    return "exited with %d" % result.rc
