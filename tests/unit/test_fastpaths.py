"""EXECUTOR_FASTPATHS: how it is read (executor/settings.py), and spinning without it
(executor/contention.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from executor import settings
from executor.contention import spin_poll
from executor.settings import SettingsError


@pytest.mark.parametrize(
    ("env", "on"),
    [({}, True), ({"EXECUTOR_FASTPATHS": ""}, True), ({"EXECUTOR_FASTPATHS": "on"}, True)]
    + [({"EXECUTOR_FASTPATHS": "off"}, False)],
)
def test_the_switch_is_on_unless_off(env: dict[str, str], on: bool) -> None:
    assert settings.fastpaths(env) is on


@pytest.mark.parametrize("value", ["OFF", "0", "false", " off", "yes"])
def test_any_other_value_is_one_line_naming_the_variable(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings.fastpaths({"EXECUTOR_FASTPATHS": value})
    assert str(caught.value) == f"EXECUTOR_FASTPATHS: {value!r} is neither 'on' nor 'off'"


@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The process-wide reading, forgotten before and after the test."""
    settings.fastpaths_on.cache_clear()
    yield monkeypatch
    settings.fastpaths_on.cache_clear()


def test_a_process_reads_the_switch_once(switch: pytest.MonkeyPatch) -> None:
    switch.setenv("EXECUTOR_FASTPATHS", "off")
    assert settings.fastpaths_on() is False
    switch.setenv("EXECUTOR_FASTPATHS", "on")
    assert settings.fastpaths_on() is False, "read at the first call only"
    pid = os.fork()
    if pid == 0:  # a forked worker inherits the answer
        os._exit(0 if settings.fastpaths_on() is False else 1)
    assert os.waitpid(pid, 0)[1] == 0


@pytest.mark.parametrize("mode", ["on", "off"])
def test_spin_poll_spins_only_with_the_fast_paths_on(switch: pytest.MonkeyPatch, mode: str) -> None:
    switch.setenv("EXECUTOR_FASTPATHS", mode)
    looks: list[float] = []

    def poll(timeout: float) -> list[tuple[int, int]]:
        looks.append(timeout)
        return []

    started = time.perf_counter()
    assert spin_poll(poll, 0.05) == []
    took = time.perf_counter() - started
    if mode == "on":
        assert len(looks) > 1 and set(looks) == {0} and took >= 0.05
    else:
        assert looks == [] and took < 0.05, "no look at all: the caller sleeps at once"
