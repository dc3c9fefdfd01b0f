"""The run's services with real processes: store, events, lifecycle of the server.

Every test runs with the fast paths on and off (tests/fastpaths.py); the tests of a fast
path itself run only with them on, and their counterparts show that off turns it off.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from typing import Any

import pytest

from executor.services import sharedmem
from executor.services.events import Events
from executor.services.memfd_values import Recycled
from executor.services.protocol import Get, Got
from executor.services.server import RunServices, connect
from executor.services.store import Store
from executor.services.wire import ServiceError, close_all, expect, load
from tests.fastpaths import OFF_ONLY, ON_ONLY, fastpaths  # noqa: F401 (an autouse fixture)

START_METHODS = ["fork", "forkserver"]
"""The multiprocessing start methods the worker-side tests run under."""


def gone(pid: int, within: float = 20.0) -> bool:
    """Whether process `pid` has exited (and is reaped) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


@pytest.fixture
def services() -> Iterator[RunServices]:
    svc = RunServices("test-run")
    svc.start()
    pid = svc.pid
    assert pid is not None
    try:
        yield svc
    finally:
        svc.stop()
        assert gone(pid), f"services process {pid} is still running"


@pytest.fixture(params=START_METHODS)
def method(request: pytest.FixtureRequest) -> str:
    """A multiprocessing start method for the worker processes of a test."""
    return str(request.param)


@pytest.fixture
def client(services: RunServices) -> Iterator[tuple[Store, Events]]:
    store, events = connect(services.address)
    yield store, events
    store.close()


def new_process(method: str, target: Callable[..., None], args: tuple[Any, ...]) -> BaseProcess:
    """A (not yet started) process of start method `method`."""
    ctx: Any = multiprocessing.get_context(method)
    process: BaseProcess = ctx.Process(target=target, args=args)
    return process


def run_in_processes(method: str, target: Callable[..., None], *argsets: tuple[Any, ...]) -> None:
    """Run target(*args) in one process per argset, with start method `method`; all exit 0."""
    procs = [new_process(method, target, args) for args in argsets]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert [proc.exitcode for proc in procs] == [0] * len(procs)


# Targets for worker processes: module-level so that forkserver can import them.


def incr_many(address: str, times: int) -> None:
    store, _ = connect(address)
    for _ in range(times):
        store.incr("counter")


def cas_race(address: str, name: str) -> None:
    store, events = connect(address)
    events.wait("go")
    won = store.cas("winner", None, name)
    store.incr("won" if won else "lost")


def write_then_publish(address: str, value: Any) -> None:
    store, events = connect(address)
    store["shared"] = value
    events.publish("written", len(pickle.dumps(value)))


def publish_sequence(address: str, topic: str, count: int) -> None:
    _, events = connect(address)
    for i in range(count):
        events.publish(topic, i)


# Store


def test_store_dict_operations(client: tuple[Store, Events]) -> None:
    store, _ = client
    store["a"] = {"list": [1, 2, 3], "bytes": b"\x00\xff"}
    store["b"] = None
    assert store["a"] == {"list": [1, 2, 3], "bytes": b"\x00\xff"}
    assert "a" in store and "b" in store and "c" not in store
    assert store.get("b", "default") is None
    assert store.get("c", "default") == "default"
    assert store.keys() == ["a", "b"]
    assert list(store) == ["a", "b"] and len(store) == 2
    del store["a"]
    assert store.keys() == ["b"]


def test_missing_keys_raise_key_error(client: tuple[Store, Events]) -> None:
    store, _ = client
    with pytest.raises(KeyError, match="'missing'"):
        store["missing"]
    with pytest.raises(KeyError, match="'missing'"):
        del store["missing"]
    store["after"] = 1  # the connection is still in step after an error reply
    assert store["after"] == 1


