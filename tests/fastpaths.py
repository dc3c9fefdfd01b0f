"""Run a test module's tests with the services' fast paths on and off.

Import `fastpaths` into a test module (an autouse fixture: each test runs twice, its id
ending in ``on`` or ``off``); mark a test that checks a fast path itself ``@ON_ONLY``,
one that checks that a fast path is off ``@OFF_ONLY``. The fixture sets
EXECUTOR_FASTPATHS for the services processes the test starts and re-reads it in this
process (and so in the workers it forks).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from executor import settings

MODES = ("on", "off")

ON_ONLY = pytest.mark.parametrize("fastpaths", ["on"], indirect=True)
"""Only with the fast paths on (a test of a fast path itself)."""
OFF_ONLY = pytest.mark.parametrize("fastpaths", ["off"], indirect=True)
"""Only with the fast paths off (a test that one really is off)."""


@pytest.fixture(autouse=True, params=MODES)
def fastpaths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """EXECUTOR_FASTPATHS for this test: "on" or "off"."""
    mode = str(request.param)
    monkeypatch.setenv("EXECUTOR_FASTPATHS", mode)
    settings.fastpaths_on.cache_clear()
    try:
        yield mode
    finally:
        settings.fastpaths_on.cache_clear()  # the environment is restored after this
