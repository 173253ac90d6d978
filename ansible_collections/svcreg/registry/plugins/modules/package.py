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
      - 1-63 lowercase letters, digits and C(-), starting and ending with a letter or digit (a service name in
        the registry).
    type: str
    required: true
  version:
    description:
      - The version to deploy. Required when O(state=present), unless O(rollback=true).
      - 1-64 letters, digits and C(.), C(_), C(+), C(~), C(-), starting with a letter or digit.
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
import os
import re
import shutil
from typing import Any

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.svcreg.registry.plugins.module_utils.package_archive import (
    ArchiveError,
    copy_verified,
    extract_archive,
    sha256_file,
)
from ansible_collections.svcreg.registry.plugins.module_utils.package_format import (
    PACKAGE_ARGUMENT_SPEC,
    PackageRuleError,
    name_problem,
    resolve_env,
    version_problem,
)
from ansible_collections.svcreg.registry.plugins.module_utils.package_release import (
    FAILED,
    GOOD,
    PENDING,
    DeployError,
    DirectoryLock,
    Layout,
    env_file_text,
    parse_env_file,
    write_atomic,
)
from ansible_collections.svcreg.registry.plugins.module_utils.package_service import ScriptResult, Service

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# What a manifest validated by the controller (registry.package.Manifest.to_dict()) always has; a direct
# call of the module may leave these out.
MANIFEST_DEFAULTS = {"start": "scripts/start.sh", "stop": "scripts/stop.sh", "health": None, "env": {}}
HEALTH_DEFAULTS = {"host": "127.0.0.1", "timeout": 30.0, "interval": 0.5}


def release_manifest(manifest: dict[str, Any], name: str, version: str) -> dict[str, Any]:
    """The manifest the action plugin validated on the controller (registry.package.Manifest), for this release.

    Its fields are not checked again here; only that it is this release's.
    """
    for field, wanted in (("name", name), ("version", version)):
        if manifest.get(field) != wanted:
            raise DeployError("manifest %s %r does not match %s %r" % (field, manifest.get(field), field, wanted))
    release = dict(MANIFEST_DEFAULTS, **manifest)
    if release["health"]:
        release["health"] = dict(HEALTH_DEFAULTS, **release["health"])
    release["env"] = release["env"] or {}
    return release


def wanted_env(manifest: dict[str, Any], values: dict[str, Any]) -> dict[str, str]:
    """The manifest's defaults overridden by ``values``; names not in the manifest are passed on too."""
    package = "%s %s" % (manifest["name"], manifest["version"])
    try:
        return resolve_env(package, manifest["env"], values, declared_only=False)
    except PackageRuleError as error:
        raise DeployError(error.message) from None


class Deployment:
    """One run of the module for state=present, rollback or absent, under the service's lock."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.check_mode = module.check_mode
        self.name = self.params["name"]
        self.layout = Layout(self.params["install_base"], self.name)
        self.service = Service(module, self.layout)

    def result(
        self, changed: bool, action: str, version: str | None, previous: str | None, **extra: Any
    ) -> dict[str, Any]:
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

    def present(self) -> dict[str, Any]:
        params = self.params
        version = params["version"]
        checksum = params["checksum"].lower()
        if not SHA256_PATTERN.match(checksum):
            raise DeployError("checksum must be a sha256 hex digest (64 hex digits), got %r" % params["checksum"])
        manifest = release_manifest(params["manifest"], self.name, version)
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

    def keep_running(self, version: str, manifest: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
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

    def deploy(
        self,
        version: str,
        checksum: str,
        manifest: dict[str, Any],
        env: dict[str, str],
        env_text: str,
        current: str | None,
        old_env_text: str | None,
        reuse: bool,
    ) -> dict[str, Any]:
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
        layout.write_release(
            version,
            {
                "version": version,
                "checksum": checksum,
                "status": PENDING,
                "deployed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
                "manifest": manifest,
            },
        )
        layout.switch_current(version)
        started, health = self.activate(version, manifest, env, current, fallback, old_env_text)
        layout.set_status(version, GOOD)
        history = [entry for entry in layout.read_history() if entry != version]
        layout.write_history([*history, version])
        self.prune(version)
        return self.result(True, "deployed", version, current, health=health, start=started.as_dict())

    def previous_good(self, version: str, current: str | None) -> str | None:
        """The release to go back to if ``version`` fails: the current one if good, else the latest good in history."""
        for candidate in [current, *self.layout.read_history()[::-1]]:
            if candidate and candidate != version and self.layout.is_good(candidate):
                return candidate
        return None

    def unpack(self, version: str, checksum: str) -> str:
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

    def replace_release(self, version: str, unpacked: str) -> None:
        """Move the unpacked release into place, replacing a failed (or, with force, any) one of that version."""
        target = self.layout.release_dir(version)
        if os.path.lexists(target):
            old = os.path.join(self.layout.releases, ".old-%s-%d" % (version, os.getpid()))
            os.rename(target, old)
            os.rename(unpacked, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(unpacked, target)

    def activate(
        self,
        version: str,
        manifest: dict[str, Any],
        env: dict[str, str],
        previous: str | None,
        fallback: str | None,
        fallback_env_text: str | None,
    ) -> tuple[ScriptResult, dict[str, Any] | None]:
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
        raise DeployError(
            failure, **self.failure_details(version, previous, started, health, failed, fallback, rollback_error)
        )

    def failure_details(
        self,
        version: str,
        previous: str | None,
        started: ScriptResult,
        health: dict[str, Any] | None,
        failed: ScriptResult | None,
        rolled_back_to: str | None,
        rollback_error: str | None,
    ) -> dict[str, Any]:
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

    def prune(self, current: str) -> None:
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

    def rollback(self) -> dict[str, Any]:
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
            started, health = self.activate(
                target, layout.read_release(target)["manifest"], env, current, fallback, None
            )
            layout.remove_release(current)
            layout.write_history([v for v in history if v not in (current, target)] + [target])
            return self.result(True, "rolled_back", target, current, health=health, start=started.as_dict())

    # state=absent

    def absent(self) -> dict[str, Any]:
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


def check_params(params: dict[str, Any]) -> None:
    problem = name_problem(params["name"])
    if problem:
        raise DeployError(problem)
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
    problem = version_problem(params["version"])
    if problem:
        raise DeployError(problem)


def main() -> None:
    module = AnsibleModule(argument_spec=PACKAGE_ARGUMENT_SPEC, supports_check_mode=True)
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