@pytest.mark.parametrize(
    "operation",
    [
        lambda s: s[1],
        lambda s: s.__setitem__(b"k", 1),
        lambda s: s.__delitem__(None),
        lambda s: 1.5 in s,
        lambda s: s.get(("t",)),
        lambda s: s.incr(2),
        lambda s: s.cas(3, None, 1),
    ],
    ids=["get", "set", "del", "in", "get-default", "incr", "cas"],
)
def test_non_str_keys_raise_type_error(
    client: tuple[Store, Events], operation: Callable[[Store], object]
) -> None:
    store, _ = client
    with pytest.raises(TypeError, match="store keys must be str"):
        operation(store)
    assert store.keys() == []


def test_cached_reads_see_every_change_made_elsewhere(
    services: RunServices, client: tuple[Store, Events]
) -> None:
    reader, _ = client
    writer, _ = connect(services.address)
    try:
        writer["k"] = [1]
        writer.settle()  # (a worker does this before it reports a task finished)
        assert reader["k"] == [1] and reader.get("gone") is None and "gone" not in reader
        got = reader["k"]
        got.append(2)  # a cached read still hands out a fresh copy
        assert reader["k"] == [1]
        writer["k"] = [3]
        writer["gone"] = "here"
        writer.settle()
        assert reader["k"] == [3] and reader.get("gone") == "here" and "gone" in reader
        writer.incr("n")
        assert reader["n"] == 1
        writer.incr("n")
        assert reader["n"] == 2
        assert writer.cas("n", 2, "two")
        assert reader["n"] == "two"
        del writer["k"]
        assert "k" not in reader
        with pytest.raises(KeyError):
            reader["k"]
        for n in range(3):  # big values too: the reader keeps their memfd, not a copy
            writer["big"] = bytes([n]) * (1 << 20)
            writer.settle()
            assert reader["big"] == reader["big"] == bytes([n]) * (1 << 20)
    finally:
        writer.close()


def test_a_writer_reads_its_own_writes_at_once(client: tuple[Store, Events]) -> None:
    store, _ = client
    store["k"] = 0
    for i in range(1, 500):
        assert store["k"] == i - 1  # cached after the first read of each value
        store["k"] = i  # not answered: the next read must still see it
        assert store.get("k") == i and "k" in store
    store["big"] = os.urandom(1 << 20)
    assert len(store["big"]) == 1 << 20


def test_a_writer_that_fills_the_socket_waits_and_loses_nothing(
    services: RunServices, client: tuple[Store, Events]
) -> None:
    reader, _ = client
    writer, _ = connect(services.address)
    assert services.pid is not None
    os.kill(services.pid, signal.SIGSTOP)  # the server falls behind: the socket fills
    resume = threading.Timer(1.0, os.kill, (services.pid, signal.SIGCONT))
    resume.start()
    try:
        congested = 0
        for i in range(300):
            congested += writer._conn.congested  # noqa: SLF001 - the path under test
            writer[f"k{i % 7}"] = (i, b"x" * 30_000)
        writer.settle()
        assert congested, "the socket never filled: the test proves nothing"
        assert reader["k6"][0] == 293 and reader["k0"][0] == 294
    finally:
        resume.join()
        os.kill(services.pid, signal.SIGCONT)
        writer.close()


@pytest.mark.parametrize(
    "value", [{"cached": True}, bytearray(os.urandom(1 << 20))], ids=["small", "1MiB"]
)
@pytest.mark.parametrize("source", ["read", "own write"])
def test_cached_reads_need_no_round_trip(
    services: RunServices, client: tuple[Store, Events], value: Any, source: str
) -> None:
    store, _ = client
    pid = services.pid
    assert pid is not None
    if source == "read":
        writer, _ = connect(services.address)
        writer["k"] = value
        writer.settle()
        writer.close()
        assert store["k"] == value  # a round trip, remembered
    results: list[Any] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        if source == "own write":
            store["k"] = value  # sent, not applied: the services are frozen
        reader = threading.Thread(target=lambda: results.append((store["k"], "k" in store)))
        reader.start()
        reader.join(60)  # generous: a read that needed the frozen server would never end
        assert not reader.is_alive()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert results == [(value, True)]
    results[0][0].clear()  # each read hands out a fresh copy
    assert store["k"] == value


