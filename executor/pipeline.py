"""Pipeline artifact (format 1): load a directory or ``.tar.gz``, validate it, model it.

Everything is checked before any task runs: JSON syntax, keys and their types, ids,
``after`` references, cycles, ``call`` syntax, and that every call imports and accepts
its ``args``. The first problem found raises PipelineError, whose str() is one line naming
the file and the problem.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from executor.archive import ArchiveError, ArchiveLimits, extract
from executor.importcheck import check_calls, timeout_from_env
from executor.requirements import (
    REQUIREMENTS_FILE,
    Declared,
    RequirementsError,
    check_debian_packages,
    parse_requirements,
    unmet,
)

FORMAT = 1
MANIFEST = "pipeline.json"
TRIGGERS = ("all_success", "all_done")
DEFAULT_RETRY_DELAY = 1.0

_ID = re.compile(r"[A-Za-z0-9_.-]+")
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_CALL = re.compile(rf"({_DOTTED}):({_DOTTED})")

_TOP_KEYS = {
    "format": True,
    "name": True,
    "defaults": False,
    "tasks": True,
    "debian_packages": False,
}
_TASK_KEYS = {"id", "call", "args", "after", "retries", "retry_delay", "timeout", "trigger"}
_DEFAULT_KEYS = {"retries", "retry_delay", "timeout", "trigger"}


class PipelineError(Exception):
    """An invalid pipeline; str() is one line: ``<file>: <problem>``."""

    def __init__(self, where: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"{os.fspath(where)}: {problem}")


class MissingRequirements(PipelineError):
    """Declared requirements this Python lacks; ``lines`` has one line per package."""

    def __init__(self, where: str | os.PathLike[str], problems: list[str]) -> None:
        self.lines = [f"{os.fspath(where)}: {problem}" for problem in problems]
        super().__init__(where, "; ".join(problems))


@dataclass(frozen=True)
class Task:
    """One node of the DAG, with the pipeline defaults already applied."""

    id: str
    call: str
    """``"module:function"``; the function is called as ``fn(ctx, **args)``."""
    args: Mapping[str, Any]
    after: tuple[str, ...]
    """Ids this task waits for."""
    retries: int
    retry_delay: float
    """Seconds before the first retry; doubles with each further attempt."""
    timeout: float | None
    """Seconds per attempt, after which the task's process group is killed."""
    trigger: str
    """``all_success`` or ``all_done``."""


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline. ``root`` goes first on ``sys.path`` in every worker."""

    name: str
    root: Path
    tasks: Mapping[str, Task]
    """Tasks by id, in file order."""
    source: Path
    """The directory or archive it was loaded from (for messages)."""
    requirements: tuple[Declared, ...] = ()
    """requirements.txt, parsed (empty without one)."""
    debian_packages: tuple[str, ...] = ()
    """Debian packages its environment must carry (pipeline.json `debian_packages`)."""
    imports_checked: bool = True
    """False when the task modules were not imported because this Python lacks
    declared requirements (load_pipeline(..., imports="when-installed"))."""


Imports = Literal["check", "when-installed"]


def load_pipeline(
    path: str | os.PathLike[str],
    limits: ArchiveLimits | None = None,
    imports: Imports = "check",
) -> Pipeline:
    """Load and fully validate a pipeline directory, its pipeline.json, or a ``.tar.gz``.

    An archive is unpacked within ``limits``, by default those of the environment
    (EXECUTOR_PIPELINE_MAX_*). Task modules are imported to check the calls; when this
    Python lacks declared requirements, that raises MissingRequirements, or with
    ``imports="when-installed"`` (a host that only packs or bakes the pipeline) skips
    the import check and says so in ``imports_checked``."""
    source = Path(path)
    if not source.exists():
        raise PipelineError(source, "no such file or directory")
    if source.is_dir():
        return _load_root(source, source / MANIFEST, source, imports)
    if source.name == MANIFEST:
        return _load_root(source.parent, source, source, imports)
    if limits is None:
        try:
            limits = ArchiveLimits.from_env(os.environ)
        except ValueError as exc:
            raise PipelineError(source, str(exc)) from None
    root = _extract_archive(source, limits)
    try:
        pipeline = _load_root(root, root / MANIFEST, source, imports)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    # The extracted copy lives as long as the Pipeline object that points at it.
    weakref.finalize(pipeline, shutil.rmtree, root, True)
    return pipeline


def import_call(call: str) -> Callable[..., Any]:
    """Resolve ``"package.module:attr.path"`` to the callable it names."""
    match = _CALL.fullmatch(call)
    if match is None:
        raise ValueError(f"malformed call {call!r} (expected 'module:function')")
    target: Any = importlib.import_module(match[1])
    for attr in match[2].split("."):
        target = getattr(target, attr)
    if not callable(target):
        raise TypeError(f"{call} is not callable")
    return target  # type: ignore[no-any-return]


def _extract_archive(archive: Path, limits: ArchiveLimits) -> Path:
    if not archive.is_file():
        raise PipelineError(archive, "not a directory, pipeline.json or .tar.gz archive")
    root = Path(tempfile.mkdtemp(prefix="executor-pipeline-"))
    try:
        extract(archive, root, limits)
    except ArchiveError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise PipelineError(archive, str(exc)) from None
    except OSError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise PipelineError(archive, f"cannot unpack: {exc.strerror or exc}") from None
    if not (root / MANIFEST).is_file():
        shutil.rmtree(root, ignore_errors=True)
        raise PipelineError(archive, f"{MANIFEST} is missing at the archive root")
    return root


def _load_root(root: Path, manifest: Path, source: Path, imports: Imports) -> Pipeline:
    where = source if source.suffix == ".gz" else manifest
    document = _read_json(manifest, where)
    name, tasks = _parse_document(document, where)
    try:
        debian = check_debian_packages(document.get("debian_packages", []))
    except RequirementsError as exc:
        raise PipelineError(where, str(exc)) from None
    _check_graph(tasks, where)
    requirements = _read_requirements(root / REQUIREMENTS_FILE, source)
    missing = unmet(requirements)
    if missing and imports == "check":
        raise MissingRequirements(_requirements_where(root, source), missing)
    if not missing:
        _check_calls(tasks, root.resolve(), where)
    return Pipeline(
        name=name,
        root=root.resolve(),
        tasks=tasks,
        source=source,
        requirements=requirements,
        debian_packages=debian,
        imports_checked=not missing,
    )


def _requirements_where(root: Path, source: Path) -> Path:
    """requirements.txt as the user knows it: in their directory, or in the archive."""
    return source if source.suffix == ".gz" else root / REQUIREMENTS_FILE


def _read_requirements(path: Path, source: Path) -> tuple[Declared, ...]:
    where = _requirements_where(path.parent, source)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise PipelineError(where, f"cannot read {REQUIREMENTS_FILE}: {exc.strerror}") from None
    try:
        return parse_requirements(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PipelineError(where, f"{REQUIREMENTS_FILE} is not UTF-8 text") from None
    except RequirementsError as exc:
        label = f"{REQUIREMENTS_FILE} " if source.suffix == ".gz" else ""
        raise PipelineError(where, f"{label}{exc}") from None


def _read_json(manifest: Path, where: Path) -> Any:
    try:
        raw = manifest.read_bytes()
    except OSError as exc:
        raise PipelineError(where, f"cannot read {MANIFEST}: {exc.strerror}") from None
    if not raw.strip():
        raise PipelineError(where, f"{MANIFEST} is empty")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise PipelineError(where, f"{MANIFEST} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        problem = f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise PipelineError(where, problem) from None
    except ValueError as exc:
        raise PipelineError(where, f"invalid JSON: {exc}") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice in one object")
        result[key] = value
    return result


def _parse_document(document: Any, where: Path) -> tuple[str, dict[str, Task]]:
    top = _expect_object(document, "the top level", where)
    for key in top:
        if key not in _TOP_KEYS:
            raise PipelineError(where, f"unknown top-level key {key!r}")
    for key, required in _TOP_KEYS.items():
        if required and key not in top:
            raise PipelineError(where, f"missing top-level key {key!r}")
    if top["format"] != FORMAT or isinstance(top["format"], bool):
        raise PipelineError(where, f"unsupported format {top['format']!r} (supported: {FORMAT})")
    name = top["name"]
    if not isinstance(name, str) or not _ID.fullmatch(name):
        raise PipelineError(where, f"'name' must be a string of [A-Za-z0-9_.-], not {name!r}")
    defaults = _expect_object(top.get("defaults", {}), "'defaults'", where)
    for key in defaults:
        if key not in _DEFAULT_KEYS:
            raise PipelineError(where, f"unknown key {key!r} in 'defaults'")
    entries = top["tasks"]
    if not isinstance(entries, list) or not entries:
        raise PipelineError(where, "'tasks' must be a non-empty list")
    tasks: dict[str, Task] = {}
    for index, entry in enumerate(entries):
        task = _parse_task(entry, index, defaults, where)
        if task.id in tasks:
            raise PipelineError(where, f"duplicate task id {task.id!r}")
        tasks[task.id] = task
    return name, tasks


def _parse_task(entry: Any, index: int, defaults: dict[str, Any], where: Path) -> Task:
    label = f"task #{index + 1}"
    raw = _expect_object(entry, label, where)
    task_id = raw.get("id")
    if not isinstance(task_id, str) or not _ID.fullmatch(task_id):
        raise PipelineError(where, f"{label}: 'id' must be a string of [A-Za-z0-9_.-]")
    label = f"task {task_id!r}"
    for key in raw:
        if key not in _TASK_KEYS:
            raise PipelineError(where, f"{label}: unknown key {key!r}")
    call = raw.get("call")
    if not isinstance(call, str) or not _CALL.fullmatch(call):
        raise PipelineError(where, f"{label}: 'call' must be 'module:function', not {call!r}")
    args = _expect_object(raw.get("args", {}), f"{label}: 'args'", where)
    after = raw.get("after", [])
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        raise PipelineError(where, f"{label}: 'after' must be a list of task ids")
    if len(set(after)) != len(after):
        raise PipelineError(where, f"{label}: 'after' lists a task twice")
    merged: dict[str, Any] = {"retries": 0, "retry_delay": DEFAULT_RETRY_DELAY, "timeout": None}
    merged |= {"trigger": TRIGGERS[0]} | defaults | raw
    retries, delay, timeout = merged["retries"], merged["retry_delay"], merged["timeout"]
    if not _is_int(retries) or retries < 0:
        raise PipelineError(where, f"{label}: 'retries' must be an integer >= 0")
    if not _is_number(delay) or delay < 0:
        raise PipelineError(where, f"{label}: 'retry_delay' must be a number >= 0")
    if timeout is not None and (not _is_number(timeout) or timeout <= 0):
        raise PipelineError(where, f"{label}: 'timeout' must be a number > 0 or null")
    if merged["trigger"] not in TRIGGERS:
        choices = " or ".join(TRIGGERS)
        raise PipelineError(where, f"{label}: 'trigger' must be {choices}")
    return Task(
        id=task_id,
        call=call,
        args=args,
        after=tuple(after),
        retries=retries,
        retry_delay=float(delay),
        timeout=None if timeout is None else float(timeout),
        trigger=merged["trigger"],
    )


def _expect_object(value: Any, label: str, where: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PipelineError(where, f"{label} must be a JSON object")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_graph(tasks: Mapping[str, Task], where: Path) -> None:
    for task in tasks.values():
        for upstream in task.after:
            if upstream not in tasks:
                raise PipelineError(where, f"task {task.id!r}: 'after' names unknown {upstream!r}")
    cycle = find_cycle(tasks)
    if cycle:
        raise PipelineError(where, f"dependency cycle: {' -> '.join(cycle)}")


def find_cycle(tasks: Mapping[str, Task]) -> list[str]:
    """A dependency cycle as ``[a, b, ..., a]``, or ``[]`` when the graph is a DAG."""
    done: set[str] = set()
    for start in tasks:
        if start in done:
            continue
        # Iterative depth-first search; `path` is the current chain of `after` links.
        path: list[str] = [start]
        on_path = {start}
        stack: list[Iterator[str]] = [iter(tasks[start].after)]
        while stack:
            upstream = next(stack[-1], None)
            if upstream is None:
                stack.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif upstream in on_path:
                return path[path.index(upstream) :] + [upstream]
            elif upstream not in done:
                path.append(upstream)
                on_path.add(upstream)
                stack.append(iter(tasks[upstream].after))
    return []


def _check_calls(tasks: Mapping[str, Task], root: Path, where: Path) -> None:
    try:
        timeout_s = timeout_from_env(os.environ)
    except ValueError as exc:
        raise PipelineError(where, str(exc)) from None
    calls = [(task.id, task.call, task.args) for task in tasks.values()]
    problem = check_calls(root, calls, timeout_s)
    if problem is not None:
        raise PipelineError(where, problem)
