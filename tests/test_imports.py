"""The light client: ``import registry.client`` (all the Ansible controller needs) loads no server side."""

from __future__ import annotations

import subprocess
import sys

import pytest

import registry

SERVER_SIDE = ("sqlitedict", "netaddr", "cryptography", "prometheus_client", "ansible_runner")


def imported_by(statement: str) -> set[str]:
    """Top-level modules a fresh interpreter imports for ``statement`` (from ``-X importtime``)."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True, check=True
    )
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in run.stderr.splitlines() if "|" in line}


@pytest.mark.parametrize("statement", ["import registry.client", "import registry.protocol", "import registry"])
def test_the_client_side_loads_no_server_side(statement: str) -> None:
    assert imported_by(statement).isdisjoint(SERVER_SIDE)


def test_every_public_name_is_importable() -> None:
    for name in registry.__all__:
        assert getattr(registry, name) is not None, name
    assert set(dir(registry)) == set(registry.__all__)