def test_incr_type_errors(client: tuple[Store, Events]) -> None:
    store, _ = client
    store["text"] = "x"
    with pytest.raises(TypeError, match="holds str, not int"):
        store.incr("text")
    with pytest.raises(TypeError, match="n must be int"):
        store.incr("n", 1.5)  # type: ignore[arg-type]
    assert store.incr("n", 3) == 3


def test_unpicklable_values_fail_in_the_caller(client: tuple[Store, Events]) -> None:
    store, _ = client
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        store["lock"] = threading.Lock()
    assert "lock" not in store


@pytest.mark.parametrize(
    "value",
    [
        os.urandom(1 << 20),
        os.urandom(16 << 20),
        bytearray(os.urandom(1 << 20)),
        {"blob": os.urandom(1 << 20), "rows": [list(range(100))] * 1000, "tag": "x"},
    ],
    ids=["bytes-1MiB", "bytes-16MiB", "bytearray-1MiB", "nested-1MiB"],
)
def test_big_values_round_trip(client: tuple[Store, Events], value: Any) -> None:
    store, _ = client
    store["big"] = value
    got = store["big"]
    assert type(got) is type(value) and got == value
    assert store.cas("big", value, "replaced")
    assert store["big"] == "replaced"


def inode_of(store: Store, key: str) -> int:
    """The inode of the memfd the services answer `key` with (closed again at once)."""
    _, fds = store._conn.call(Get(key))
    try:
        return os.fstat(fds[0]).st_ino
    finally:
        close_all(fds)


def write_three_values(store: Store) -> tuple[int, int, bytes]:
    """Write a big value, replace it, write a third: the inodes of the first and the
    third value's memfds, and the third value."""
    store["big"] = os.urandom(1 << 20)
    first = inode_of(store, "big")
    store["big"] = os.urandom(1 << 20)  # replaces the first: its memfd comes back as a spare
    store.settle()  # applied: the spare is on its way back
    third = os.urandom(1 << 20)
    store["big"] = third
    return first, inode_of(store, "big"), third


@ON_ONLY
def test_a_writer_gets_its_replaced_values_memory_back(client: tuple[Store, Events]) -> None:
    store, _ = client
    first, third_inode, third = write_three_values(store)
    assert third_inode == first, "the third value went into the first's memfd"
    assert store["big"] == third


@OFF_ONLY
def test_without_fast_paths_no_memfd_is_recycled(client: tuple[Store, Events]) -> None:
    store, _ = client
    first, third_inode, third = write_three_values(store)
    assert third_inode != first, "a new memfd for every big value"
    assert store["big"] == third
    assert store._spares is None and store._conn.spares.take(0) is None, "no spare came"


@ON_ONLY
def test_a_reader_whose_memfd_was_reused_meanwhile_asks_again(services: RunServices) -> None:
    writer, _ = connect(services.address)
    reader, _ = connect(services.address)
    try:
        writer["big"] = b"1" * (1 << 20)
        writer.settle()  # else the reader's request may be served first
        stale, fds = reader._conn.call(Get("big"))  # answered, not read yet
        writer["big"] = b"2" * (1 << 20)  # the first memfd is a spare of the writer's now
        writer.settle()
        writer["big"] = b"3" * (1 << 20)  # written into it
        writer.settle()
        stale_enc = expect(Got, stale).enc
        assert stale_enc is not None
        with pytest.raises(Recycled):
            load(stale_enc, fds)
        assert reader["big"] == b"3" * (1 << 20)
    finally:
        writer.close()
        reader.close()


