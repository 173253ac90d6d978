# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""Runs svcreg.registry.ip_allocation on the controller (see plugin_utils/controller_action.py)."""

from __future__ import annotations

from typing import Any

from ansible_collections.svcreg.registry.plugins.module_utils.service import (
    IP_ALLOCATION_ARGUMENT_SPEC,
    run_ip_allocation,
)
from ansible_collections.svcreg.registry.plugins.plugin_utils.controller_action import RegistryAction


class ActionModule(RegistryAction):
    ARGUMENT_SPEC = IP_ALLOCATION_ARGUMENT_SPEC
    HOST_OPTION = "owner"

    def run_with_client(self, client: Any, params: dict[str, Any], *, check_mode: bool) -> dict[str, Any]:
        return run_ip_allocation(client, params, check_mode=check_mode)
