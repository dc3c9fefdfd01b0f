"""The blob store under concurrent writers: a retried chunk racing the first one, and two
callers storing the same small blob at once."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imagefactory.server.blobs import BlobStore, UploadError


def _in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run each call in its own thread: its result, or the exception it raised."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def _meeting(monkeypatch: pytest.MonkeyPatch, name: str, target: Any) -> None:
    """Make `target.name` wait (up to a second) until two callers are in it, so that two
    writers overlap there whenever nothing else keeps them apart."""
    original = getattr(target, name)
    barrier = threading.Barrier(2, timeout=1.0)

    def met(*args: Any) -> Any:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass  # the other caller is held elsewhere (e.g. by the lock): go on alone
        return original(*args)

    monkeypatch.setattr(target, name, met)


def test_a_retried_chunk_racing_the_first_is_stored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path)
    first, second = os.urandom(4096), os.urandom(1000)
    digest = "sha256:" + hashlib.sha256(first + second).hexdigest()
    size = len(first) + len(second)
    _meeting(monkeypatch, "fsync", os)  # both would be writing at once
    results = _in_threads(
        lambda: store.append("u1", digest, size, 0, first),
        lambda: store.append("u1", digest, size, 0, first),
    )
    monkeypatch.undo()
    assert [r for r in results if not isinstance(r, Exception)] == [len(first)]
    [conflict] = [r for r in results if isinstance(r, UploadError)]
    assert conflict.offset == len(first) and not conflict.invalid
    assert store.upload_offset("u1", digest) == len(first)
    assert store.append("u1", digest, size, len(first), second) == size
    assert store.read_bytes(digest) == first + second
    assert list(store.uploads.iterdir()) == []


def test_a_chunk_after_the_upload_completed_answers_the_whole_size(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"whole"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.append("u1", digest, len(data), 0, data) == len(data)
    assert store.append("u1", digest, len(data), 0, data) == len(data)
    assert store.read_bytes(digest) == data
    assert list(store.uploads.iterdir()) == []


def test_wrong_data_is_dropped_and_the_upload_starts_again(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = "sha256:" + hashlib.sha256(b"right").hexdigest()
    with pytest.raises(UploadError) as caught:
        store.append("u1", digest, 5, 0, b"wrong")
    assert caught.value.invalid and caught.value.offset == 0
    assert store.upload_offset("u1", digest) == 0
    assert store.append("u1", digest, 5, 0, b"right") == 5
    assert store.has(digest)


def test_two_threads_putting_the_same_bytes_both_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(10000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _meeting(monkeypatch, "_publish", BlobStore)  # both written, neither published yet
    results = _in_threads(lambda: store.put_bytes(data), lambda: store.put_bytes(data))
    assert results == [digest, digest]
    assert list(store.digests()) == [digest]
    assert store.read_bytes(digest) == data
    assert list(store.uploads.iterdir()) == []
