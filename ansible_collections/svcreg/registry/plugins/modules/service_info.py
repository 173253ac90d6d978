#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)

from __future__ import annotations

DOCUMENTATION = r"""
module: service_info
short_description: List service instances registered in the svcreg registry
version_added: 0.1.0
description:
  - Returns the instances that match every given filter, for C(register:) and C(when:).
  - Runs on the controller (an action plugin), never on the targeted host.
author:
  - svcreg maintainers (@svcreg)
extends_documentation_fragment:
  - svcreg.registry.connection
options:
  name:
    description: Only instances of this service.
    type: str
    aliases: [service_name]
  host:
    description: Only instances on this host (C(host_id)).
    type: str
    aliases: [host_id]
  state:
    description: Only instances in this run state.
    type: str
    choices: [starting, running, stopped, failed]
  location:
    description: Only instances at this location.
    type: str
    choices: [local, lan, wireguard]
  network:
    description: Only instances in this network.
    type: str
  tag:
    description: Only instances with this tag.
    type: str
attributes:
  check_mode:
    support: full
    description: Reads only; runs the same in check mode.
  diff_mode:
    support: none
    description: Changes nothing, so there is nothing to diff.
"""

EXAMPLES = r"""
- name: Running API servers
  svcreg.registry.service_info:
    name: api-server
    state: running
  register: api

- name: Stop if there is none
  ansible.builtin.fail:
    msg: no API server is running
  when: api.services | length == 0
"""

RETURN = r"""
services:
  description: The matching instances, in the registry's order.
  returned: always
  type: list
  elements: dict
  sample:
    - service_name: api-server
      host_id: prod-api
      location: lan
      state: running
      endpoints: [{name: http, port: 8080, protocol: tcp}]
      network_info: {ip: 192.168.1.100, hostname: null, network: production}
"""

from ansible_collections.svcreg.registry.plugins.module_utils.connection import run_module
from ansible_collections.svcreg.registry.plugins.module_utils.service import (
    SERVICE_INFO_ARGUMENT_SPEC,
    run_service_info,
)


def main() -> None:
    run_module(SERVICE_INFO_ARGUMENT_SPEC, run_service_info)


if __name__ == "__main__":
    main()
