"""Shared store throughput: executor run services vs `multiprocessing.Manager().dict()`.

For get, get-miss, set and incr, 1 and then 2 client processes (fork) hammer the store
for a fixed time per round; a round's figure is the ops/s of each client (ops /
elapsed), and the median over the rounds is printed with the ratio to the Manager dict.
The peers take turns within each round (in a rotating order), so a load that drifts
during the run hits them alike.
`get` reads one unchanged key, which the executor answers from its validated per-process
cache; `get-miss` reads a new (absent) key each time, which always costs a round trip.
The Manager dict has no atomic incr: it is measured as `d[k] = d.get(k, 0) + 1` (not
atomic, two round trips), which flatters the peer. A bare Python echo over AF_UNIX (one
send, one recv, no work) runs alongside as the floor: what one round trip costs here now.
Then the set-then-get round trip of a 1 MiB and a 16 MiB bytes value, median over
many repetitions, for the executor and the Manager dict. The clients stand in for task
code, so this process runs with a worker's malloc settings (executor/engine/malloc.py), which
the Manager dict's client, in the same process, gets as well. The executor answers a
process's read of its own write from that process's memory; so the same size is also
handed over: set here, get in another process (a round trip through the services).

    .venv/bin/python benchmarks/store.py               # 5 rounds x 1 s per cell
    .venv/bin/python benchmarks/store.py --rounds 3 --seconds 0.5 --json

Goals (issue 3): >= 30,000 ops/s per client, >= 3x Manager dict, 1 MiB round trip < 1 ms.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from executor.engine.malloc import keep_freed_memory  # noqa: E402
from executor.services.server import RunServices, connect  # noqa: E402

VALUE = {"id": 12345, "name": "x" * 64, "tags": ["a", "b"]}
"""A small, typical value (~120 bytes pickled)."""

OPS = ("get", "get-miss", "set", "incr")
CTX = multiprocessing.get_context("fork")


def op_function(store: Any, op: str, native_incr: bool) -> Callable[[], object]:
    """One operation on `store` as a no-argument call."""
    if op == "get":
        return lambda: store["item"]
    if op == "get-miss":  # a new key every time: never cached
        keys = (f"absent-{i}" for i in itertools.count())
        return lambda: store.get(next(keys))
    if op == "set":
        return lambda: store.__setitem__("item", VALUE)
    if native_incr:
        return lambda: store.incr("counter")
    return lambda: store.__setitem__("counter", store.get("counter", 0) + 1)


def run_client(
    open_store: Callable[[], Any], op: str, seconds: float, start: Any, out: Any
) -> None:
    """Child process: wait for the start barrier, run `op` for `seconds`, report ops/s."""
    store = open_store()
    call = op_function(store, op, native_incr=hasattr(store, "incr"))
    for _ in range(200):  # warm up the connection and caches
        call()
    start.wait()
    count, began = 0, time.perf_counter()
    deadline = began + seconds
    while True:
        for _ in range(100):
            call()
        count += 100
        if time.perf_counter() >= deadline:
            break
    if hasattr(store, "settle"):
        store.settle()  # the executor's writes count once applied, not once sent
    out.put(count / (time.perf_counter() - began))


def measure(open_store: Callable[[], Any], op: str, clients: int, seconds: float) -> list[float]:
    """Per-client ops/s of one round with `clients` concurrent processes."""
    start, out = CTX.Barrier(clients), CTX.Queue()
    procs = [
        CTX.Process(target=run_client, args=(open_store, op, seconds, start, out))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    rates = [out.get(timeout=seconds + 120) for _ in procs]
    for proc in procs:
        proc.join()
    return rates


def round_trip_us(
    stores: dict[str, MutableMapping[str, Any]], size: int, repeat: int
) -> dict[str, float]:
    """Median microseconds of `store[k] = v; store[k]` per store, for bytes of `size`.

    The stores alternate, one round trip each, so drifting load hits them alike.
    """
    value = os.urandom(size)
    times: dict[str, list[float]] = {name: [] for name in stores}
    for _ in range(repeat):
        for name, store in stores.items():
            began = time.perf_counter()
            store["big"] = value
            got = store["big"]
            times[name].append((time.perf_counter() - began) * 1e6)
            assert len(got) == size
    return {name: statistics.median(spans) for name, spans in times.items()}


def handover_us(address: str, size: int, repeat: int) -> float:
    """Median microseconds of a set in this process plus a get of it in another one.

    The reader has no copy of the value, so its get asks the services process. The
    time it takes the reader to wake up and start is not counted.
    """
    value = os.urandom(size)
    to_reader, from_writer = CTX.Pipe()
    reader = CTX.Process(target=read_on_request, args=(address, from_writer), daemon=True)
    reader.start()
    store, _ = connect(address)
    spans: list[float] = []
    for _ in range(repeat):
        began = time.perf_counter()
        store["handover"] = value
        set_s = time.perf_counter() - began
        to_reader.send(None)
        spans.append((set_s + to_reader.recv()) * 1e6)
    to_reader.send("stop")
    reader.join()
    store.close()
    return statistics.median(spans)


def read_on_request(address: str, requests: Any) -> None:
    store, _ = connect(address)
    while requests.recv() is None:
        began = time.perf_counter()
        store["handover"]
        requests.send(time.perf_counter() - began)


class ExecutorStore:
    """Picklable opener: a forked child connects to the run's services itself."""

    def __init__(self, address: str) -> None:
        self.address = address

    def __call__(self) -> Any:
        store, _ = connect(self.address)
        store["item"] = VALUE
        return store