def write_uniform_values(address: str, seconds: float) -> None:
    """Replace one key with values of one repeated byte each, as fast as possible; settle
    each time, so the memfds of replaced values come back at once to be written into."""
    store, _ = connect(address)
    deadline, n = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        n += 1
        store["torn?"] = bytes([n % 256]) * (256 << 10)
        store.settle()


def read_uniform_values(address: str, seconds: float) -> None:
    """Read the key over and over; exit 1 on a value that mixes two writes."""
    store, _ = connect(address)
    deadline, reads = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        value = store.get("torn?")
        if value is not None:
            reads += 1
            if value.count(value[:1]) != len(value):
                os._exit(1)
    os._exit(0 if reads else 2)


def test_readers_never_see_a_value_torn_by_a_writer_reusing_its_memfd(
    services: RunServices,
) -> None:
    seconds = 3.0
    run_in_processes(
        "fork",
        lambda role: (write_uniform_values if role == "w" else read_uniform_values)(
            services.address, seconds
        ),
        ("w",),
        ("r",),
        ("r",),
    )


def test_values_written_by_an_earlier_process_are_visible_later(
    services: RunServices, client: tuple[Store, Events], method: str
) -> None:
    store, events = client
    value = {"payload": os.urandom(2 << 20), "n": 7}
    run_in_processes(method, write_then_publish, (services.address, value))
    assert events.wait("written", timeout=60) == len(pickle.dumps(value))
    assert store["shared"] == value


def test_incr_is_atomic_across_processes(
    services: RunServices, client: tuple[Store, Events], method: str
) -> None:
    store, _ = client
    run_in_processes(method, incr_many, *[(services.address, 500)] * 8)
    assert store["counter"] == 4000


def test_cas_race_has_exactly_one_winner(
    services: RunServices, client: tuple[Store, Events], method: str
) -> None:
    store, _ = client
    publisher = services.publisher()
    names = [f"worker-{i}" for i in range(8)]
    procs = [new_process(method, cas_race, (services.address, n)) for n in names]
    for proc in procs:
        proc.start()
    publisher.publish("go")  # the engine's publisher may publish any topic
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0] * 8
    assert store.get("won") == 1 and store.get("lost") == 7
    assert store["winner"] in names


# Events


def test_wait_is_latched(client: tuple[Store, Events]) -> None:
    _, events = client
    events.publish("ready", {"n": 1})
    events.publish("ready", {"n": 2})
    assert events.wait("ready") == {"n": 2}
    assert events.wait("ready", timeout=0) == {"n": 2}


def test_wait_times_out(client: tuple[Store, Events]) -> None:
    store, events = client
    with pytest.raises(TimeoutError, match="'never'"):
        events.wait("never", timeout=0.2)
    with pytest.raises(TimeoutError):
        events.wait("never", timeout=0)
    with pytest.raises(ValueError, match=">= 0"):
        events.wait("never", timeout=-1)
    store["still"] = "in step"
    assert store["still"] == "in step"


def test_wait_blocks_until_another_process_publishes(
    services: RunServices, client: tuple[Store, Events], method: str
) -> None:
    _, events = client
    calls: list[str] = []
    events.set_block_hooks(
        lambda topic: calls.append(f"block {topic}"), lambda: calls.append("unblock")
    )
    proc = new_process(method, publish_sequence, (services.address, "later", 1))
    timer = threading.Timer(0.3, proc.start)
    timer.start()
    try:
        assert events.wait("later", timeout=60) == 0
    finally:
        timer.join()
        proc.join(60)
    assert calls == ["block later", "unblock"]


def test_block_hooks_are_not_called_when_the_payload_is_there(client: tuple[Store, Events]) -> None:
    _, events = client
    calls: list[str] = []
    events.set_block_hooks(lambda topic: calls.append(topic), lambda: calls.append("unblock"))
    events.publish("here", 1)
    assert events.wait("here") == 1
    with pytest.raises(TimeoutError):
        events.wait("absent", timeout=0)
    assert calls == []
    with pytest.raises(TimeoutError):
        events.wait("absent", timeout=0.05)
    assert calls == ["absent", "unblock"]


