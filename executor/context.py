"""The ``ctx`` object every task function receives as its first argument."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from executor.services.events import Events
from executor.services.store import Store


@dataclass(slots=True)  # built for every task: keep it cheap
class TaskContext:
    """What a task knows about its run (docs/reference/task-context.md)."""

    task_id: str
    attempt: int
    """1-based; 2 and more are retries."""
    run_id: str
    node_id: str
    upstream: Mapping[str, Any]
    """Results of the tasks in ``after`` (None for one that did not succeed)."""
    store: Store
    """The run's shared store."""
    events: Events
    """The run's event system."""
    log: logging.Logger
    """Records go into the combined log as ``task:<id> log``."""
