"""Real pipelines on disk for the executor's integration tests, and helpers to run them.

TASK_CODE is the module every test pipeline calls into (as ``tasks:<function>``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from executor.engine.manager import RunConfig, run
from executor.pipeline import load_pipeline

TASK_CODE = r'''
import ctypes
import os
import signal
import subprocess
import sys
import time


def echo(ctx, value=None):
    return {"task": ctx.task_id, "value": value, "upstream": dict(ctx.upstream)}


def add(ctx, n=1):
    return sum(v for v in ctx.upstream.values() if v is not None) + n


def fields(ctx):
    return [ctx.task_id, ctx.attempt, ctx.run_id, ctx.node_id, os.getpid()]


def flaky(ctx, succeed_on=2):
    if ctx.attempt < succeed_on:
        raise RuntimeError(f"attempt {ctx.attempt} fails")
    return ctx.attempt


def fail(ctx):
    raise ValueError("always fails")


def not_json(ctx):
    return {1, 2}


def not_a_number(ctx):
    return [1.0, float("nan")]


def odd_strings(ctx):
    return {"lone \ud800": "a\udfffb", "pair": "\U0001F600"}


def env(ctx, name):
    return os.environ.get(name)


def sleep_with_grandchild(ctx, pidfile, seconds=300, ignore_term=False):
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen(["sh", "-c", f"sleep {seconds} & echo $! > {pidfile}.tmp; "
                      f"mv {pidfile}.tmp {pidfile}; wait"])
    time.sleep(seconds)


def cancel_run(ctx, pidfile, ignore_term=False):
    """Wait for the grandchild of another task, then SIGTERM the manager (our parent)."""
    while not os.path.exists(pidfile):
        time.sleep(0.01)
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(300)


def crash_sigkill(ctx):
    os.kill(os.getpid(), signal.SIGKILL)


def crash_segfault(ctx):
    ctypes.string_at(0)


def crash_exit(ctx):
    os._exit(7)


def crash_mid_line(ctx):
    sys.stdout.write("complete line\npartial line without newline")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def print_lines(ctx, count, tag="line"):
    for i in range(count):
        print(tag, i)
    return count


def all_sources(ctx):
    print("from print")
    sys.stdout.write("from sys.stdout\n")
    sys.stderr.write("from sys.stderr\n")
    os.write(1, b"from os.write 1\n")
    os.write(2, b"from os.write 2\n")
    ctypes.CDLL(None).puts(b"from libc puts")
    subprocess.run(["sh", "-c", "echo from child out; echo from child err >&2"], check=True)
    ctx.log.info("from ctx.log")
    print("partial at the end", end="")


def break_streams(ctx):
    sys.stderr.close()
    sys.stdout = open(os.devnull, "w")
    raise ValueError("streams broken")


def print_own(ctx, count):
    for i in range(count):
        print(ctx.task_id, i)
    sys.stdout.write(f"{ctx.task_id} partial")
    return ctx.task_id


def store_incr(ctx, key, times):
    for _ in range(times):
        ctx.store.incr(key)
    return ctx.store[key] if key in ctx.store else None


def store_read(ctx, key):
    return ctx.store.get(key)


def store_write_many(ctx, prefix, count):
    for i in range(count):
        ctx.store[f"{prefix}{i}"] = i
    return count


def store_read_many(ctx, prefix, count):
    return [ctx.store.get(f"{prefix}{i}") for i in range(count)]


def wait_event(ctx, topic, timeout=None):
    return ctx.events.wait(topic, timeout=timeout)


def publish_event(ctx, topic, payload):
    ctx.events.publish(topic, payload)
    return payload


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def freed_heap_after(ctx, size):
    """Free bytes glibc's heap keeps after a block of `size` bytes is freed."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    block = bytearray(size)
    del block
    return libc.mallinfo2().fordblks


def lifecycle_watcher(ctx, task_id):
    return ctx.events.wait("executor.task.finished", timeout=60)


def _write_pid(pidfile, pid):
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(pid))
    os.rename(pidfile + ".tmp", pidfile)


def die_leaving_child(ctx, pidfile, how="exit"):
    """Fork a child that keeps the worker's pipes open, then end the worker."""
    child = os.fork()
    if child == 0:
        time.sleep(300)
        os._exit(0)
    _write_pid(pidfile, child)
    if how == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)


def daemonize(ctx, pidfile):
    """Start a daemon as daemons start: setsid and a double fork; return at once."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            _write_pid(pidfile, os.getpid())
            time.sleep(300)
            os._exit(0)
        os._exit(0)
    deadline = time.monotonic() + 30
    while not os.path.exists(pidfile) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "started"
'''


def task(task_id: str, call: str, after: Sequence[str] = (), **fields: Any) -> dict[str, Any]:
    """One task entry of pipeline.json (``call`` is a function name in TASK_CODE)."""
    return {"id": task_id, "call": f"tasks:{call}", "after": list(after), **fields}


def make_pipeline(root: Path, tasks: list[dict[str, Any]], name: str = "test") -> Path:
    """Write a pipeline directory (pipeline.json + tasks.py) at ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    document = {"format": 1, "name": name, "tasks": tasks}
    (root / "pipeline.json").write_text(json.dumps(document, indent=1))
    (root / "tasks.py").write_text(TASK_CODE)
    return root


def run_pipeline(
    path: Path, workdir: Path, workers: int = 2, **config: Any
) -> tuple[dict[str, Any], str]:
    """Run in this process through executor.engine.manager; return the results and the log text."""
    log_path = workdir / "combined.log"
    run_config = RunConfig(
        workers=workers,
        run_id="test-run",
        node_id="test-node",
        log_path=log_path,
        results_path=workdir / "results.json",
        **config,
    )
    results = run(load_pipeline(path), run_config)
    assert json.loads((workdir / "results.json").read_text()) == results
    return results, log_path.read_text()


def statuses(results: dict[str, Any]) -> dict[str, str]:
    return {task_id: entry["status"] for task_id, entry in results["tasks"].items()}
