# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)

from __future__ import annotations

DOCUMENTATION = r"""
name: registry
short_description: Hosts and groups from the svcreg service registry
version_added: 0.1.0
description:
  - Reads the networks and the registered service instances from a running svcreg registry.
  - Every node of every network becomes a host (C(name) is the inventory hostname, C(host) becomes
    C(ansible_host), C(ssh_user) becomes C(ansible_user), other node keys become host variables).
    Hosts that only appear as the C(host_id) of a registered instance are added too.
  - "C(ansible_host) is chosen the same way every time: among the host's addresses (a node's own C(host)
    from the networks file, and the address of each lan or wireguard instance on it; loopback never, since
    it is not a way to reach the host) the first by O(preferred_networks), then a node's own address before
    an instance's, then lan before wireguard, then the networks' order in the file, then the lowest address.
    A host whose instances are all local gets no C(ansible_host) (its name is resolved as usual)."
  - "Groups (O(group_by)): C(network_<name>) for every network the host is a node of or has an instance in,
    C(local), C(lan) and C(wireguard) for every location it has, C(service_<name>) per service with an
    instance on the host, and on request C(tag_<tag>) and C(state_<state>). Characters other than letters,
    digits and C(_) in names become C(_) (network C(edge.eu) -> C(network_edge_eu))."
  - "Host variables: C(svcreg_services) (the instances on the host), C(svcreg_networks) (every network it is
    in), C(svcreg_network) and C(svcreg_location) (the network and type of the chosen C(ansible_host), else
    of its first network)."
  - "What the inventory shows depends on the token's role and on the controller's address: a C(read) or
    C(write) token sees only the instances of the network the controller connects from (and local instances
    of the controller's host), an C(admin) token sees every instance (location-aware discovery, see the
    collection README). Nodes of the networks file are always listed. A token made with
    C(svcreg token create --role read --see-all) sees every instance without write rights."
  - >-
    The connection options (O(url), O(token), O(ca_cert), ...) may be templates, for example a lookup
    C(token: "{{ lookup('ansible.builtin.env', 'MY_TOKEN') }}") or a vaulted value.
  - The configuration file's name must end in C(.svcreg.yml) or C(.svcreg.yaml), or be C(svcreg.yml),
    C(svcreg.yaml), C(registry.yml) or C(registry.yaml).
author:
  - svcreg maintainers (@svcreg)
extends_documentation_fragment:
  - svcreg.registry.connection
  - svcreg.registry.connection.plugins
  - ansible.builtin.constructed
  - ansible.builtin.inventory_cache
options:
  plugin:
    description: Marks the file as this plugin's configuration.
    type: str
    required: true
    choices: [svcreg.registry.registry]
  networks:
    description:
      - Only these networks (by name), and only the instances in them. All when empty.
    type: list
    elements: str
    default: []
  locations:
    description:
      - Only networks of these types, and only instances at these locations. All when empty.
    type: list
    elements: str
    default: []
    choices: [local, lan, wireguard]
  services:
    description:
      - Only instances of these services. All when empty. Network nodes stay in the inventory.
    type: list
    elements: str
    default: []
  states:
    description:
      - Only instances in these run states. All when empty.
    type: list
    elements: str
    default: []
    choices: [starting, running, stopped, failed]
  tags:
    description:
      - Only instances with at least one of these tags. All when empty.
    type: list
    elements: str
    default: []
  service_hosts:
    description:
      - Add hosts that are not network nodes but have a registered instance.
    type: bool
    default: true
  preferred_networks:
    description:
      - Network names or types (V(lan), V(wireguard)), most preferred first, for choosing a host's
        C(ansible_host) among its addresses. Addresses in none of them come after, in the default order.
    type: list
    elements: str
    default: []
  group_by:
    description:
      - The group families to create.
    type: list
    elements: str
    default: [networks, locations, services]
    choices: [networks, locations, services, tags, states]
"""

