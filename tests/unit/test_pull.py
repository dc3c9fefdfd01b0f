"""The pure parts of deploy/pull.py: which store names become files, and the progress
lines of a long download."""

from __future__ import annotations

import pytest

from imagefactory.deploy import pull
from imagefactory.errors import UserError

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("name", ["x86_64-linux.qcow2", "install.sh", "x86_64-linux-oci.tar"])
def test_plain_names_are_file_names(name: str) -> None:
    assert pull.file_name({"name": name, "digest": DIGEST}) == name


@pytest.mark.parametrize("name", ["", "../etc/passwd", "a/b", ".hidden", "..", "a\0b"])
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(UserError, match="unusable file name"):
        pull.file_name({"name": name, "digest": DIGEST})


def test_the_cache_is_one_directory_per_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEFACTORY_CACHE", "/c")
    assert str(pull.cache_dir(DIGEST)) == "/c/environments/" + "a" * 64


def test_progress_lines_are_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("imagefactory.deploy.pull.time.monotonic", lambda: clock[0])
    lines: list[str] = []
    meter = pull.Meter("img.qcow2", lines.append)
    meter.begin(10 * pull.MIB, 100 * pull.MIB)
    for _ in range(9):  # 9 MiB in 0.9 s: no line
        clock[0] += 0.1
        meter.add(pull.MIB)
    clock[0] += pull.REPORT_EVERY_S
    meter.add(pull.MIB)  # 20 MiB after 2.9 s
    meter.add(80 * pull.MIB)  # done: no interim line for the last chunk
    meter.end()
    assert lines == [
        f"img.qcow2: resuming at {10 * pull.MIB} of {100 * pull.MIB} bytes",
        "img.qcow2: 20% (20.0 of 100.0 MiB, 3.4 MiB/s)",
        "img.qcow2: 100% (100.0 of 100.0 MiB, 31.0 MiB/s) in 2.9 s",
    ]


def test_a_fresh_download_says_its_size() -> None:
    lines: list[str] = []
    pull.Meter("install.sh", lines.append).begin(0, 1234)
    assert lines == ["install.sh: downloading 1234 bytes"]
