# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""The controller half of svcreg.registry.package: validate, copy only when needed, run the module.

The package is validated completely on the controller (``registry.package.inspect_package``)
before anything is sent: a refused package fails the task without a connection to the host.
The env is checked against the manifest (unknown or missing variables). Then the tarball is
copied to the host unless ``<install_base>/<name>/packages/`` already holds a copy with the
same sha256, and the module (standard library only on the host) does the rest.
"""

from __future__ import annotations

import posixpath
from typing import Any

from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase

from ansible_collections.svcreg.registry.plugins.module_utils.connection import HAS_REGISTRY, missing_registry_message
from ansible_collections.svcreg.registry.plugins.module_utils.package_format import PACKAGE_ARGUMENT_SPEC

if HAS_REGISTRY:
    from registry.exceptions import RegistryError
    from registry.package import inspect_package, resolve_env

MODULE = "svcreg.registry.package"
# The module's options, less what this plugin computes (checksum, manifest); name comes from the manifest.
ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    option: dict(spec, required=False) if option == "name" else spec
    for option, spec in PACKAGE_ARGUMENT_SPEC.items()
    if option not in ("checksum", "manifest")
}


class ActionModule(ActionBase):
    TRANSFERS_FILES = True
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp: str | None = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        del tmp
        task_vars = task_vars or {}
        _validation, params = self.validate_argument_spec(ARGUMENT_SPEC)
        module_args = {
            key: params[key]
            for key in (
                "state",
                "rollback",
                "install_base",
                "keep_releases",
                "force",
                "script_timeout",
                "health_timeout",
            )
        }
        deploying = params["state"] == "present" and not params["rollback"]
        package_info: dict[str, Any] = {}
        if deploying:
            package_info, deploy_args = self._validate_package(params)
            module_args.update(deploy_args)
        else:
            if not params["name"]:
                raise AnsibleActionFail("name is required with state=absent or rollback=true")
            module_args["name"] = params["name"]
        try:
            if deploying and not self._task.check_mode:
                module_args["src"] = self._remote_package(package_info, params["install_base"], task_vars)
            result.update(self._execute_module(MODULE, module_args=module_args, task_vars=task_vars))
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        if package_info:
            result["package"] = package_info
            result["manifest"] = module_args["manifest"]
        return result

    def _validate_package(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        if not HAS_REGISTRY:
            raise AnsibleActionFail(missing_registry_message("on the controller, where packages are validated"))
        if not params["src"]:
            raise AnsibleActionFail("src (the package file on the controller) is required to deploy")
        try:
            source = self._find_needle("files", params["src"])
        except AnsibleError as exc:
            raise AnsibleActionFail(to_text(exc)) from None
        try:
            package = inspect_package(source)
            # Checked against the manifest here; only the given values travel (no_log), the module
            # adds the manifest's defaults, which are not secrets.
            resolved = resolve_env(package.manifest, params["env"])
            env = {name: value for name, value in resolved.items() if name in params["env"]}
        except RegistryError as exc:
            raise AnsibleActionFail(f"package refused, nothing was sent: {exc.message}") from None
        manifest = package.manifest
        for option in ("name", "version"):
            given = params[option]
            if given and given != getattr(manifest, option):
                raise AnsibleActionFail(
                    f"{option}={given} does not match the package's manifest ({getattr(manifest, option)})"
                )
        info = {
            "name": manifest.name,
            "version": manifest.version,
            "path": str(package.path),
            "file_name": package.file_name,
            "sha256": package.sha256,
            "size": package.size,
        }
        args = {
            "name": manifest.name,
            "version": manifest.version,
            "checksum": package.sha256,
            "manifest": manifest.to_dict(),
            "env": env,
        }
        return info, args

    def _remote_package(self, info: dict[str, Any], install_base: str, task_vars: dict[str, Any]) -> str:
        """The package's path on the host: the cached copy if its sha256 matches, else a fresh upload."""
        cached = posixpath.join(install_base, info["name"], "packages", info["file_name"])
        stat = self._execute_module(
            "ansible.legacy.stat",
            module_args={"path": cached, "checksum_algorithm": "sha256", "get_mime": False, "get_attributes": False},
            task_vars=task_vars,
        )
        if stat.get("stat", {}).get("checksum") == info["sha256"]:
            info["copied"] = False
            return cached
        tmpdir = self._connection._shell.tmpdir or self._make_tmp_path()
        remote = self._connection._shell.join_path(tmpdir, info["file_name"])
        self._transfer_file(info["path"], remote)
        self._fixup_perms2((tmpdir, remote))
        info["copied"] = True
        return remote