EXAMPLES = r"""
# inventories/registry.svcreg.yml; the connection comes from SVCREG_URL, SVCREG_CA, SVCREG_TOKEN
plugin: svcreg.registry.registry
states: [running, starting]
preferred_networks: [production, wireguard]
group_by: [networks, locations, services, tags]
token: "{{ lookup('ansible.builtin.env', 'SVCREG_INVENTORY_TOKEN') }}"
compose:
  api_port: >-
    (svcreg_services | selectattr('service_name', 'eq', 'api-server') | first).endpoints[0].port
    if 'service_api_server' in group_names else None
strict: true
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/svcreg-inventory
cache_timeout: 60
"""

import ipaddress
import os
import re
from typing import Any

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable

from ansible_collections.svcreg.registry.plugins.module_utils.connection import (
    CONNECTION_OPTIONS,
    HAS_REGISTRY,
    missing_registry_message,
    open_client,
    reported_as,
)
from ansible_collections.svcreg.registry.plugins.module_utils.groups import group_name

_NODE_KEYS = {"name": None, "host": "ansible_host", "ssh_user": "ansible_user"}
_PATH_ENV = {"ca_cert": "SVCREG_CA", "client_cert": "SVCREG_CLIENT_CERT", "client_key": "SVCREG_CLIENT_KEY"}
_FILE_NAMES = ("svcreg.yml", "svcreg.yaml", "registry.yml", "registry.yaml")
_DISTANCE = {"local": 0, "lan": 1, "wireguard": 2}
_INVALID_VARIABLE = re.compile(r"[^A-Za-z0-9_]")


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "svcreg.registry.registry"

    def verify_file(self, path: str) -> bool:
        if not super().verify_file(path):
            return False
        return path.endswith((".svcreg.yml", ".svcreg.yaml")) or path.rsplit("/", 1)[-1] in _FILE_NAMES

    def parse(self, inventory: Any, loader: Any, path: str, cache: bool = True) -> None:
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        cache_key = self.get_cache_key(path)
        use_cache = self.get_option("cache") and cache
        update_cache = self.get_option("cache") and not cache
        data = None
        if use_cache:
            try:
                data = self._cache[cache_key]
            except KeyError:
                update_cache = True
        if data is None:
            data = self._fetch(path)
        if update_cache:
            self._cache[cache_key] = data
        self._populate(data)

    def _fetch(self, path: str) -> dict[str, Any]:
        """The registry's networks and instances, as plain JSON data (what the cache holds)."""
        if not HAS_REGISTRY:
            raise AnsibleParserError(f"svcreg inventory {path}: {missing_registry_message()}")
        options = {name: self._templated(self.get_option(name)) for name in CONNECTION_OPTIONS}
        for name, variable in _PATH_ENV.items():
            # An empty SVCREG_CA means "unset" (as for the modules), not the current directory that a
            # path option makes of "".
            if os.environ.get(variable) == "" and options.get(name) in ("", os.getcwd()):
                options[name] = None

        def failed(message: str) -> AnsibleParserError:
            return AnsibleParserError(f"svcreg inventory {path}: {message}")

        with reported_as(failed, options["url"]), open_client(options) as client:
            networks = [dict(network) for network in client.list_networks()]
            services = [entry.to_dict() for entry in client.list_services()]
        return {"networks": networks, "services": services}

    def _wanted_networks(self, networks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names, locations = self.get_option("networks"), self.get_option("locations")
        return [
            network
            for network in networks
            if (not names or network["name"] in names) and (not locations or network["type"] in locations)
        ]

    def _join(self, group: str, host: str) -> None:
        self.inventory.add_child(self.inventory.add_group(group), host)

    def _templated(self, value: Any) -> Any:
        """A connection option as written, or rendered when it is a template (lookups, vault)."""
        if isinstance(value, str) and ("{{" in value or "{%" in value):
            return self.templar.template(value)
        return value

    def _wanted_services(self, services: list[dict[str, Any]]) -> list[dict[str, Any]]:
        wanted = {
            "service_name": self.get_option("services"),
            "state": self.get_option("states"),
            "location": self.get_option("locations"),
        }
        networks = self.get_option("networks")
        tags = set(self.get_option("tags"))
        return [
            entry
            for entry in services
            if all(not values or entry[field] in values for field, values in wanted.items())
            and (not networks or (entry.get("network_info") or {}).get("network") in networks)
            and (not tags or tags.intersection(entry.get("tags") or ()))
        ]

    def _populate(self, data: dict[str, Any]) -> None:
        networks = self._wanted_networks(data["networks"])
        order = {network["name"]: index for index, network in enumerate(data["networks"])}
        types = {network["name"]: network["type"] for network in data["networks"]}
        families = set(self.get_option("group_by"))
        hosts: list[str] = []
        # per host: (network, location) memberships, and candidate addresses for ansible_host
        memberships: dict[str, list[tuple[str | None, str | None]]] = {}
        candidates: dict[str, list[tuple[str, str | None, str | None, bool]]] = {}  # ip, network, location, node
        for network in networks:
            for node in network.get("nodes") or []:
                host = self.inventory.add_host(node.get("name") or node["host"])
                if host not in hosts:
                    hosts.append(host)
                    for key, value in node.items():
                        variable = _NODE_KEYS.get(key, _INVALID_VARIABLE.sub("_", key))
                        if variable and variable != "ansible_host":
                            self.inventory.set_variable(host, variable, value)
                memberships.setdefault(host, []).append((network["name"], network["type"]))
                candidates.setdefault(host, []).append((node["host"], network["name"], network["type"], True))
        services_by_host: dict[str, list[dict[str, Any]]] = {}
        for entry in sorted(self._wanted_services(data["services"]), key=lambda e: (e["host_id"], e["service_name"])):
            services_by_host.setdefault(entry["host_id"], []).append(entry)
        for host_id, entries in services_by_host.items():
            if host_id not in hosts:
                if not self.get_option("service_hosts"):
                    continue
                hosts.append(self.inventory.add_host(host_id))
            for entry in entries:
                info = entry.get("network_info") or {}
                network_name, location = info.get("network"), entry.get("location")
                memberships.setdefault(host_id, []).append((network_name, location))
                if location != "local" and info.get("ip"):
                    candidates.setdefault(host_id, []).append((info["ip"], network_name, location, False))
                if "services" in families:
                    self._join(group_name("service", entry["service_name"]), host_id)
                if "tags" in families:
                    for tag in entry.get("tags") or ():
                        self._join(group_name("tag", tag), host_id)
                if "states" in families:
                    self._join(group_name("state", entry["state"]), host_id)
            self.inventory.set_variable(host_id, "svcreg_services", entries)
        preferred = list(self.get_option("preferred_networks"))

        def rank(candidate: tuple[str, str | None, str | None, bool]) -> tuple[Any, ...]:
            ip, network_name, location, is_node = candidate
            listed = [i for i, wanted in enumerate(preferred) if wanted in (network_name, location)]
            return (
                listed[0] if listed else len(preferred),
                not is_node,
                _DISTANCE.get(location or "", 3),
                order.get(network_name or "", len(order)),
                _address_key(ip),
            )

        for host in hosts:
            seen = list(dict.fromkeys(memberships.get(host, [])))
            for network_name, location in seen:
                if network_name and "networks" in families:
                    self._join(group_name("network", network_name), host)
                if location and "locations" in families:
                    self._join(location, host)
            chosen = min(candidates[host], key=rank) if candidates.get(host) else None
            if chosen is not None:
                self.inventory.set_variable(host, "ansible_host", chosen[0])
                network_name, location = chosen[1], chosen[2]
            else:
                network_name, location = seen[0] if seen else (None, None)
            self.inventory.set_variable(host, "svcreg_network", network_name)
            self.inventory.set_variable(host, "svcreg_location", location or types.get(network_name or ""))
            self.inventory.set_variable(host, "svcreg_networks", [name for name, _location in seen if name])
        strict = self.get_option("strict")
        for host in hosts:
            if "svcreg_services" not in self.inventory.get_host(host).vars:
                self.inventory.set_variable(host, "svcreg_services", [])
            variables = self.inventory.get_host(host).get_vars()
            self._set_composite_vars(self.get_option("compose"), variables, host, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), variables, host, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host, strict=strict)


def _address_key(ip: str) -> tuple[int, int]:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return (9, 0)
    return (address.version, int(address))
