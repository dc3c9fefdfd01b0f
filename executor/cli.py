"""The ``executor`` command (argparse: the executor's only runtime dependencies are the
standard library and tenacity).

Exit codes (every error is one ``Error: ...`` line on stderr; ``--debug`` adds the traceback
of an OS error or an interrupt): 0 success; 1 a task failed, the run was cancelled, its
store and events failed, or the reader of stdout stopped early (then nothing is said);
2 invalid pipeline, setting or usage; 3 only ``agent``: report refused or not delivered;
4 a file could not be read or written (an OS error), the same code as ``imagefactory``'s
for a failing host; 130 interrupted outside a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from executor import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_OS, EXIT_INTERRUPTED = 4, 130  # 3 is the agent's (executor/agent/main.py)


class UsageError(Exception):
    """A user error: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="executor",
        description="Load, validate, pack and run pipeline DAGs (pipeline format 1).",
        epilog="exit status: 0 success, 1 a task failed or the run was cancelled, 2 invalid "
        "pipeline, setting or usage, 3 (agent) report not delivered, 4 a file could not be "
        "read or written, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"executor {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an OS error or an interrupt (other errors stay one line)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a pipeline on a pool of worker processes",
        description="Run PIPELINE (a directory or .tar.gz). Exit 0 when every task "
        "succeeded, 1 when a task failed or the run was cancelled (SIGTERM/SIGINT), 2 for "
        "an invalid pipeline. Environment: EXECUTOR_NODE_ID, EXECUTOR_RUN_ID, "
        "EXECUTOR_WORKERS, EXECUTOR_STATE_DIR (options override them).",
    )
    run.add_argument("pipeline", metavar="PIPELINE", help="pipeline directory or .tar.gz")
    run.add_argument("--workers", metavar="N", help="worker processes (default: CPU count)")
    run.add_argument("--results", metavar="FILE", type=Path, help="write the results JSON here")
    run.add_argument(
        "--log",
        metavar="FILE",
        type=Path,
        help="combined log file (default: STATE_DIR/logs/RUN_ID.log)",
    )
    run.add_argument("--node-id", metavar="ID", help="node id (default: EXECUTOR_NODE_ID)")
    run.add_argument("--run-id", metavar="ID", help="run id (default: EXECUTOR_RUN_ID)")
    run.add_argument(
        "--start-method",
        choices=("fork", "forkserver", "spawn"),
        help="how worker processes are started (default: the platform's)",
    )
    run.add_argument(
        "--no-prefetch",
        dest="prefetch",
        action="store_false",
        help="never queue a task behind a running one (strict ready-queue order)",
    )
    run.add_argument("--json", action="store_true", help="print the results JSON on stdout")
    run.set_defaults(handler=_run)

    validate = commands.add_parser(
        "validate",
        help="check a pipeline without running it",
        description="Validate PIPELINE (a directory or .tar.gz): exit 0, or 2 with the problem.",
    )
    validate.add_argument("pipeline", metavar="PIPELINE")
    validate.add_argument("--json", action="store_true", help="print name and task ids as JSON")
    validate.set_defaults(handler=_validate)

    pack = commands.add_parser(
        "pack",
        help="validate a pipeline directory and pack it into a .tar.gz",
        description="Validate DIR and write it as a reproducible .tar.gz with pipeline.json "
        "at the archive root; print the archive's sha256.",
    )
    pack.add_argument("directory", metavar="DIR")
    pack.add_argument("-o", "--output", metavar="FILE", required=True, type=Path)
    pack.set_defaults(handler=_pack)

    # Everything after "agent" is the agent's own command line (prefix_chars: no options here).
    agent = commands.add_parser(
        "agent",
        add_help=False,
        prefix_chars="\0",
        help="service mode inside images (see 'executor agent --help')",
    )
    agent.add_argument("agent_args", nargs="*")
    agent.set_defaults(handler=_agent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    debug = False
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        code: int = args.handler(args)
        return code
    except KeyboardInterrupt:
        return _unexpected("interrupted", EXIT_INTERRUPTED, debug)
    except Exception as exc:
        return _error_exit(exc, debug)


def _error_exit(exc: Exception, debug: bool) -> int:
    """One line and the exit code for an error of the caller's or the host's making; any
    other exception is a bug and propagates with its traceback."""
    # Imported here, not at the top: `executor agent` executes itself once more before it
    # imports anything heavy (executor/agent/secret.py), and every import counts at boot.
    try:
        from executor.pipeline import MissingRequirements, PipelineError
        from executor.services.wire import ServiceError
    except ImportError:  # a broken installation: the error at hand is the one to show
        raise exc from None

    if isinstance(exc, BrokenPipeError) and _stdout_closed():
        return _reader_gone()
    if isinstance(exc, MissingRequirements):
        for line in exc.lines:
            print(f"Error: {line}", file=sys.stderr)
        print(f"(install them into {sys.executable}; executor installs nothing)", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, (UsageError, PipelineError)):
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, ServiceError):
        print(f"Error: the run's store and events failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        text = f"{where}: {exc.strerror}" if where is not None and exc.strerror else str(exc)
        return _unexpected(text, EXIT_OS, debug)
    raise exc


def _stdout_closed() -> bool:
    """Whether whoever read standard output has closed it (`executor ... | head`), rather
    than some other pipe breaking: the write end of a pipe without a reader polls POLLERR."""
    import select

    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _reader_gone() -> int:
    """Exit quietly, as `imagefactory` (click) does: the reader wanted no more. Standard
    output now writes to /dev/null, so that the flush at exit does not fail again."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_FAILED


def _unexpected(message: str, code: int, debug: bool) -> int:
    """An error that is no bug of the caller's: the traceback only on request."""
    if debug:
        traceback.print_exc()
    print(f"Error: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    from executor import settings
    from executor.engine.combined_log import truncation
    from executor.engine.manager import RunConfig, run
    from executor.pipeline import load_pipeline

    try:
        node_id = settings.check_id("--node-id", args.node_id or settings.node_id())
        run_id = settings.check_id("--run-id", args.run_id or settings.run_id())
        workers = (
            settings.check_count("--workers", args.workers)
            if args.workers is not None
            else settings.workers()
        )
        log_path = (args.log or settings.state_dir() / "logs" / f"{run_id}.log").absolute()
        settings.fastpaths()  # checked with the other settings: a bad value is a usage error
    except settings.SettingsError as exc:
        raise UsageError(str(exc)) from None
    pipeline = load_pipeline(args.pipeline)
    config = RunConfig(
        workers=workers,
        run_id=run_id,
        node_id=node_id,
        log_path=log_path,
        results_path=args.results,
        start_method=args.start_method,
        prefetch=args.prefetch,
    )
    results = run(pipeline, config, on_progress=_progress_printer())
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        counts: dict[str, int] = {}
        for task in results["tasks"].values():
            counts[task["status"]] = counts.get(task["status"], 0) + 1
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        print(f"run {run_id} {results['status']}: {summary}; log: {log_path}")
    if (why := truncation(log_path)) is not None:  # the run went on without part of its log
        print(f"Error: {log_path}: the combined log is incomplete: {why}", file=sys.stderr)
        return EXIT_OS
    return EXIT_OK if results["status"] == "succeeded" else EXIT_FAILED


def _progress_printer() -> Callable[[int, int], None] | None:
    """Progress on stderr when it is a terminal: ``[done/total]`` rewritten in place."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r[{done}/{total} tasks]", end=end, file=sys.stderr, flush=True)

    return show


def _validate(args: argparse.Namespace) -> int:
    from executor.pipeline import load_pipeline

    pipeline = load_pipeline(args.pipeline)
    if args.json:
        document = {
            "name": pipeline.name,
            "tasks": list(pipeline.tasks),
            "requirements": [str(r) for r in pipeline.requirements],
            "debian_packages": list(pipeline.debian_packages),
        }
        print(json.dumps(document))
    else:
        print(f"ok: pipeline {pipeline.name}, {len(pipeline.tasks)} tasks")
    return EXIT_OK


def _agent(args: argparse.Namespace) -> int:
    from executor.agent.secret import reexec_without_token

    reexec_without_token()  # the token must not stay in /proc/PID/environ
    # Only now: what was imported before the re-execution would be imported twice.
    from executor.agent.main import main as agent_main

    return agent_main(args.agent_args)


def _pack(args: argparse.Namespace) -> int:
    from executor.pack import pack

    print(pack(args.directory, args.output))
    return EXIT_OK
