#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)

from __future__ import annotations

DOCUMENTATION = r"""
module: service
short_description: Register, update or remove a service instance in the svcreg registry
version_added: 0.1.0
description:
  - Registers an instance of a service (identified by O(name) and O(host)) in the svcreg registry,
    updates it, changes its run state, or removes it.
  - Reads the current instance first and writes only when something differs, so a second identical
    run reports C(changed=false).
  - Options that are not given keep their current value on an existing instance.
  - Runs on the controller (an action plugin), never on the targeted host, so managed hosts need
    neither the C(registry) package nor C(websockets).
author:
  - svcreg maintainers (@svcreg)
extends_documentation_fragment:
  - svcreg.registry.connection
options:
  name:
    description:
      - The service name (lowercase letters, digits and C(-)).
    type: str
    required: true
    aliases: [service_name]
  host:
    description:
      - The host the instance runs on (the registry's C(host_id)).
      - Defaults to the task's C(inventory_hostname).
    type: str
    aliases: [host_id]
  state:
    description:
      - V(present) registers or updates the instance, keeping its run state (V(running) for a new one).
      - V(running), V(stopped), V(failed) and V(starting) do the same and set that run state.
      - V(absent) removes the instance.
    type: str
    default: present
    choices: [present, absent, starting, running, stopped, failed]
  ip:
    description:
      - The instance's IP address. A new instance needs O(ip) or O(network); with only O(network), the
        registry allocates the next free address of that network for the instance.
    type: str
  hostname:
    description:
      - A DNS name of the instance.
    type: str
  network:
    description:
      - The registry network the instance is in. The registry derives it from O(ip) when not given.
    type: str
  location:
    description:
      - Where the instance runs relative to its callers. When not given, the registry takes it from the
        address (loopback is V(local), an address in a configured network has that network's type).
    type: str
    choices: [local, lan, wireguard]
  endpoints:
    description:
      - The ports the instance listens on; replaces the current list.
    type: list
    elements: dict
    suboptions:
      name:
        description: The endpoint's name, for example V(http).
        type: str
        required: true
      port:
        description: The port, 1 to 65535.
        type: int
        required: true
      protocol:
        description: The transport protocol.
        type: str
        default: tcp
        choices: [tcp, udp]
  tags:
    description:
      - Tags; replaces the current list.
    type: list
    elements: str
  metadata:
    description:
      - String keys and string values; replaces the current metadata. Numbers and booleans are turned into
        their text (V(3), V(true)); other values (lists, mappings) are refused by name.
    type: dict
  ttl:
    description:
      - Seconds without a heartbeat after which the registry marks the instance failed.
    type: float
  deregister_after:
    description:
      - Seconds after failing after which the registry removes the instance.
    type: float
  version:
    description:
      - The version of the service that runs.
    type: str
attributes:
  check_mode:
    support: full
    description: Predicts the change without writing.
  diff_mode:
    support: full
    description: Returns the instance before and after.
notes:
  - Set the connection options once per play with C(module_defaults) and the
    C(group/svcreg.registry.registry) action group.
"""

EXAMPLES = r"""
- name: Register the API server on this host
  svcreg.registry.service:
    name: api-server
    ip: "{{ ansible_host }}"
    location: lan
    endpoints:
      - name: http
        port: 8080
    tags: [blue]
    metadata:
      team: core

- name: Mark it stopped
  svcreg.registry.service:
    name: api-server
    state: stopped

- name: Remove it
  svcreg.registry.service:
    name: api-server
    host: prod-api
    state: absent

- name: Connection options once for the whole play
  hosts: all
  module_defaults:
    group/svcreg.registry.registry:
      url: "wss://registry.example.com:9443/"
      ca_cert: /etc/svcreg/ca.crt
  tasks:
    - svcreg.registry.service:
        name: node-exporter
        ip: "{{ ansible_host }}"
        endpoints: [{name: metrics, port: 9100}]
"""

RETURN = r"""
service:
  description: The instance as the registry holds it after the task (the predicted one in check mode); empty when
    absent.
  returned: always
  type: dict
  sample:
    service_name: api-server
    host_id: prod-api
    location: lan
    state: running
    endpoints: [{name: http, port: 8080, protocol: tcp}]
    network_info: {ip: 192.168.1.100, hostname: null, network: production}
    tags: [blue]
    metadata: {team: core}
    ttl_seconds: null
    deregister_after_seconds: null
    version: null
    create_revision: 2
    mod_revision: 2
    updated_at: 1700000000.0
"""

from ansible_collections.svcreg.registry.plugins.module_utils.connection import run_module
from ansible_collections.svcreg.registry.plugins.module_utils.service import SERVICE_ARGUMENT_SPEC, run_service


def main() -> None:
    run_module(SERVICE_ARGUMENT_SPEC, run_service, host_option="host")


if __name__ == "__main__":
    main()
