# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""Runs svcreg.registry.service_info on the controller (see plugin_utils/controller_action.py)."""

from __future__ import annotations

from typing import Any

from ansible_collections.svcreg.registry.plugins.module_utils.service import (
    SERVICE_INFO_ARGUMENT_SPEC,
    run_service_info,
)
from ansible_collections.svcreg.registry.plugins.plugin_utils.controller_action import RegistryAction


class ActionModule(RegistryAction):
    ARGUMENT_SPEC = SERVICE_INFO_ARGUMENT_SPEC

    def run_with_client(self, client: Any, params: dict[str, Any], *, check_mode: bool) -> dict[str, Any]:
        return run_service_info(client, params, check_mode=check_mode)
