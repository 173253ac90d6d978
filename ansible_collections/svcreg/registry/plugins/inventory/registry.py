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
    Hosts that only appear as the C(host_id) of a registered instance are added too, with the
    IP of a lan or wireguard instance as C(ansible_host) (none when all are local, since loopback
    is not a way to reach the host).
  - "Groups: C(network_<name>) per network, C(local), C(lan) and C(wireguard) per network type, and
    C(service_<name>) per service with an instance on the host. Characters other than letters, digits
    and C(_) in names become C(_) (C(api-server) -> C(service_api_server))."
  - "Host variables: C(svcreg_services) (the instances on the host), C(svcreg_network) (the first
    network the host is in, in the registry's order) and C(svcreg_location) (that network's type)."
  - The configuration file's name must end in C(.svcreg.yml) or C(.svcreg.yaml), or be C(registry.yml).
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
  service_hosts:
    description:
      - Add hosts that are not network nodes but have a registered instance.
    type: bool
    default: true
"""

EXAMPLES = r"""
# inventories/registry.svcreg.yml; the connection comes from SVCREG_URL, SVCREG_CA, SVCREG_TOKEN
plugin: svcreg.registry.registry
states: [running, starting]
keyed_groups:
  - key: svcreg_services | map(attribute='tags') | flatten
    prefix: tag
compose:
  api_port: (svcreg_services | selectattr('service_name', 'eq', 'api-server') | first).endpoints[0].port
    if 'service_api_server' in group_names else omit
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/svcreg-inventory
cache_timeout: 60
"""

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
_INVALID_VARIABLE = re.compile(r"[^A-Za-z0-9_]")


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "svcreg.registry.registry"

    def verify_file(self, path: str) -> bool:
        if not super().verify_file(path):
            return False
        return path.endswith((".svcreg.yml", ".svcreg.yaml")) or path.rsplit("/", 1)[-1] == "registry.yml"

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
        options = {name: self.get_option(name) for name in CONNECTION_OPTIONS}

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

    def _wanted_services(self, services: list[dict[str, Any]]) -> list[dict[str, Any]]:
        wanted = {
            "service_name": self.get_option("services"),
            "state": self.get_option("states"),
            "location": self.get_option("locations"),
        }
        networks = self.get_option("networks")
        return [
            entry
            for entry in services
            if all(not values or entry[field] in values for field, values in wanted.items())
            and (not networks or (entry.get("network_info") or {}).get("network") in networks)
        ]

    def _add_to_network(self, host: str, network: str | None, location: str | None) -> None:
        if network:
            self.inventory.add_child(self.inventory.add_group(group_name("network", network)), host)
        if location:
            self.inventory.add_child(self.inventory.add_group(location), host)
        variables = self.inventory.get_host(host).vars
        if "svcreg_network" not in variables:
            self.inventory.set_variable(host, "svcreg_network", network)
            self.inventory.set_variable(host, "svcreg_location", location)

    def _populate(self, data: dict[str, Any]) -> None:
        hosts: list[str] = []
        for network in self._wanted_networks(data["networks"]):
            for node in network.get("nodes") or []:
                host = self.inventory.add_host(node.get("name") or node["host"])
                if host not in hosts:
                    hosts.append(host)
                    for key, value in node.items():
                        variable = _NODE_KEYS.get(key, _INVALID_VARIABLE.sub("_", key))
                        if variable:
                            self.inventory.set_variable(host, variable, value)
                self._add_to_network(host, network["name"], network["type"])
        services_by_host: dict[str, list[dict[str, Any]]] = {}
        for entry in sorted(self._wanted_services(data["services"]), key=lambda e: (e["host_id"], e["service_name"])):
            services_by_host.setdefault(entry["host_id"], []).append(entry)
        for host_id, entries in services_by_host.items():
            if host_id not in hosts:
                if not self.get_option("service_hosts"):
                    continue
                host = self.inventory.add_host(host_id)
                hosts.append(host)
                # A local instance's address is loopback *on that host*: connecting there would
                # reach the controller. Take the address of a lan/wireguard instance; with only
                # local ones, leave ansible_host unset (the host name is resolved as usual).
                reachable = [entry for entry in entries if entry.get("location") != "local"]
                chosen = (reachable or entries)[0]
                info = chosen.get("network_info") or {}
                if reachable:
                    self.inventory.set_variable(host, "ansible_host", info.get("ip"))
                self._add_to_network(host, info.get("network"), chosen.get("location"))
            for entry in entries:
                self.inventory.add_child(
                    self.inventory.add_group(group_name("service", entry["service_name"])), host_id
                )
            self.inventory.set_variable(host_id, "svcreg_services", entries)
        strict = self.get_option("strict")
        for host in hosts:
            if "svcreg_services" not in self.inventory.get_host(host).vars:
                self.inventory.set_variable(host, "svcreg_services", [])
            variables = self.inventory.get_host(host).get_vars()
            self._set_composite_vars(self.get_option("compose"), variables, host, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), variables, host, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host, strict=strict)
