# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)

from __future__ import annotations

DOCUMENTATION = r"""
name: endpoint
short_description: The C(ip:port) of a service's endpoint, from the svcreg registry
version_added: 0.1.0
description:
  - For each service name, the C(ip:port) of the named endpoint of every matching instance, best first
    (the nearest location first - V(local), V(lan), V(wireguard) - then by host).
  - With one instance, C(lookup()) returns the string C(ip:port); with several, Ansible joins them
    with commas. Use C(query()) or C(wantlist=true) for a list of all instances, and O(first=true) for
    the best one only.
  - IPv6 addresses are written in brackets (C([fd00::2]:8080)).
author:
  - svcreg maintainers (@svcreg)
extends_documentation_fragment:
  - svcreg.registry.connection
  - svcreg.registry.connection.plugins
options:
  _terms:
    description: Service names.
    type: list
    elements: str
    required: true
  endpoint:
    description:
      - The endpoint's name (for example V(http)). May be left out when the instances have exactly one endpoint.
    type: str
  host:
    description: Only the instance on this host (C(host_id)).
    type: str
  state:
    description: Only instances in this run state; V(any) for all.
    type: str
    default: running
    choices: [any, starting, running, stopped, failed]
  location:
    description: Only instances at this location.
    type: str
    choices: [local, lan, wireguard]
  network:
    description: Only instances in this network.
    type: str
  first:
    description: Return only the best instance per service.
    type: bool
    default: false
  missing:
    description: What to do when a service has no matching instance.
    type: str
    default: error
    choices: [error, empty]
"""

EXAMPLES = r"""
- name: The API server's base URL (one instance)
  ansible.builtin.debug:
    msg: "http://{{ lookup('svcreg.registry.endpoint', 'api-server', endpoint='http') }}"

- name: Every API server, as a list
  ansible.builtin.debug:
    msg: "{{ query('svcreg.registry.endpoint', 'api-server', endpoint='http') }}"

- name: The nearest one only, even when several run
  ansible.builtin.debug:
    msg: "{{ lookup('svcreg.registry.endpoint', 'api-server', endpoint='http', first=true) }}"
"""

RETURN = r"""
_raw:
  description: C(ip:port) strings, best instance first.
  type: list
  elements: str
"""

from typing import Any

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase

from ansible_collections.svcreg.registry.plugins.module_utils.connection import (
    CONNECTION_OPTIONS,
    HAS_REGISTRY,
    missing_registry_message,
    open_client,
    reported_as,
)

_DISTANCE = {"local": 0, "lan": 1, "wireguard": 2}


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def endpoint_addresses(records: list[Any], service: str, endpoint: str | None) -> list[str]:
    """``ip:port`` of the endpoint in every record, best first.

    Raises:
        AnsibleLookupError: no endpoint named, and the instances have several.
    """
    if endpoint is None:
        names = sorted({record.endpoint for record in records})
        if len(names) > 1:
            raise AnsibleLookupError(
                "service {!r} has several endpoints ({}): pass endpoint=NAME".format(service, ", ".join(names))
            )
    chosen = [record for record in records if endpoint is None or record.endpoint == endpoint]
    chosen.sort(key=lambda record: (record.state != "running", _DISTANCE.get(str(record.location), 3), record.host_id))
    return [_address(record.ip, record.port) for record in chosen]


def _missing_message(service: str, endpoint: str | None, state: str) -> str:
    which = "" if state == "any" else state + " "
    if endpoint:
        return f"no {which}instance of service {service!r} has an endpoint named {endpoint!r}"
    return f"no {which}instance of service {service!r} is registered"


class LookupModule(LookupBase):
    def run(self, terms: list[Any], variables: dict[str, Any] | None = None, **kwargs: Any) -> list[str]:
        self.set_options(var_options=variables, direct=kwargs)
        if not HAS_REGISTRY:
            raise AnsibleLookupError(missing_registry_message())
        options = {name: self.get_option(name) for name in CONNECTION_OPTIONS}
        filters = {
            "host_id": self.get_option("host"),
            "location": self.get_option("location"),
            "network": self.get_option("network"),
        }
        state = self.get_option("state")
        if state != "any":
            filters["state"] = state
        endpoint = self.get_option("endpoint")
        results: list[str] = []
        with reported_as(AnsibleLookupError, options["url"]), open_client(options) as client:
            for term in terms:
                records = client.list_endpoints(
                    service_name=str(term), **{key: value for key, value in filters.items() if value is not None}
                )
                addresses = endpoint_addresses(records, str(term), endpoint)
                if not addresses and self.get_option("missing") == "error":
                    raise AnsibleLookupError(_missing_message(str(term), endpoint, state))
                results.extend(addresses[:1] if self.get_option("first") else addresses)
        return results
