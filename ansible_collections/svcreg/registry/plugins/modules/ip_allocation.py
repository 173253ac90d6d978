#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)

from __future__ import annotations

DOCUMENTATION = r"""
module: ip_allocation
short_description: Allocate or release an IP address from a svcreg registry network
version_added: 0.1.0
description:
  - V(present) returns the owner's address in O(network), allocating one only if the owner has none.
  - V(absent) releases the owner's address in O(network).
  - Runs on the controller (an action plugin), never on the targeted host.
author:
  - svcreg maintainers (@svcreg)
extends_documentation_fragment:
  - svcreg.registry.connection
options:
  owner:
    description:
      - Who the address is for (a host or service name).
      - Defaults to the task's C(inventory_hostname).
    type: str
  network:
    description:
      - A network name from the registry's C(services.yaml), or a location (V(lan), V(wireguard), V(local))
        when exactly one network has it.
    type: str
    required: true
  state:
    description: Whether the owner should hold an address.
    type: str
    default: present
    choices: [present, absent]
attributes:
  check_mode:
    support: full
    description: Predicts the change; the address of a new allocation is not known (V(null)).
  diff_mode:
    support: full
    description: Returns the allocation before and after.
"""

EXAMPLES = r"""
- name: An address in the production LAN for this host
  svcreg.registry.ip_allocation:
    network: production
  register: lan_ip

- name: Use it
  ansible.builtin.debug:
    msg: "{{ lan_ip.ip }}/{{ lan_ip.prefixlen }}"

- name: Give it back
  svcreg.registry.ip_allocation:
    owner: web-1
    network: production
    state: absent
"""

RETURN = r"""
ip:
  description: The owner's address (V(null) after a release, and for a new allocation in check mode).
  returned: always
  type: str
  sample: 192.168.1.2
network:
  description: The network's name.
  returned: always
  type: str
  sample: production
prefixlen:
  description: The network's prefix length.
  returned: always
  type: int
  sample: 24
allocation:
  description: The whole allocation (owner, network, ip, prefixlen); empty after a release.
  returned: always
  type: dict
  sample: {owner: web-1, network: production, ip: 192.168.1.2, prefixlen: 24}
"""

from ansible_collections.svcreg.registry.plugins.module_utils.connection import run_module
from ansible_collections.svcreg.registry.plugins.module_utils.service import (
    IP_ALLOCATION_ARGUMENT_SPEC,
    run_ip_allocation,
)


def main() -> None:
    run_module(IP_ALLOCATION_ARGUMENT_SPEC, run_ip_allocation, host_option="owner")


if __name__ == "__main__":
    main()
