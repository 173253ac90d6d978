# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""Run a svcreg module's logic on the controller, whatever host the play targets.

The modules talk to the registry through the ``registry`` package and ``websockets``.
Those are installed on the controller (where ``ansible-playbook`` runs) but usually not on
the managed hosts, so the action plugins validate the task's arguments against the
module's argument spec and run the shared ``module_utils`` code here, in-process. Nothing
is copied to, or run on, the target host; ``delegate_to`` is not needed.

``host`` / ``owner`` default to the task's ``inventory_hostname``, so a play over the
registry inventory can register "this host's" instance without naming it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ansible.errors import AnsibleActionFail
from ansible.module_utils.common.parameters import remove_values
from ansible.plugins.action import ActionBase

from ansible_collections.svcreg.registry.plugins.module_utils.connection import (
    HAS_REGISTRY,
    connection_argument_spec,
    missing_registry_message,
    open_client,
    reported_as,
)

__all__ = ["RegistryAction"]


class RegistryAction(ActionBase):
    """Subclasses set ARGUMENT_SPEC and HOST_OPTION and implement :meth:`run_with_client`."""

    ARGUMENT_SPEC: ClassVar[dict[str, dict[str, Any]]] = {}
    HOST_OPTION: str | None = None
    TRANSFERS_FILES = False
    _requires_connection = False
    _supports_check_mode = True
    _supports_async = False

    def run_with_client(self, client: Any, params: dict[str, Any], *, check_mode: bool) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, tmp: str | None = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        del tmp
        task_vars = task_vars or {}
        spec = dict(connection_argument_spec(), **self.ARGUMENT_SPEC)
        validation, params = self.validate_argument_spec(spec)
        no_log_values = validation._no_log_values
        if self.HOST_OPTION and not params.get(self.HOST_OPTION):
            params[self.HOST_OPTION] = task_vars.get("inventory_hostname")
        if not HAS_REGISTRY:
            raise AnsibleActionFail(missing_registry_message("on the controller, where svcreg.registry modules run"))
        with reported_as(AnsibleActionFail, params.get("url")), open_client(params) as client:
            result.update(self.run_with_client(client, params, check_mode=bool(self._task.check_mode)))
        if not self._task.diff:
            result.pop("diff", None)
        return remove_values(result, no_log_values)
