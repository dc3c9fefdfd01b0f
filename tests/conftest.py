"""Test-suite wide options.

- Slow tests (aarch64 under TCG) run only with --run-slow (the nightly job).
- --target NAME (repeatable) keeps only the tests parametrized with those targets
  (a `target_name` parameter); tests without that parameter are unaffected.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.baking"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (nightly)")
    parser.addoption(
        "--target",
        action="append",
        default=[],
        metavar="NAME",
        help="only run target-parametrized tests for this target (repeatable)",
    )


def _target_param(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    value = callspec.params.get("target_name")
    return value if isinstance(value, str) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted: list[str] = config.getoption("--target")
    if wanted:
        kept = [i for i in items if _target_param(i) in (None, *wanted)]
        deselected = [i for i in items if i not in kept]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = kept
    if not config.getoption("--run-slow"):
        skip = pytest.mark.skip(reason="slow: run with --run-slow (nightly)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