def test_only_an_untimed_subscription_read_calls_the_block_hooks(
    client: tuple[Store, Events],
) -> None:
    _, events = client
    calls: list[str] = []
    events.set_block_hooks(lambda topic: calls.append(topic), lambda: calls.append("unblock"))
    with events.subscribe("feed") as sub:
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.05)
        assert calls == []
        stopper = threading.Timer(0.2, sub.close)
        stopper.start()
        try:
            assert list(sub) == []
        finally:
            stopper.join()
    assert calls == ["feed", "unblock"]


def test_an_interrupted_wait_leaves_the_connection_in_step(client: tuple[Store, Events]) -> None:
    store, events = client

    def interrupt(topic: str) -> None:
        raise KeyboardInterrupt

    events.set_block_hooks(interrupt, lambda: None)
    with pytest.raises(KeyboardInterrupt):
        events.wait("parked")
    store["k"] = "v"
    assert store["k"] == "v"
    events.publish("parked", "late")
    assert store.keys() == ["k"]


def test_subscribe_sees_only_later_payloads_in_order(
    services: RunServices, client: tuple[Store, Events], method: str
) -> None:
    _, events = client
    events.publish("seq", "before")
    with events.subscribe("seq") as sub:
        run_in_processes(method, publish_sequence, (services.address, "seq", 200))
        assert [sub.get(timeout=60) for _ in range(200)] == list(range(200))
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.05)
    assert list(sub) == [], "a closed subscription ends the iteration"


def test_subscription_iteration_ends_when_the_services_stop() -> None:
    svc = RunServices("ends")
    svc.start()
    _, events = connect(svc.address)
    sub = events.subscribe("t")
    publisher = svc.publisher()
    publisher.publish("t", "one")
    stopper = threading.Timer(0.3, svc.stop)
    stopper.start()
    try:
        assert list(sub) == ["one"]
    finally:
        stopper.join()
        events.close()


def test_tasks_cannot_publish_reserved_topics(
    services: RunServices, client: tuple[Store, Events]
) -> None:
    _, events = client
    with pytest.raises(ValueError, match="'executor.' are reserved"):
        events.publish("executor.task.finished", {"task": "x"})
    with pytest.raises(TypeError, match="topics must be str"):
        events.publish(1)  # type: ignore[arg-type]
    services.publisher().publish("executor.task.finished", {"task": "x"})
    assert events.wait("executor.task.finished", timeout=60) == {"task": "x"}


def test_the_engine_publisher_does_not_block_on_a_frozen_server(
    services: RunServices, client: tuple[Store, Events]
) -> None:
    _, events = client
    publisher = services.publisher()
    pid = services.pid
    assert pid is not None
    payload = b"p" * 8000
    with events.subscribe("flood") as sub:
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(2000):  # 16 MB: far more than the socket buffers hold
                publisher.publish("flood", (i, payload))
        finally:
            os.kill(pid, signal.SIGCONT)
        publisher.publish("flood-done", 1999)
        assert events.wait("flood-done", timeout=120) == 1999
        assert [sub.get(timeout=120)[0] for _ in range(2000)] == list(range(2000))
    assert events.wait("flood", timeout=0) == (1999, payload)


def test_a_blocked_wait_fails_clearly_when_the_services_stop() -> None:
    svc = RunServices("stops-under-a-wait")
    svc.start()
    store, events = connect(svc.address)
    stopper = threading.Timer(0.3, svc.stop)
    stopper.start()
    try:
        with pytest.raises(ServiceError, match="closed the connection"):
            events.wait("never")
        with pytest.raises(ServiceError):
            store["k"] = 1
    finally:
        stopper.join()
        store.close()


# Clients and the server process


