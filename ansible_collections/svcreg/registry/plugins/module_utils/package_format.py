# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""The rules of a service package, once, standard library only.

The controller (``registry.package``, the ``package`` action plugin) and the ``package`` module on the
target host both apply them: names and versions, environment variables, and the module's options. It
lives in the collection's ``module_utils`` because Ansible ships that to the host, where svcreg is not
installed; ``registry.package`` imports it from here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ENV_NAME_PATTERN",
    "MANIFEST_NAME",
    "NAME_PATTERN",
    "PACKAGE_ARGUMENT_SPEC",
    "PACKAGE_SUFFIX",
    "RESERVED_ENV_PREFIX",
    "VERSION_PATTERN",
    "PackageRuleError",
    "env_name_problem",
    "name_problem",
    "package_file_name",
    "resolve_env",
    "version_problem",
]

MANIFEST_NAME = "manifest.yaml"
PACKAGE_SUFFIX = ".tar.gz"
# A package's name is the service's name in the registry (registry.model.validate_service_name).
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z"
VERSION_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z._+~-]{0,63}\Z"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z"
RESERVED_ENV_PREFIX = "SVCREG_"

_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
_ENV_NAME = re.compile(ENV_NAME_PATTERN)

# The options of the package module. The action plugin of the same name takes these too, except the
# ones it computes itself (checksum, manifest), and reads src on the controller.
PACKAGE_ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
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


class PackageRuleError(ValueError):
    """A value breaks a package rule; ``field`` names it (``env``, ``env.PORT``)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a package name, or None."""
    if isinstance(name, str) and _NAME.match(name):
        return None
    return "name %r must be letters, digits and '-' (1-63, lowercase), starting and ending with a letter or digit" % (
        name,
    )


def version_problem(version: object) -> str | None:
    """Why ``version`` is not a package version, or None."""
    if isinstance(version, str) and _VERSION.match(version):
        return None
    return "version %r must be letters, digits, '.', '_', '+', '~' and '-' (1-64), starting with a letter or digit" % (
        version,
    )


def env_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a service's environment variable, or None."""
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        return "%r is not a valid environment variable name (letters, digits and '_')" % (name,)
    if name.startswith(RESERVED_ENV_PREFIX):
        return (
            "%r is not a valid environment variable name for a service: %s* names are reserved (the deployer sets them)"
            % (
                name,
                RESERVED_ENV_PREFIX,
            )
        )
    return None


def package_file_name(name: str, version: str) -> str:
    return "%s-%s%s" % (name, version, PACKAGE_SUFFIX)


def resolve_env(
    package: str, defaults: Mapping[str, str | None], given: Mapping[str, object], *, declared_only: bool = True
) -> dict[str, str]:
    """The environment a release runs with: the manifest's ``defaults``, overridden by ``given``.

    Args:
        package: ``NAME VERSION``, for the messages.
        defaults: the manifest's ``env``; a None default makes the variable required.
        declared_only: refuse names the manifest does not declare (a typo would go unnoticed).

    Raises:
        PackageRuleError: a bad or undeclared name, a value that is not a string or a number, or
            required variables without a value. Messages name variables, never values.
    """
    for name, value in given.items():
        problem = env_name_problem(name)
        if problem:
            raise PackageRuleError("env: %s" % problem, field="env")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise PackageRuleError("env: the value of %s must be a string or a number" % name, field="env." + name)
    if declared_only:
        unknown = sorted(name for name in given if name not in defaults)
        if unknown:
            raise PackageRuleError(
                "%s does not declare env variable(s) %s (declared: %s)"
                % (package, ", ".join(unknown), ", ".join(sorted(defaults)) or "none"),
                field="env",
            )
    env = {name: value for name, value in defaults.items() if value is not None}
    env.update((name, str(value)) for name, value in given.items())
    missing = sorted(name for name in defaults if name not in env)
    if missing:
        raise PackageRuleError(
            "%s needs environment variables without a default: %s; pass them in env" % (package, ", ".join(missing)),
            field="env",
        )
    return env
