"""Group names are valid Ansible group names, whatever the registry name holds."""

from __future__ import annotations

import re

import pytest

from ansible_collections.svcreg.registry.plugins.module_utils.groups import group_name


@pytest.mark.parametrize(
    ("prefix", "name", "expected"),
    [
        ("service", "api-server", "service_api_server"),
        ("network", "edge.eu", "network_edge_eu"),
        ("network", "prod_1", "network_prod_1"),
        ("network", "10-net", "network_10_net"),
    ],
)
def test_group_name(prefix: str, name: str, expected: str) -> None:
    assert group_name(prefix, name) == expected
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", expected)
