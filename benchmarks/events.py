"""Event latency: from `publish` in one process to the return of `wait` in another.

A waiter process (fork) tells the publisher over a pipe that it is about to wait, then
blocks; the publisher sleeps `--gap` seconds (so the waiter is really blocked), then
publishes `time.perf_counter_ns()` (CLOCK_MONOTONIC, the same clock in both
processes). The waiter records now minus that stamp. Printed: median and p99 per
peer, and each peer's median relative to the executor's `wait`:

- executor wait       `events.publish(f"t{i}", ts)` -> `events.wait(f"t{i}")`
- executor subscribe  `events.publish("s", ts)` -> `next(subscription)`
- mp.Event            `multiprocessing.Event` + a shared Value (a futex wake-up: the floor)
- mp.Queue            `multiprocessing.Queue` put -> get
- Manager Queue       `multiprocessing.Manager().Queue()` put -> get
- relay floor         raw bytes through a bare Python relay process: the two hops of any
                      broker design (publisher -> broker -> waiter) with no work at all

    .venv/bin/python benchmarks/events.py                # 1,000 events per peer
    .venv/bin/python benchmarks/events.py --events 300 --json

Goal (issue 3): executor wait median <= 100 µs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import select
import socket
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from executor.services.events import Events, Subscription  # noqa: E402
from executor.services.server import RunServices, connect  # noqa: E402

CTX = multiprocessing.get_context("fork")
WARMUP = 20


class ExecutorWait:
    name = "executor wait"

    def __init__(self, address: str) -> None:
        self.address = address
        self.events: Events | None = None

    def open(self, role: str) -> None:
        """Connect in this process (after the fork)."""
        _, self.events = connect(self.address)

    def publish(self, i: int, stamp: int) -> None:
        assert self.events is not None
        self.events.publish(f"t{i}", stamp)

    def wait(self, i: int) -> int:
        assert self.events is not None
        return int(self.events.wait(f"t{i}"))


class ExecutorSubscribe(ExecutorWait):
    name = "executor subscribe"
    sub: Subscription

    def open(self, role: str) -> None:
        super().open(role)
        if role == "wait":
            assert self.events is not None
            self.sub = self.events.subscribe("s")

    def publish(self, i: int, stamp: int) -> None:
        assert self.events is not None
        self.events.publish("s", stamp)

    def wait(self, i: int) -> int:
        return int(next(self.sub))


class MpEvent:
    name = "mp.Event"

    def __init__(self) -> None:
        self.event = CTX.Event()
        self.stamp = CTX.Value("q", 0, lock=False)

    def open(self, role: str) -> None:
        pass

    def publish(self, i: int, stamp: int) -> None:
        self.stamp.value = stamp
        self.event.set()

    def wait(self, i: int) -> int:
        self.event.wait()
        self.event.clear()
        return int(self.stamp.value)


class QueuePeer:
    def __init__(self, name: str, queue: Any) -> None:
        self.name = name
        self.queue = queue

    def open(self, role: str) -> None:
        pass

    def publish(self, i: int, stamp: int) -> None:
        self.queue.put(stamp)

    def wait(self, i: int) -> int:
        return int(self.queue.get())


class RelayFloor:
    """A bare Python relay process (epoll, no work) between publisher and waiter.

    The same two hops as a broker-based event system, with nothing else: the floor for
    the executor's design on this machine at this moment.
    """

    name = "relay floor"

    def __init__(self) -> None:
        self.publisher, relay_in = socket.socketpair()
        relay_out, self.waiter = socket.socketpair()
        self.relay = CTX.Process(target=self.forward, args=(relay_in, relay_out), daemon=True)
        self.relay.start()
        relay_in.close()
        relay_out.close()

    @staticmethod
    def forward(source: socket.socket, target: socket.socket) -> None:
        poller = select.epoll()
        poller.register(source.fileno(), select.EPOLLIN)
        while True:
            poller.poll()
            data = source.recv(4096)
            if not data:
                return
            target.send(data)

    def open(self, role: str) -> None:
        pass

    def publish(self, i: int, stamp: int) -> None:
        self.publisher.send(stamp.to_bytes(8, "little"))

    def wait(self, i: int) -> int:
        return int.from_bytes(self.waiter.recv(8), "little")

    def stop(self) -> None:
        self.publisher.close()
        self.waiter.close()
        self.relay.join(10)


Peer = ExecutorWait | MpEvent | QueuePeer | RelayFloor


def waiter(peer: Peer, count: int, pipe: Connection) -> None:
    """Child process: announce each wait, block in it, record the latency."""
    peer.open("wait")
    latencies = []
    for i in range(count):
        pipe.send(i)
        stamp = peer.wait(i)
        latencies.append(time.perf_counter_ns() - stamp)
    pipe.send(latencies)


def measure(peer: Peer, count: int, gap: float) -> list[float]:
    """Latencies in µs of `count` publish -> wait hand-overs (warm-up dropped)."""
    mine, theirs = CTX.Pipe()
    proc = CTX.Process(target=waiter, args=(peer, count + WARMUP, theirs))
    proc.start()
    peer.open("publish")
    for i in range(count + WARMUP):
        mine.recv()
        time.sleep(gap)
        peer.publish(i, time.perf_counter_ns())
    latencies: list[int] = mine.recv()
    proc.join()
    return [ns / 1000 for ns in latencies[WARMUP:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1000, help="hand-overs per peer")
    parser.add_argument("--gap", type=float, default=0.002, help="seconds before each publish")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    with RunServices("bench-events") as services, CTX.Manager() as manager:
        peers: list[Peer] = [
            ExecutorWait(services.address),
            ExecutorSubscribe(services.address),
            MpEvent(),
            QueuePeer("mp.Queue", CTX.Queue()),
            QueuePeer("Manager Queue", manager.Queue()),
            RelayFloor(),
        ]
        for peer in peers:
            lat = measure(peer, args.events, args.gap)
            cell = {
                "median_us": statistics.median(lat),
                "p99_us": statistics.quantiles(lat, n=100)[98],
            }
            results[peer.name] = cell
            if isinstance(peer, RelayFloor):
                peer.stop()
            if not args.json:
                base = results["executor wait"]["median_us"]
                print(
                    f"{peer.name:>18}: median {cell['median_us']:>8,.1f} µs,"
                    f" p99 {cell['p99_us']:>9,.1f} µs,"
                    f" median {cell['median_us'] / base:.2f}x executor wait",
                    flush=True,
                )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
