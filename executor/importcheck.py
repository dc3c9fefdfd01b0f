"""Checking a pipeline's task functions in a child process, within a time limit.

Importing a task module runs its code, which may print, hang, call `os._exit()` or leave
processes behind. Validation must survive all of that and say in one line what went
wrong, so the imports happen in a fresh interpreter (`python -m executor.importcheck`),
in a session of its own that is killed when the check ends. The child reads the root and
the tasks as JSON on stdin and reports on a pipe of its own, one JSON object per line:
`{"importing": CALL}` before each import, then `{"ok": true}` or `{"problem": TEXT}`.
What the modules print goes to stderr, never to the caller's stdout (which may be JSON).
"""

from __future__ import annotations

import inspect
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from executor.interpreter import child_env
from executor.settings import check_seconds

IMPORT_TIMEOUT_S = 60.0
"""Default of EXECUTOR_IMPORT_TIMEOUT_S: how long importing every task module may take."""

TaskCall = tuple[str, str, Mapping[str, Any]]
"""(task id, call, args) of one task."""


def timeout_from_env(env: Mapping[str, str]) -> float:
    """EXECUTOR_IMPORT_TIMEOUT_S, or the default; SettingsError (a ValueError) for a bad
    value."""
    raw = env.get("EXECUTOR_IMPORT_TIMEOUT_S", "").strip()
    return check_seconds("EXECUTOR_IMPORT_TIMEOUT_S", raw) if raw else IMPORT_TIMEOUT_S


def check_calls(root: Path, tasks: Sequence[TaskCall], timeout_s: float) -> str | None:
    """None when every task's call imports from `root` and accepts `fn(ctx, **args)`;
    otherwise the problem, one line."""
    request = json.dumps({"root": str(root), "tasks": [list(t) for t in tasks]})
    read_fd, write_fd = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", __name__, str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=sys.__stderr__.fileno() if sys.__stderr__ else subprocess.DEVNULL,
            pass_fds=(write_fd,),
            env=child_env(),
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as reports:
            assert child.stdin is not None
            with suppress(BrokenPipeError):  # a child that died at once says so below
                child.stdin.write(request.encode())
                child.stdin.close()
            return _outcome(child, reports, timeout_s)
    finally:
        with suppress(ProcessLookupError):  # the child and anything its imports started
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _outcome(child: subprocess.Popen[bytes], reports: IO[bytes], timeout_s: float) -> str | None:
    deadline = time.monotonic() + timeout_s
    importing = None
    with selectors.DefaultSelector() as selector:
        selector.register(reports, selectors.EVENT_READ)
        buffer = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                where = f" (importing {importing})" if importing else ""
                limit = f"{timeout_s:g} s (EXECUTOR_IMPORT_TIMEOUT_S)"
                return f"the task modules did not import within {limit}{where}"
            chunk = os.read(reports.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                message = json.loads(line)
                if "importing" in message:
                    importing = message["importing"]
                elif "problem" in message:
                    return str(message["problem"])
                else:
                    return None
    code = child.wait()
    ended = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    where = f"importing {importing}" if importing else "starting"
    return f"the check ended ({ended}) while {where}: the module ends the process"


# -- the child ------------------------------------------------------------------------------


def _main(report_fd: int) -> int:
    from executor.pipeline import import_call  # the child's only executor import

    request = json.load(sys.stdin)
    sys.path.insert(0, request["root"])
    report = os.fdopen(report_fd, "w", buffering=1)
    checked: dict[str, inspect.Signature | None] = {}
    for task_id, call, args in request["tasks"]:
        label = f"task {task_id!r}: {call}"
        if call not in checked:
            report.write(json.dumps({"importing": call}) + "\n")
            try:
                checked[call] = _signature(import_call(call))
            except (Exception, SystemExit) as exc:
                problem = f"{label}: cannot import: {type(exc).__name__}: {_first_line(exc)}"
                report.write(json.dumps({"problem": problem}) + "\n")
                return 0
        signature = checked[call]
        try:
            if signature is not None:
                signature.bind(None, **args)
        except TypeError as exc:
            problem = f"{label}: does not accept fn(ctx, **args): {exc}"
            report.write(json.dumps({"problem": problem}) + "\n")
            return 0
    report.write('{"ok": true}\n')
    return 0


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # Some C callables have no signature to check against.


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


if __name__ == "__main__":
    sys.exit(_main(int(sys.argv[1])))
