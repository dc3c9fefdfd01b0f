"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import fleet
from tests.integration.services_harness import ServerProcess


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A master on loopback, its secret and admin token ready before it starts."""
    proc = fleet.prepared_server(tmp_path / "master").start()
    yield proc
    proc.stop()
