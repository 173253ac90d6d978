"""Shared fixtures: a controllable clock and registries on real stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import Registry

from .helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture(params=["memory", "sqlite"])
def registry(request: pytest.FixtureRequest, db_path: Path, clock: FakeClock) -> Iterator[Registry]:
    """The same behaviour is required of both stores."""
    reg = Registry(clock=clock) if request.param == "memory" else Registry.with_persistence(db_path, clock=clock)
    yield reg
    reg.close()