def test_clients_refuse_pickling_and_use_after_fork(client: tuple[Store, Events]) -> None:
    store, events = client
    for obj in (store, events):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(obj)
    pid = os.fork()
    if pid == 0:  # child: the inherited client must refuse to work
        try:
            store["x"] = 1
        except ServiceError:
            os._exit(0)
        os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    store["x"] = 2
    assert store["x"] == 2


def test_a_wrong_address_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(ServiceError, match="cannot reach the run's services"):
        connect(str(tmp_path / "nothing.sock"))


def test_a_client_breaking_the_protocol_is_dropped_and_others_go_on(
    services: RunServices, client: tuple[Store, Events]
) -> None:
    store, _ = client
    rogue = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rogue.connect(services.address)
    try:
        rogue.sendall(b"\x05\x00\x00\x00\x00garbage")
        assert rogue.recv(100) == b"", "the server closes the rogue connection"
    finally:
        rogue.close()
    assert store.incr("still-served") == 1


def test_a_server_that_cannot_start_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setattr(sys, "executable", "/bin/false")
    svc = RunServices("never-starts")
    with pytest.raises(ServiceError, match="exited at start"):
        svc.start()
    assert svc.pid is None
    with pytest.raises(ServiceError, match="not started"):
        connect(svc.address)
    leftovers = [p for p in os.listdir(tempfile.gettempdir()) if "never-starts" in p]
    assert leftovers == [], "the socket directory is removed"


def test_stop_is_idempotent_and_removes_the_socket_dir() -> None:
    svc = RunServices("stop/twice: odd id")
    svc.start()
    pid, address = svc.pid, svc.address
    assert pid is not None and os.path.exists(address)
    assert "stop_twice__odd_id" in address
    svc.stop()
    svc.stop()
    assert gone(pid)
    assert not os.path.exists(os.path.dirname(address))
    with pytest.raises(ServiceError):
        connect(address)


def test_a_client_that_dies_mid_wait_does_not_disturb_others(
    services: RunServices, client: tuple[Store, Events]
) -> None:
    store, events = client
    proc = new_process("fork", _wait_forever, (services.address,))
    proc.start()
    assert events.wait("waiting", timeout=60) is True
    proc.kill()
    proc.join()
    events.publish("forever", 1)
    assert store.incr("alive") == 1


def _wait_forever(address: str) -> None:
    _, events = connect(address)
    events.publish("waiting", True)
    events.wait("forever")


MANAGER = """
import sys, time
from executor.services.server import RunServices
svc = RunServices("orphan")
svc.start()
print(svc.pid, svc.address, flush=True)
time.sleep(600)
"""


def test_the_server_dies_with_a_killed_manager() -> None:
    manager = subprocess.Popen([sys.executable, "-c", MANAGER], stdout=subprocess.PIPE, text=True)
    try:
        assert manager.stdout is not None
        pid_text, address = manager.stdout.readline().split()
        pid = int(pid_text)
        os.kill(manager.pid, signal.SIGKILL)
        manager.wait()
        assert gone(pid), f"services process {pid} outlived its manager"
        assert not os.path.exists(os.path.dirname(address))
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.wait()
        if manager.stdout is not None:
            manager.stdout.close()


# The wait board: a publisher hands small payloads straight to parked waits


def _publish_from(store: Store, events: Events, topic: str, payload: Any, write: bool) -> None:
    if write:
        store["written"] = payload  # unanswered: still queued while the services sleep
    events.publish(topic, payload)  # waits for the services' answer


def _parked_in_board(events: Events, topic: str) -> None:
    """Block until a wait of ``events`` is parked on ``topic`` in the wait board."""
    deadline = time.monotonic() + 30
    while events._board is None:  # the first wait asks for it
        assert time.monotonic() < deadline, "no wait board"
        time.sleep(0.01)
    wait_board, slot = events._board, events._slot
    while wait_board._digest(slot) != sharedmem.digest(topic):
        assert time.monotonic() < deadline, "the wait never parked"
        time.sleep(0.01)
    time.sleep(0.05)  # the token follows the digest at once