class EchoFloor:
    """Picklable opener: a bare Python echo over AF_UNIX (the floor for one round trip).

    Its "store" answers every request with the request; no pickling, no dispatch.
    """

    def __init__(self) -> None:
        self.path = os.path.join(tempfile.mkdtemp(prefix="bench-echo-"), "echo.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(8)
        self.server = CTX.Process(target=self.serve, args=(listener,), daemon=True)
        self.server.start()
        listener.close()

    @staticmethod
    def serve(listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=EchoFloor.echo, args=(conn,), daemon=True).start()

    @staticmethod
    def echo(conn: socket.socket) -> None:
        while data := conn.recv(4096):
            conn.send(data)

    def __call__(self) -> Any:
        return EchoClient(self.path)

    def stop(self) -> None:
        self.server.kill()
        self.server.join()
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)


class EchoClient:
    """Dict-shaped client of EchoFloor: one send and one recv per operation."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def _round_trip(self) -> None:
        self.sock.send(b"0123456789abcdef")
        self.sock.recv(4096)

    def __getitem__(self, key: str) -> None:
        self._round_trip()

    def __setitem__(self, key: str, value: Any) -> None:
        self._round_trip()

    def get(self, key: str, default: Any = None) -> None:
        self._round_trip()

    def incr(self, key: str) -> None:
        self._round_trip()


class ManagerDict:
    """Picklable opener: the Manager dict proxy, reconnected in the child."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    def __call__(self) -> Any:
        self.proxy["item"] = VALUE
        return self.proxy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per cell (median taken)")
    parser.add_argument("--seconds", type=float, default=1.0, help="duration of one round")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    keep_freed_memory()

    results: dict[str, Any] = {"ops_per_client": {}, "round_trip_us": {}}
    with RunServices("bench-store") as services, multiprocessing.Manager() as manager:
        floor = EchoFloor()
        peers: dict[str, Callable[[], Any]] = {
            "executor": ExecutorStore(services.address),
            "manager": ManagerDict(manager.dict()),
            "floor": floor,
        }
        for op in OPS:
            for clients in (1, 2):
                cell = results["ops_per_client"].setdefault(f"{op} x{clients}", {})
                rates: dict[str, list[float]] = {name: [] for name in peers}
                names = list(peers)
                for round_no in range(args.rounds):  # peers take turns: drifting load hits all
                    turn = round_no % len(names)
                    for name in names[turn:] + names[:turn]:
                        per_client = measure(peers[name], op, clients, args.seconds)
                        rates[name].append(statistics.median(per_client))
                for name in names:
                    cell[name] = statistics.median(rates[name])
                if not args.json:
                    print(
                        f"{op:>4} x{clients} clients, ops/s per client:"
                        f" executor {cell['executor']:>7,.0f},"
                        f" Manager dict {cell['manager']:>7,.0f}"
                        f" ({cell['executor'] / cell['manager']:.1f}x),"
                        f" echo floor {cell['floor']:>7,.0f}"
                        f" (executor at {cell['executor'] / cell['floor']:.0%} of it)",
                        flush=True,
                    )
        floor.stop()
        local, _ = connect(services.address)
        stores: dict[str, Any] = {"executor": local, "manager": manager.dict()}
        for size, label in ((1 << 20, "1 MiB"), (16 << 20, "16 MiB")):
            repeat = 200 if size == 1 << 20 else 20
            cell = round_trip_us(stores, size, repeat)
            cell["executor, get in another process"] = handover_us(services.address, size, repeat)
            results["round_trip_us"][label] = cell
            if not args.json:
                print(
                    f"{label:>6} set+get round trip: executor {cell['executor']:>8,.0f} µs,"
                    f" Manager dict {cell['manager']:>8,.0f} µs,"
                    f" ratio {cell['manager'] / cell['executor']:.1f}x faster;"
                    f" executor with the get in another process"
                    f" {cell['executor, get in another process']:>8,.0f} µs",
                    flush=True,
                )
        local.close()
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
