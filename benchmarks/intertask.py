"""Inter-task gap and throughput: this executor against the standard library's pools.

    python benchmarks/intertask.py [--rounds 5] [--chain 2000] [--wide 20000]

Every system runs the same task function, which stamps time.monotonic() (one clock for
all processes) when it starts and when it returns, so no system's bookkeeping can
flatter its figure:

- chain: N tasks, each submitted when the one before has finished; the gap is
  start(i+1) - end(i). Median and p99 per round.
- wide: N independent tasks on 2 workers; tasks/s = N / (last end - first start).
- pipe: the physical floor, a 1-byte round trip between two processes over os.pipe.

Systems: this executor (executor.engine.manager.run, 2 workers, log capture and lifecycle
events on), concurrent.futures.ProcessPoolExecutor, multiprocessing.Pool and, when it
is installed, Dask's local multiprocessing scheduler. Rounds interleave the systems;
the summary prints medians over rounds and ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from executor.engine.manager import RunConfig, run  # noqa: E402
from executor.pipeline import load_pipeline  # noqa: E402

WORKERS = 2
TASK_SOURCE = "import time\n\ndef stamp(ctx):\n    return [time.monotonic(), time.monotonic()]\n"

Spans = list[tuple[float, float]]


def stamp(*_: Any) -> tuple[float, float]:
    """The task every stdlib system runs (the executor's is the same, in TASK_SOURCE)."""
    return time.monotonic(), time.monotonic()


def chain_gaps(spans: Spans) -> list[float]:
    return [spans[i + 1][0] - spans[i][1] for i in range(len(spans) - 1)]


def throughput(spans: Spans) -> float:
    return len(spans) / (max(end for _, end in spans) - min(start for start, _ in spans))


# --- systems -------------------------------------------------------------------


def _pipeline_dir(workdir: Path, name: str, count: int, chained: bool) -> Path:
    root = workdir / name
    root.mkdir(exist_ok=True)
    tasks = [
        {"id": f"t{i}", "call": "bench:stamp", "after": [f"t{i - 1}"] if chained and i else []}
        for i in range(count)
    ]
    (root / "pipeline.json").write_text(json.dumps({"format": 1, "name": name, "tasks": tasks}))
    (root / "bench.py").write_text(TASK_SOURCE)
    return root


def executor_spans(workdir: Path, name: str, count: int, chained: bool) -> Spans:
    pipeline = load_pipeline(_pipeline_dir(workdir, name, count, chained))
    config = RunConfig(
        workers=WORKERS, run_id=name, node_id="bench", log_path=workdir / f"{name}.log"
    )
    results = run(pipeline, config)
    return [tuple(results["tasks"][f"t{i}"]["result"]) for i in range(count)]


def pool_executor_spans(count: int, chained: bool) -> Spans:
    with concurrent.futures.ProcessPoolExecutor(WORKERS) as pool:
        pool.submit(stamp).result()  # start the workers outside the measurement
        if chained:
            return [pool.submit(stamp).result() for _ in range(count)]
        return [f.result() for f in [pool.submit(stamp) for _ in range(count)]]


def mp_pool_spans(count: int, chained: bool) -> Spans:
    with multiprocessing.Pool(WORKERS) as pool:
        pool.apply(stamp)
        if chained:
            return [pool.apply(stamp) for _ in range(count)]
        return [r.get() for r in [pool.apply_async(stamp) for _ in range(count)]]


def dask_spans(count: int, chained: bool) -> Spans:
    import dask  # type: ignore[import-not-found]

    graph: dict[str, Any] = {}
    for i in range(count):
        graph[f"t{i}"] = (stamp, f"t{i - 1}") if chained and i else (stamp,)
    results = dask.get(graph, [f"t{i}" for i in range(count)], scheduler="processes",
                       num_workers=WORKERS)  # fmt: skip
    return list(results)


def pipe_round_trips(count: int) -> list[float]:
    """Round-trip times of one byte between two processes: the floor for any dispatch."""
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for _ in range(count):
            os.read(to_child_r, 1)
            os.write(to_parent_w, b"x")
        os._exit(0)
    trips = []
    for _ in range(count):
        started = time.perf_counter()
        os.write(to_child_w, b"x")
        os.read(to_parent_r, 1)
        trips.append(time.perf_counter() - started)
    os.waitpid(pid, 0)
    for fd in (to_child_r, to_child_w, to_parent_r, to_parent_w):
        os.close(fd)
    return trips


# --- the run -------------------------------------------------------------------


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chain", type=int, default=2000)
    parser.add_argument("--wide", type=int, default=20000)
    args = parser.parse_args()

    systems: dict[str, Callable[[Path, str, int, bool], Spans]] = {
        "executor": executor_spans,
        "ProcessPoolExecutor": lambda _w, _n, count, chained: pool_executor_spans(count, chained),
        "multiprocessing.Pool": lambda _w, _n, count, chained: mp_pool_spans(count, chained),
    }
    try:
        import dask  # noqa: F401

        systems["dask (processes)"] = lambda _w, _n, count, chained: dask_spans(count, chained)
    except ImportError:
        print("dask is not installed: skipped", file=sys.stderr)

    medians: dict[str, list[float]] = {name: [] for name in systems}
    p99s: dict[str, list[float]] = {name: [] for name in systems}
    rates: dict[str, list[float]] = {name: [] for name in systems}
    pipe: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-intertask-") as tmp:
        workdir = Path(tmp)
        for round_index in range(args.rounds):
            pipe.append(statistics.median(pipe_round_trips(5000)))
            for name, measure in systems.items():
                gaps = chain_gaps(measure(workdir, f"chain{round_index}", args.chain, True))
                medians[name].append(statistics.median(gaps))
                p99s[name].append(p99(gaps))
                spans = measure(workdir, f"wide{round_index}", args.wide, False)
                rates[name].append(throughput(spans))
                print(
                    f"round {round_index + 1}/{args.rounds} {name:22} chain median "
                    f"{medians[name][-1] * 1e6:8.1f} µs  p99 {p99s[name][-1] * 1e6:8.1f} µs  "
                    f"wide {rates[name][-1]:8.0f} tasks/s",
                    file=sys.stderr,
                )
    _summary(args, statistics.median(pipe), medians, p99s, rates)


def _summary(
    args: argparse.Namespace,
    pipe_rtt: float,
    medians: dict[str, list[float]],
    p99s: dict[str, list[float]],
    rates: dict[str, list[float]],
) -> None:
    ppe = statistics.median(medians["ProcessPoolExecutor"])
    print(f"\n{args.rounds} rounds, chain of {args.chain}, wide DAG of {args.wide}, "
          f"{WORKERS} workers, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"os.pipe round trip (floor): median {pipe_rtt * 1e6:.1f} µs\n")
    header = f"{'system':22} {'chain median':>13} {'chain p99':>11} {'x pipe RTT':>11} "
    print(header + f"{'PPE / this':>11} {'wide tasks/s':>13}")
    for name in medians:
        median = statistics.median(medians[name])
        print(
            f"{name:22} {median * 1e6:10.1f} µs {statistics.median(p99s[name]) * 1e6:8.1f} µs "
            f"{median / pipe_rtt:11.1f} {ppe / median:11.1f} {statistics.median(rates[name]):13.0f}"
        )


if __name__ == "__main__":
    main()
