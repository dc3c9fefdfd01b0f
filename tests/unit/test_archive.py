"""Pipeline archives are unpacked within limits, as plain files only, on every Python."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from executor.archive import ArchiveError, ArchiveLimits, MiB, extract

AddMembers = Callable[[tarfile.TarFile], None]


def make_archive(path: Path, add: AddMembers, fmt: int = tarfile.PAX_FORMAT) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        add(tar)
    path.write_bytes(gzip.compress(raw.getvalue(), compresslevel=1))
    return path


def file_member(name: str, data: bytes = b"x", **attrs: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def add_files(*members: tuple[tarfile.TarInfo, bytes]) -> AddMembers:
    def add(tar: tarfile.TarFile) -> None:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)

    return add


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_plain_files_and_directories_come_out_as_packed(tmp_path: Path) -> None:
    directory = tarfile.TarInfo("pkg")
    directory.type, directory.mode = tarfile.DIRTYPE, 0o755
    archive = make_archive(
        tmp_path / "p.tar.gz",
        add_files(
            (directory, b""),
            file_member("pkg/tasks.py", b"print('hi')\n", mode=0o644),
            file_member("run.sh", b"#!/bin/sh\n", mode=0o755),
        ),
    )
    root = tmp_path / "out"
    root.mkdir()
    extract(archive, root, ArchiveLimits())
    assert (root / "pkg" / "tasks.py").read_bytes() == b"print('hi')\n"
    assert stat.S_IMODE((root / "pkg" / "tasks.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "run.sh").stat().st_mode) == 0o755


def test_setuid_bits_and_archive_owners_are_dropped(tmp_path: Path) -> None:
    archive = make_archive(
        tmp_path / "p.tar.gz",
        add_files(
            file_member("suid", b"x", mode=0o6755, uid=4242, gid=4242, uname="evil", gname="evil"),
            file_member("sticky", b"y", mode=0o1644, uid=0, gid=0),
        ),
    )
    root = tmp_path / "out"
    root.mkdir()
    extract(archive, root, ArchiveLimits())
    suid = (root / "suid").stat()
    assert stat.S_IMODE(suid.st_mode) == 0o755
    assert (suid.st_uid, suid.st_gid) == (os.getuid(), os.getgid())
    assert stat.S_IMODE((root / "sticky").stat().st_mode) == 0o644


def test_a_small_archive_that_expands_past_the_limit_stops_there(tmp_path: Path) -> None:
    bomb = make_archive(tmp_path / "bomb.tar.gz", add_files(file_member("zeros", bytes(8 * MiB))))
    assert bomb.stat().st_size < 100_000  # small as sent
    root = tmp_path / "out"
    root.mkdir()
    with pytest.raises(ArchiveError, match="EXECUTOR_PIPELINE_MAX_BYTES"):
        extract(bomb, root, ArchiveLimits(max_bytes=1 * MiB))
    assert tree_bytes(root) == 0  # refused on the declared size, before writing


def test_a_stream_that_lies_about_sizes_is_cut_at_the_limit(tmp_path: Path) -> None:
    """Many files, each small: their total passes the limit part way through."""
    members = [file_member(f"f{i:03}", bytes(256 * 1024)) for i in range(16)]
    archive = make_archive(tmp_path / "many.tar.gz", add_files(*members))
    root = tmp_path / "out"
    root.mkdir()
    with pytest.raises(ArchiveError, match="EXECUTOR_PIPELINE_MAX_BYTES"):
        extract(archive, root, ArchiveLimits(max_bytes=1 * MiB))
    assert tree_bytes(root) <= 1 * MiB


def test_a_huge_header_is_cut_at_the_limit(tmp_path: Path) -> None:
    info, data = file_member("x", b"x")
    info.pax_headers = {"comment": "A" * (4 * MiB)}
    archive = make_archive(tmp_path / "pax.tar.gz", add_files((info, data)))
    root = tmp_path / "out"
    root.mkdir()
    with pytest.raises(ArchiveError, match="EXECUTOR_PIPELINE_MAX_BYTES"):
        extract(archive, root, ArchiveLimits(max_bytes=1 * MiB))


def test_too_many_members_are_refused(tmp_path: Path) -> None:
    members = [file_member(f"f{i}") for i in range(11)]
    archive = make_archive(tmp_path / "many.tar.gz", add_files(*members))
    root = tmp_path / "out"
    root.mkdir()
    with pytest.raises(ArchiveError, match="more than 10 members.*EXECUTOR_PIPELINE_MAX_FILES"):
        extract(archive, root, ArchiveLimits(max_files=10))
    assert len(list(root.iterdir())) == 10


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, b""


@pytest.mark.parametrize(
    "member",
    [
        special("link", tarfile.SYMTYPE, "/etc/passwd"),
        special("hard", tarfile.LNKTYPE, "pipeline.json"),
        special("dev", tarfile.CHRTYPE),
        special("fifo", tarfile.FIFOTYPE),
        file_member("/etc/evil"),
        file_member("../escape"),
        file_member("a/../../escape"),
    ],
    ids=["symlink", "hardlink", "device", "fifo", "absolute", "dotdot", "nested-dotdot"],
)
def test_members_that_are_not_plain_paths_inside_are_refused(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes]
) -> None:
    archive = make_archive(tmp_path / "p.tar.gz", add_files(file_member("ok"), member))
    root = tmp_path / "box" / "out"
    root.mkdir(parents=True)
    with pytest.raises(ArchiveError, match="refusing member"):
        extract(archive, root, ArchiveLimits())
    assert sorted(p.name for p in (tmp_path / "box").rglob("*")) == ["ok", "out"]


def test_a_member_twice_is_refused(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "p.tar.gz", add_files(file_member("a"), file_member("a")))
    root = tmp_path / "out"
    root.mkdir()
    with pytest.raises(ArchiveError, match="'a' appears twice"):
        extract(archive, root, ArchiveLimits())


@pytest.mark.parametrize("content", [b"", b"not gzip at all", gzip.compress(b"not a tar" * 100)])
def test_what_is_not_a_tar_gz_is_refused(tmp_path: Path, content: bytes) -> None:
    archive = tmp_path / "p.tar.gz"
    archive.write_bytes(content)
    root = tmp_path / "out"
    root.mkdir()
    with pytest.raises(ArchiveError, match="not a valid .tar.gz archive"):
        extract(archive, root, ArchiveLimits())


def test_limits_come_from_the_environment() -> None:
    assert ArchiveLimits.from_env({}) == ArchiveLimits()
    limits = ArchiveLimits.from_env(
        {
            "EXECUTOR_PIPELINE_MAX_BYTES": "1000",
            "EXECUTOR_PIPELINE_MAX_FILES": "7",
            "EXECUTOR_PIPELINE_MAX_DOWNLOAD_BYTES": "99",
        }
    )
    assert limits == ArchiveLimits(max_bytes=1000, max_files=7, max_download_bytes=99)


@pytest.mark.parametrize("value", ["0", "-5", "ten", "1.5", "1e9"])
def test_a_bad_limit_is_one_line_naming_the_variable(value: str) -> None:
    with pytest.raises(ValueError) as caught:
        ArchiveLimits.from_env({"EXECUTOR_PIPELINE_MAX_FILES": value})
    assert str(caught.value) == f"EXECUTOR_PIPELINE_MAX_FILES: {value!r} is not an integer >= 1"
