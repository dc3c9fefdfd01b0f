"""Output files: atomic for regular files, direct for devices and pipes, refused otherwise."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from executor.files import output_file, write_output


def test_a_regular_file_is_replaced_whole_with_the_given_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "results.json"
    write_output(target, b"first")
    write_output(target, b"second", mode=0o600)
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]  # no temporaries


def test_a_failure_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), output_file(target) as out:
        out.write(b"half")
        raise RuntimeError("disk full, say")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_link_to_a_regular_file_stays_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_bytes(b"old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_output(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"


def test_dev_null_stays_a_device(tmp_path: Path) -> None:
    before = os.stat("/dev/null")
    write_output("/dev/null", b"discarded")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino


def test_a_fifo_is_written_directly(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    write_output(fifo, b"through the pipe")
    reader.join(10)
    assert received == [b"through the pipe"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_dev_stdout_reaches_the_process_stdout(tmp_path: Path) -> None:
    code = "from executor.files import write_output; write_output('/dev/stdout', b'to stdout')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"to stdout"


def test_a_directory_or_socket_is_refused_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not a regular file, character device or pipe") as caught:
        write_output(tmp_path, b"x")
    assert caught.value.filename == str(tmp_path)
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(OSError, match="not a regular file"):
            write_output(path, b"x")
    assert stat.S_ISSOCK(path.stat().st_mode)


def test_an_error_names_the_file_asked_for_not_the_temporary(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError) as caught:
        write_output(blocker / "results.json", b"x")  # a path below a regular file
    assert caught.value.filename == str(blocker / "results.json")
