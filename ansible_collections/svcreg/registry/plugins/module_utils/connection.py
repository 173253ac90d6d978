# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""The registry connection: one argument spec, one way to build a client, one way to word errors.

Used by the modules (through AnsibleModule), by the action plugins that run them on the
controller, by the inventory plugin and by the lookup. The ``registry`` package (and
``websockets``, which it needs) is imported behind a guard so that a missing install is
reported with ``missing_required_lib`` instead of a traceback.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ansible.module_utils.basic import AnsibleModule, env_fallback, missing_required_lib

try:
    from registry.client import BlockingClient, ConnectionSettings, registry_url
    from registry.exceptions import (
        ConnectionFailed,
        Forbidden,
        NotFound,
        RegistryError,
        Unauthorized,
        ValidationError,
    )
    from registry.tls import TlsClientConfig
except ImportError:
    HAS_REGISTRY = False
    REGISTRY_IMPORT_ERROR: str | None = traceback.format_exc()
    _REGISTRY_ERRORS: tuple[type[Exception], ...] = ()
else:
    HAS_REGISTRY = True
    REGISTRY_IMPORT_ERROR = None
    _REGISTRY_ERRORS = (RegistryError,)

__all__ = [
    "CONNECTION_OPTIONS",
    "HAS_REGISTRY",
    "REGISTRY_IMPORT_ERROR",
    "RegistryConnectionError",
    "connection_argument_spec",
    "connection_settings",
    "describe_error",
    "missing_registry_message",
    "open_client",
    "reported_as",
    "run_module",
]

REGISTRY_LIBRARY = "registry (pip install service-registry; it brings websockets)"


def connection_argument_spec() -> dict[str, dict[str, Any]]:
    """The connection options, as documented in the ``svcreg.registry.connection`` doc fragment."""
    return {
        "url": {"type": "str", "fallback": (env_fallback, ["SVCREG_URL"])},
        "ca_cert": {"type": "path", "fallback": (env_fallback, ["SVCREG_CA"])},
        "token": {"type": "str", "no_log": True, "fallback": (env_fallback, ["SVCREG_TOKEN"])},
        "client_cert": {"type": "path", "fallback": (env_fallback, ["SVCREG_CLIENT_CERT"])},
        "client_key": {"type": "path", "no_log": False, "fallback": (env_fallback, ["SVCREG_CLIENT_KEY"])},
        "validate_certs": {"type": "bool", "default": True},
        "timeout": {"type": "float", "default": 10.0},
    }


CONNECTION_OPTIONS = tuple(connection_argument_spec())


class RegistryConnectionError(Exception):
    """Bad connection options, a missing library, or an error from the registry, worded for a user."""


def missing_registry_message(where: str = "on the controller") -> str:
    return missing_required_lib(REGISTRY_LIBRARY) + " (needed %s)" % where


def connection_settings(options: dict[str, Any]) -> Any:
    """A ``ConnectionSettings`` from the connection options.

    Raises:
        RegistryConnectionError: the library is missing, no URL, a bad URL or timeout, or a
            TLS option that does not work (a missing CA file, a key without a certificate).
    """
    if not HAS_REGISTRY:
        raise RegistryConnectionError(missing_registry_message())
    url = options.get("url")
    if not url:
        raise RegistryConnectionError("url is required: set the url option or the SVCREG_URL environment variable")
    timeout = options.get("timeout")
    timeout = 10.0 if timeout is None else float(timeout)
    if not 0 < timeout <= 3600:
        raise RegistryConnectionError("timeout %r is out of range: give 0 < seconds <= 3600" % timeout)
    validate_certs = options.get("validate_certs")
    try:
        tls = TlsClientConfig(
            ca_file=options.get("ca_cert") or None,
            cert=options.get("client_cert") or None,
            key=options.get("client_key") or None,
            verify=True if validate_certs is None else bool(validate_certs),
        )
        return ConnectionSettings(registry_url(str(url)), tls, options.get("token") or None, timeout)
    except RegistryError as exc:
        raise RegistryConnectionError(_option_error(exc)) from None


_OPTION_NAMES = {"ca_file": "ca_cert", "cert": "client_cert", "key": "client_key", "url": "url"}


def _option_error(exc: Any) -> str:
    field = getattr(exc, "field", None)
    option = _OPTION_NAMES.get(field or "", field)
    return "%s: %s" % (option, exc.message) if option else exc.message


def open_client(options: dict[str, Any]) -> Any:
    """A connected ``BlockingClient`` (use it as a context manager).

    Raises:
        RegistryConnectionError: as :func:`connection_settings`, or the registry cannot be reached.
    """
    settings = connection_settings(options)
    try:
        return BlockingClient(settings)
    except RegistryError as exc:
        raise RegistryConnectionError(describe_error(exc, settings.url)) from None


def describe_error(exc: BaseException, url: str | None = None) -> str:
    """One line that says what went wrong and what to check; never includes the token."""
    where = " at %s" % url if url else ""
    if not HAS_REGISTRY or not isinstance(exc, RegistryError):
        return "%s: %s" % (type(exc).__name__, exc)
    if isinstance(exc, ConnectionFailed):
        return (
            "cannot reach the registry%s: %s (is svcreg serve running? check url/SVCREG_URL and ca_cert/SVCREG_CA)"
            % (
                where,
                exc.message,
            )
        )
    if isinstance(exc, Unauthorized):
        return "the registry%s refused the token (unauthorized): %s; check token/SVCREG_TOKEN" % (where, exc.message)
    if isinstance(exc, Forbidden):
        return "the registry%s does not allow this (forbidden): %s; use a token with a write or admin role" % (
            where,
            exc.message,
        )
    if isinstance(exc, NotFound):
        return "not found: %s" % exc.message
    if isinstance(exc, ValidationError):
        return "invalid input: %s" % exc.message
    return "registry error (%s): %s" % (exc.code, exc.message)


@contextmanager
def reported_as(error: Callable[[str], BaseException], url: str | None = None) -> Iterator[None]:
    """Turn what talking to the registry raises into ``error(message)``, worded the same for every plugin.

    Bad connection options, an error from the registry (worded by :func:`describe_error`), or bad task
    options (a ``ValueError`` naming the option).
    """
    try:
        yield
    except RegistryConnectionError as exc:
        raise error(str(exc)) from None
    except _REGISTRY_ERRORS as exc:
        raise error(describe_error(exc, url)) from None
    except ValueError as exc:
        raise error(str(exc)) from None


def run_module(argument_spec: dict[str, dict[str, Any]], runner: Any, host_option: str | None = None) -> None:
    """The body of every svcreg module: validate, connect, run ``runner``, exit.

    Used when a module runs as a plain module; in a playbook the collection's action
    plugins run the same ``runner`` on the controller instead.
    """
    module = AnsibleModule(argument_spec=dict(connection_argument_spec(), **argument_spec), supports_check_mode=True)
    if not HAS_REGISTRY:
        module.fail_json(msg=missing_registry_message("where this module runs"), exception=REGISTRY_IMPORT_ERROR)
    params = dict(module.params)
    if host_option and not params.get(host_option):
        module.fail_json(msg="%s is required when the module runs outside a playbook" % host_option)
    with reported_as(lambda message: module.fail_json(msg=message), params.get("url")), open_client(params) as client:
        result = runner(client, params, check_mode=module.check_mode)
    if not module._diff:
        result.pop("diff", None)
    module.exit_json(**result)
