"""Following the serial console for EXECUTOR-STATUS lines, and showing its tail."""

from __future__ import annotations

from pathlib import Path

from imagefactory import console


def test_status_is_found_inside_noisy_lines() -> None:
    line = "[  12.3] executor[401]: EXECUTOR-STATUS node=n-1 run=r-9 state=starting\r"
    assert console.parse_status(line) == console.Status("n-1", "r-9", "starting")
    assert console.parse_status("EXECUTOR-STATUS node=n-1 run=r") is None
    assert console.parse_status("ordinary boot message") is None


def test_final_states() -> None:
    assert not console.Status("n", "r", "starting").final
    assert not console.Status("n", "r", "running").final
    assert console.Status("n", "r", "succeeded").final
    assert console.Status("n", "r", "failed").final


def test_follower_reads_only_what_was_appended(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    follower = console.ConsoleFollower(log)
    assert follower.poll() == [] and follower.last is None  # not created yet
    with log.open("ab") as f:
        f.write(b"boot...\nEXECUTOR-STATUS node=a run=r state=star")
    assert follower.poll() == []  # the line is not complete yet
    with log.open("ab") as f:
        f.write(b"ting\n\xff\xfe garbage\nEXECUTOR-STATUS node=a run=r state=succeeded\n")
    assert [s.state for s in follower.poll()] == ["starting", "succeeded"]
    assert follower.poll() == []
    assert follower.last == console.Status("a", "r", "succeeded")
    assert len(follower.statuses) == 2


def test_tail_strips_escape_sequences_and_line_ends(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(
        b"".join(b"line %d\r\n" % i for i in range(30)) + b"\x1b[0;32m  OK  \x1b[0m\r\n"
    )
    lines = console.tail(log, 3)
    assert lines == ["line 28", "line 29", "  OK  "]
    assert console.tail(tmp_path / "missing.log") == []