def _wait_in_thread(events: Events, topic: str) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(events.wait(topic, timeout=60)))
    thread.start()
    return thread, got


@ON_ONLY
@pytest.mark.parametrize(
    ("payload", "write_first", "handed_off"),
    [
        ({"n": 1}, False, True),  # small, nothing written before: straight to the waiter
        (b"b" * 5000, False, False),  # bigger than a board slot: through the services
        ({"n": 2}, True, False),  # a store write is still in flight: through the services
    ],
)
def test_a_parked_wait_gets_small_payloads_without_the_services(
    services: RunServices,
    client: tuple[Store, Events],
    payload: Any,
    write_first: bool,
    handed_off: bool,
) -> None:
    store, events = client
    their_store, their_events = connect(services.address)
    their_events.publish("warm", 0)  # a publisher asks for the board once
    waiter, got = _wait_in_thread(events, "topic")
    pid = services.pid
    assert pid is not None
    _parked_in_board(events, "topic")
    os.kill(pid, signal.SIGSTOP)
    publisher = threading.Thread(
        target=_publish_from, args=(their_store, their_events, "topic", payload, write_first)
    )
    try:
        publisher.start()
        waiter.join(2.0 if handed_off else 1.0)
        assert (got == [payload]) is handed_off
    finally:
        os.kill(pid, signal.SIGCONT)
        publisher.join(60)
        waiter.join(60)
        their_store.close()
    assert got == [payload]
    if write_first:
        assert store["written"] == payload  # seen by the waiter's process when it woke
    # The connection is in step afterwards: the services' own answer was skipped.
    store["after"] = 1
    assert store["after"] == 1
    events.publish("next", "n")
    assert events.wait("next") == "n"
    with pytest.raises(TimeoutError):
        events.wait("never", timeout=0.1)


@OFF_ONLY
def test_without_fast_paths_a_parked_wait_gets_payloads_only_from_the_services(
    services: RunServices, client: tuple[Store, Events]
) -> None:
    _, events = client
    their_store, their_events = connect(services.address)
    parked = threading.Event()
    events.set_block_hooks(lambda topic: parked.set(), lambda: None)
    their_events.publish("warm", 0)  # a publisher asks for the board once (and gets none)
    waiter, got = _wait_in_thread(events, "topic")
    pid = services.pid
    assert pid is not None
    assert parked.wait(60), "the wait never parked in the services"
    os.kill(pid, signal.SIGSTOP)
    publisher = threading.Thread(target=their_events.publish, args=("topic", {"n": 1}))
    try:
        publisher.start()
        waiter.join(1.0)
        assert got == [], "a payload reached the waiter without the services"
    finally:
        os.kill(pid, signal.SIGCONT)
        publisher.join(60)
        waiter.join(60)
        their_store.close()
    assert got == [{"n": 1}]
    assert events._board is None and their_events._board is None, "no wait board"


@OFF_ONLY
def test_without_fast_paths_a_client_sleeps_for_its_answer_at_once(
    client: tuple[Store, Events],
) -> None:
    store, _ = client
    conn = store._conn
    looks: list[float] = []
    real_poll = conn._poll

    class CountingPoll:
        def poll(self, timeout: float) -> list[tuple[int, int]]:
            looks.append(timeout)
            return real_poll.poll(timeout)

    class Quiet:
        def quiet(self) -> bool:
            return True  # spinning would pay, were it allowed

    conn._poll = CountingPoll()  # type: ignore[assignment]
    conn._contention = Quiet()  # type: ignore[assignment]
    try:
        for i in range(50):
            assert store.incr("k") == i + 1  # round trips: a client spins for these if it may
    finally:
        conn._poll = real_poll
    assert looks == [], "the client spun for its answer"


class _Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: Any) -> None:
    raise _Interrupted


