"""Small executor parts: time format, settings, line splitting, pack, results."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest

from executor import contention, settings
from executor.engine.combined_log import MAX_LINE, CombinedLog, LineSplitter
from executor.engine.framing import PipeFrameReader, frame, write_frame
from executor.engine.messages import RunTask, frame_run_task
from executor.engine.results import write_results
from executor.engine.worker import _Inbox
from executor.pack import pack
from executor.pipeline import PipelineError, load_pipeline
from executor.timefmt import rfc3339, rfc3339_or_none


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000000Z"),
        (1_700_000_000.5, "2023-11-14T22:13:20.500000Z"),
        (1_700_000_000.9999996, "2023-11-14T22:13:21.000000Z"),
        (1_700_000_001.000001, "2023-11-14T22:13:21.000001Z"),
    ],
)
def test_rfc3339(epoch: float, expected: str) -> None:
    assert rfc3339(epoch) == expected
    assert rfc3339_or_none(None) is None


def test_settings_defaults_and_overrides(tmp_path: Path) -> None:
    env = {"EXECUTOR_STATE_DIR": str(tmp_path / "state")}
    resolved = settings.run_settings(env)
    assert resolved.node_id and resolved.workers == (os.cpu_count() or 1)
    assert len(resolved.run_id) == 36 and resolved.state_dir == tmp_path / "state"
    assert (tmp_path / "state").is_dir()
    env |= {"EXECUTOR_NODE_ID": "n-1", "EXECUTOR_RUN_ID": "r.1", "EXECUTOR_WORKERS": "3"}
    assert settings.run_settings(env) == settings.RunSettings("n-1", "r.1", 3, tmp_path / "state")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EXECUTOR_WORKERS": "0"}, "EXECUTOR_WORKERS: '0' is not an integer >= 1"),
        ({"EXECUTOR_WORKERS": "two"}, "EXECUTOR_WORKERS: 'two' is not an integer >= 1"),
        ({"EXECUTOR_NODE_ID": "a/b"}, "EXECUTOR_NODE_ID: 'a/b' is not 1-128 characters"),
        ({"EXECUTOR_RUN_ID": "x" * 129}, "EXECUTOR_RUN_ID: "),
        ({"EXECUTOR_STATE_DIR": "/proc/forbidden"}, "EXECUTOR_STATE_DIR: /proc/forbidden is not"),
    ],
)
def test_settings_errors_are_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(settings.SettingsError) as caught:
        settings.run_settings(env)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_line_splitter_keeps_the_unfinished_tail() -> None:
    splitter = LineSplitter("out")
    assert splitter.feed(b"ab") == b""
    assert splitter.feed(b"c\nde\nf") == b"abc\nde"
    assert splitter.feed(b"\n") == b"f"
    assert splitter.rest() == b""
    assert splitter.feed(b"tail") == b"" and splitter.rest() == b"tail"
    assert splitter.feed(b"x" * MAX_LINE) == b"x" * MAX_LINE  # a huge line is cut, not held


def test_combined_log_escapes_invalid_utf8(tmp_path: Path) -> None:
    with CombinedLog(tmp_path / "sub" / "log") as log:
        log.write("task:t", "out", b"bad \xff byte\nsecond", 0.0)
    assert (tmp_path / "sub" / "log").read_text().splitlines() == [
        "1970-01-01T00:00:00.000000Z task:t out bad \\xff byte",
        "1970-01-01T00:00:00.000000Z task:t out second",
    ]


def _pipeline_dir(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "tasks.py").write_text("def f(ctx):\n    return 1\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "junk.pyc").write_bytes(b"junk")
    document = {"format": 1, "name": "packed", "tasks": [{"id": "a", "call": "pkg.tasks:f"}]}
    (root / "pipeline.json").write_text(json.dumps(document))
    return root


def test_pack_is_reproducible_and_loadable(tmp_path: Path) -> None:
    source = _pipeline_dir(tmp_path / "src")
    first, second = tmp_path / "one.tar.gz", tmp_path / "two.tar.gz"
    digest = pack(source, first)
    os.utime(source / "pkg" / "tasks.py", (1, 1))
    assert pack(source, second) == digest
    assert first.read_bytes() == second.read_bytes()
    assert hashlib.sha256(first.read_bytes()).hexdigest() == digest
    with tarfile.open(first) as tar:
        names = tar.getnames()
    assert names == ["pipeline.json", "pkg", "pkg/__init__.py", "pkg/tasks.py"]
    assert load_pipeline(first).tasks["a"].call == "pkg.tasks:f"


def test_pack_into_the_directory_it_packs(tmp_path: Path) -> None:
    source = _pipeline_dir(tmp_path / "src")
    first = pack(source, source / "p.tar.gz")
    assert pack(source, source / "p.tar.gz") == first


def test_pack_refuses_an_invalid_directory(tmp_path: Path) -> None:
    source = _pipeline_dir(tmp_path / "src")
    (source / "pipeline.json").write_text("{")
    with pytest.raises(PipelineError, match="invalid JSON"):
        pack(source, tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()
    with pytest.raises(PipelineError, match="not a directory"):
        pack(source / "pipeline.json", tmp_path / "out.tar.gz")


def test_write_results_is_atomic_json(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "results.json"
    write_results(target, {"status": "succeeded"})
    assert json.loads(target.read_text()) == {"status": "succeeded"}
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_frame_reader_reassembles_split_and_joined_frames() -> None:
    data = frame(("a", 1)) + frame(None) + frame({"big": "x" * 100_000})
    reader = PipeFrameReader()
    messages = []
    for start in range(0, len(data), 7_000):
        messages += reader.feed(data[start : start + 7_000])
    assert messages == [("a", 1), None, {"big": "x" * 100_000}]
    assert reader.feed(b"") == []


def test_frame_reader_takes_frames_cut_anywhere() -> None:
    frames = [frame([1]), frame("two"), frame(None)]
    data = b"".join(frames)
    boundaries = {len(b"".join(frames[:i])) for i in range(len(frames) + 1)}
    for cut in range(len(data) + 1):  # inside a header, inside a pickle, between frames
        reader = PipeFrameReader()
        first = reader.feed(data[:cut])
        assert reader.empty == (cut in boundaries)
        assert first + reader.feed(data[cut:]) == [[1], "two", None]
        assert reader.empty


def test_write_frame_writes_all_of_a_frame_larger_than_the_pipe() -> None:
    read_end, write_end = os.pipe()
    data = frame(b"x" * 1_000_000)
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        write_frame(write_end, data)
        write_frame(write_end, b"")
    finally:
        os.close(write_end)
        reader.join()
        os.close(read_end)
    assert bytes(received) == data


@pytest.mark.parametrize("delay_s", [0.0, 0.001, 0.05])
@pytest.mark.parametrize("spin_s", [0.0, 0.0002])
def test_a_worker_inbox_gets_each_message_whether_it_spins_or_sleeps(
    delay_s: float, spin_s: float
) -> None:
    # A message may come before, during or after the spin; none may be lost or doubled.
    read_end, write_end = os.pipe()
    a, b = (RunTask(task_id, 1, "pkg.tasks:f", {}, {}, 0, True) for task_id in "ab")
    try:
        inbox = _Inbox(read_end)
        data = frame_run_task(*a) + frame_run_task(*b)
        sender = threading.Timer(delay_s, os.write, (write_end, data))
        sender.start()
        assert [inbox.next(spin_s), inbox.next(spin_s)] == [a, b]
        sender.join()
    finally:
        os.close(read_end)
        os.close(write_end)


def _psi(path: Path, avg10: float, total_us: int) -> None:
    path.write_text(
        f"some avg10={avg10:.2f} avg60=0.00 avg300=0.00 total={total_us}\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )


def test_contention_from_pressure_stall_information(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    psi, clock = tmp_path / "cpu", [100.0]
    monkeypatch.setattr("executor.contention.time.monotonic", lambda: clock[0])
    _psi(psi, avg10=40.0, total_us=1_000_000)
    watch = contention.Contention(str(psi))
    assert watch.quiet() is True  # no window yet: optimistic
    clock[0] += 0.05
    _psi(psi, avg10=40.0, total_us=1_050_000)
    assert watch.quiet() is True  # the window is not over: the answer is kept
    clock[0] += 0.07
    assert watch.quiet() is False  # 50 ms stalled in the last 120 ms
    clock[0] += 0.12
    _psi(psi, avg10=40.0, total_us=1_052_000)
    assert watch.quiet() is True  # 2 ms in 120 ms, whatever the 10 s average says
    clock[0] += 5.0
    _psi(psi, avg10=40.0, total_us=9_000_000)
    assert watch.quiet() is True  # no recent window (the run was idle): a new one starts


def test_contention_without_pressure_information_uses_the_load_average(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("executor.contention.CPUS", 2)
    monkeypatch.setattr("executor.contention.os.getloadavg", lambda: (1.5, 0.0, 0.0))
    assert contention.Contention(str(tmp_path / "absent")).quiet() is True
    monkeypatch.setattr("executor.contention.os.getloadavg", lambda: (2.5, 0.0, 0.0))
    assert contention.Contention(str(tmp_path / "absent")).quiet() is False
