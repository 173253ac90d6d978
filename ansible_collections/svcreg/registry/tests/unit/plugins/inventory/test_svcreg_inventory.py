"""The inventory plugin's hosts, groups and variables from canned registry data."""

from __future__ import annotations

from typing import Any

import pytest
from ansible.inventory.data import InventoryData

from ansible_collections.svcreg.registry.plugins.inventory.registry import InventoryModule

DATA = {
    "networks": [
        {
            "name": "prod-lan",
            "type": "lan",
            "subnet": "192.168.1.0/24",
            "nodes": [{"name": "api-1", "host": "192.168.1.10", "ssh_user": "deploy", "rack": "r1"}],
        },
        {"name": "local", "type": "local", "subnet": "127.0.0.0/8", "nodes": []},
    ],
    "services": [
        {
            "service_name": "api-server",
            "host_id": "api-1",
            "location": "lan",
            "state": "running",
            "network_info": {"ip": "192.168.1.10", "network": "prod-lan"},
        },
        {
            "service_name": "cache",
            "host_id": "box-9",
            "location": "local",
            "state": "stopped",
            "network_info": {"ip": "127.0.0.9", "network": "local"},
        },
    ],
}

DEFAULTS: dict[str, Any] = {
    "networks": [],
    "locations": [],
    "services": [],
    "states": [],
    "tags": [],
    "service_hosts": True,
    "preferred_networks": [],
    "group_by": ["networks", "locations", "services"],
    "strict": False,
    "compose": {},
    "groups": {},
    "keyed_groups": [],
}


def populate(**options: Any) -> InventoryData:
    plugin = InventoryModule()
    plugin.inventory = InventoryData()
    settings = {**DEFAULTS, **options}
    plugin.get_option = settings.__getitem__  # type: ignore[method-assign]
    plugin._populate(DATA)
    return plugin.inventory


def test_nodes_and_service_hosts() -> None:
    inventory = populate()
    api = inventory.get_host("api-1").vars
    assert (api["ansible_host"], api["ansible_user"], api["rack"]) == ("192.168.1.10", "deploy", "r1")
    assert (api["svcreg_network"], api["svcreg_location"]) == ("prod-lan", "lan")
    assert [entry["service_name"] for entry in api["svcreg_services"]] == ["api-server"]
    box = inventory.get_host("box-9").vars
    # only a local (loopback) instance: its address is not the host's, so no ansible_host
    assert "ansible_host" not in box
    assert (box["svcreg_network"], box["svcreg_location"]) == ("local", "local")
    assert {"network_prod_lan", "lan", "service_api_server", "network_local", "local", "service_cache"} <= set(
        inventory.groups
    )


@pytest.mark.parametrize(
    ("options", "hosts"),
    [
        ({"states": ["running"]}, {"api-1"}),
        ({"locations": ["local"]}, {"box-9"}),
        ({"networks": ["prod-lan"]}, {"api-1"}),
        ({"services": ["cache"], "service_hosts": False}, {"api-1"}),
    ],
)
def test_filters(options: dict[str, Any], hosts: set[str]) -> None:
    assert set(populate(**options).hosts) == hosts