@ON_ONLY
def test_a_wait_interrupted_in_the_board_takes_no_later_payload(
    services: RunServices, client: tuple[Store, Events]
) -> None:
    _, events = client
    _, publisher = connect(services.address)
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)  # lands while the wait sleeps on its bell
        with pytest.raises(_Interrupted):
            events.wait("old")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    try:
        publisher.publish("old", "stale")  # must not be handed to the interrupted wait's slot
        waiter, got = _wait_in_thread(events, "new")
        _parked_in_board(events, "new")
        publisher.publish("new", "fresh")
        waiter.join(60)
    finally:
        publisher.close()
    assert got == ["fresh"]
    assert events.wait("old") == "stale"  # latched by the services


# Counters: incr in shared memory after the first one


def incr_and_report(address: str, key: str, times: int, pipe: Any) -> None:
    store, _ = connect(address)
    for _ in range(times):
        store.incr(key)
        pipe.send(store[key])  # read back through the services: never a stale cache
    store.close()


def test_counters_are_read_fresh_by_every_process(
    services: RunServices, client: tuple[Store, Events]
) -> None:
    store, _ = client
    assert store.incr("hits") == 1
    assert store["hits"] == 1  # read once: a counter is not kept in the read cache
    mine, theirs = multiprocessing.get_context("fork").Pipe()
    proc = new_process("fork", incr_and_report, (services.address, "hits", 200, theirs))
    proc.start()
    seen = [mine.recv() for _ in range(200)]
    proc.join(60)
    assert seen == list(range(2, 202))
    assert store["hits"] == 201
    assert store.incr("hits", 10) == 211


def test_a_writer_that_sets_a_counter_then_increments_it_sees_its_order(
    client: tuple[Store, Events],
) -> None:
    store, _ = client
    store.incr("n")
    store.incr("n")  # now in shared memory
    store["n"] = 10  # unanswered, still in flight when the next incr starts
    assert store.incr("n") == 11
    del store["n"]
    assert store.incr("n") == 1
    assert store.cas("n", 1, 5)
    assert store.incr("n", 2) == 7
    store["n"] = "text"
    with pytest.raises(TypeError, match="holds str"):
        store.incr("n")


def incr_while_frozen(services: RunServices, store: Store, within: float) -> bool:
    """Whether a key's second incr ends within ``within`` s while the services sleep."""
    assert store.incr("n") == 1  # the first incr is a round trip either way
    pid = services.pid
    assert pid is not None
    ended = threading.Event()

    def second_incr() -> None:
        store.incr("n")
        ended.set()

    second = threading.Thread(target=second_incr)
    os.kill(pid, signal.SIGSTOP)
    try:
        second.start()
        in_time = ended.wait(within)
    finally:
        os.kill(pid, signal.SIGCONT)
        second.join(60)
    assert ended.is_set() and store["n"] == 2
    return in_time


@ON_ONLY
def test_incr_of_a_counter_happens_in_shared_memory(
    services: RunServices, client: tuple[Store, Events]
) -> None:
    store, _ = client
    assert incr_while_frozen(services, store, within=60), "the incr needed the services"
    assert store._counters is not None


@OFF_ONLY
def test_without_fast_paths_every_incr_goes_to_the_services(
    services: RunServices, client: tuple[Store, Events]
) -> None:
    store, _ = client
    assert not incr_while_frozen(services, store, within=1.0), "an incr without the services"
    assert store._counters is None and store._entries == {}


def test_a_counter_that_leaves_64_bits_goes_on_in_the_services(
    client: tuple[Store, Events],
) -> None:
    store, _ = client
    store.incr("big", (1 << 63) - 2)
    assert store.incr("big") == (1 << 63) - 1
    assert store.incr("big") == 1 << 63
    assert store.incr("big", 1 << 70) == (1 << 63) + (1 << 70)
    assert store["big"] == (1 << 63) + (1 << 70)
