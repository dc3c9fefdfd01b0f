"""Downloads from the store of a real `imagefactory serve` on loopback: a transfer cut
mid-way (a proxy that closes the connection after N bytes) resumes from the part's
offset, a corrupted part is refused with one line and removed, and `boot --from` boots
what it downloaded into the local cache (and finds it there the next time).

The store holds real blobs, uploaded through the builder API as a builder would: a
12 MiB qcow2 made by qemu-img and a small installer script."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagefactory.builder.master import MasterClient
from imagefactory.builder.upload import sha256_digest, upload
from imagefactory.tokens import builder_token
from tests.integration.build_fleet import SECRET, TARGET, Fleet, publish_pipelines, submit
from tests.integration.oci_image import heavy
from tests.integration.services_harness import BIN, ServerProcess

pytestmark = pytest.mark.timeout(600)
CUT_AT = 5 * 1024 * 1024


@dataclass(frozen=True)
class Stored:
    server: ServerProcess
    qcow2: Path
    digest: str
    installer_digest: str


def store(server: ServerProcess, workdir: Path, image_format: str, path: Path) -> str:
    """Upload `path` as the one artifact of a new build of `image_format`, as a builder."""
    [name] = publish_pipelines(server.url, workdir / image_format, 1)
    build = submit(server.url, name, image_format)
    master = MasterClient(server.url, "b1", builder_token(SECRET, "b1"))
    try:
        job = master.claim([TARGET], [image_format], wait_s=5)
        assert job is not None and job["build"]["build_id"] == build["build_id"]
        attempt, digest = job["build"]["attempt"], sha256_digest(path)
        upload(master, build["build_id"], attempt, path, digest)
        artifact = {"name": path.name, "digest": digest, "size": path.stat().st_size}
        outcome = {"state": "succeeded", "artifacts": [artifact]}
        assert master.finish(build["build_id"], attempt, outcome)["state"] == "succeeded"
    finally:
        master.close()
    return digest


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    workdir = tmp_path_factory.mktemp("store")
    fleet = Fleet(workdir)
    try:
        server = fleet.server()
        raw = workdir / "disk.raw"
        raw.write_bytes(os.urandom(12 * 1024 * 1024))
        image = workdir / f"{TARGET}.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True
        )
        script = workdir / "install.sh"
        script.write_text("#!/bin/sh\necho not a VM image\n")
        yield Stored(
            server, image, store(server, workdir, "qcow2", image),
            store(server, workdir, "installer", script),
        )  # fmt: skip
    finally:
        fleet.close()


class CuttingProxy:
    """A TCP proxy to `upstream` that closes each connection after forwarding `limit`
    bytes of the response: a download interrupted mid-transfer."""

    def __init__(self, upstream: str, limit: int) -> None:
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream, self.limit = (host, int(port)), limit
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as server:
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            sent = 0
            while sent < self.limit and (data := server.recv(65536)):
                client.sendall(data[: self.limit - sent])
                sent += len(data)
            for end in (client, server):  # wakes the other thread's recv, sends FIN
                end.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _requests(client: socket.socket, server: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                server.sendall(data)
        except OSError:
            pass  # the relay closed both ends

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy(stored: Stored) -> Iterator[CuttingProxy]:
    cutting = CuttingProxy(stored.server.url, CUT_AT)
    yield cutting
    cutting.close()


def imagefactory(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "imagefactory"), *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip


def pull(stored: Stored, url: str, output: Path) -> subprocess.CompletedProcess[str]:
    return imagefactory(
        "environments", "pull", stored.digest, "-o", str(output), "--url", url,
        "--admin-token-file", str(stored.server.admin_token_file),
    )  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def test_an_interrupted_pull_resumes_at_the_parts_offset(
    stored: Stored, proxy: CuttingProxy, tmp_path: Path
) -> None:
    part = tmp_path / f".{stored.digest.removeprefix('sha256:')}.part"
    size = stored.qcow2.stat().st_size
    cut = pull(stored, proxy.url, tmp_path)
    assert cut.returncode == 2, cut.stderr
    assert "Traceback" not in cut.stderr
    [line] = error_lines(cut.stderr)
    assert line.startswith(f"Error: download from {proxy.url} failed"), line
    kept = part.stat().st_size
    assert 0 < kept < CUT_AT < size
    assert part.read_bytes() == stored.qcow2.read_bytes()[:kept]
    assert not (tmp_path / stored.qcow2.name).exists()

    resumed = pull(stored, stored.server.url, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at {kept} of {size} bytes" in resumed.stderr
    assert f"verified {stored.digest}" in resumed.stderr
    final = tmp_path / stored.qcow2.name
    assert resumed.stdout.strip() == str(final) and not part.exists()
    assert final.read_bytes() == stored.qcow2.read_bytes()
    assert final.stat().st_mode & 0o777 == 0o600

    again = pull(stored, stored.server.url, tmp_path)
    assert again.returncode == 0 and "already there, verified" in again.stderr, again.stderr
    assert "downloading" not in again.stderr


def test_a_corrupted_part_is_refused_and_removed(stored: Stored, tmp_path: Path) -> None:
    part = tmp_path / f".{stored.digest.removeprefix('sha256:')}.part"
    head = bytearray(stored.qcow2.read_bytes()[: 3 * 1024 * 1024])
    head[1000:1010] = bytes(b ^ 0xFF for b in head[1000:1010])  # flipped bytes
    part.write_bytes(bytes(head))
    refused = pull(stored, stored.server.url, tmp_path)
    assert refused.returncode == 2, refused.stderr
    [line] = error_lines(refused.stderr)
    assert f"not {stored.digest}; removed it" in line and "Traceback" not in refused.stderr
    assert not part.exists() and not (tmp_path / stored.qcow2.name).exists()

    fresh = pull(stored, stored.server.url, tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert f"downloading {stored.qcow2.stat().st_size} bytes" in fresh.stderr
    assert "resuming" not in fresh.stderr
    digest = hashlib.sha256((tmp_path / stored.qcow2.name).read_bytes()).hexdigest()
    assert f"sha256:{digest}" == stored.digest


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_a_full_disk_keeps_the_part_for_the_next_try(stored: Stored, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        full = pull(stored, stored.server.url, small)
        assert full.returncode == 4, full.stderr
        [line] = error_lines(full.stderr)
        part = small / f".{stored.digest.removeprefix('sha256:')}.part"
        assert line == f"Error: {part}: No space left on device"
        kept = part.stat().st_size
        assert kept > 0
        subprocess.run(["mount", "-o", "remount,size=32m", str(small)], check=True)
        resumed = pull(stored, stored.server.url, small)
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming at {kept} of" in resumed.stderr
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
def test_boot_from_downloads_into_the_cache_and_boots_it(
    stored: Stored, proxy: CuttingProxy, tmp_path: Path
) -> None:
    env = {"IMAGEFACTORY_CACHE": str(tmp_path / "cache"), "XDG_STATE_HOME": str(tmp_path / "st")}
    cached = tmp_path / "cache" / "environments" / stored.digest.removeprefix("sha256:")

    def boot(
        url: str, admin: bool = True, cache: str = "cache"
    ) -> subprocess.CompletedProcess[str]:
        token = ("--admin-token-file", str(stored.server.admin_token_file)) if admin else ()
        return imagefactory(
            "boot", "--from", url, stored.digest, "--node-id", "pulled", *token,
            "--secret-file", str(stored.server.secret_file),
            "--accel", "tcg", "--wait", "none", "--json",
            env={**env, "IMAGEFACTORY_CACHE": str(tmp_path / cache)},
        )  # fmt: skip

    cut = boot(proxy.url)
    assert cut.returncode == 2 and len(error_lines(cut.stderr)) == 1, cut.stderr
    assert not (cached / stored.qcow2.name).exists()
    with heavy():
        booted = boot(stored.server.url)
        try:
            assert booted.returncode == 0, booted.stderr
            assert "resuming at" in booted.stderr
            [node] = json.loads(booted.stdout)
            assert node["node_id"] == "pulled"
            image = cached / stored.qcow2.name
            assert image.read_bytes() == stored.qcow2.read_bytes()
            overlay = tmp_path / "st" / "imagefactory" / "nodes" / "pulled" / "overlay.qcow2"
            info = subprocess.run(
                ["qemu-img", "info", "--output=json", "-U", str(overlay)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            assert json.loads(info.stdout)["backing-filename"] == str(image)
        finally:
            stopped = imagefactory("stop", "pulled", env=env)
        assert stopped.returncode == 0, stopped.stderr
        # The node's own token (from --secret-file) may download: a fresh cache fills.
        as_node = boot(stored.server.url, admin=False, cache="node-cache")
        try:
            assert as_node.returncode == 0, as_node.stderr
            assert f"downloading {stored.qcow2.stat().st_size} bytes" in as_node.stderr
        finally:
            imagefactory("stop", "pulled", env=env)
        again = boot(stored.server.url)
        try:
            assert again.returncode == 0, again.stderr
            assert "in the cache" in again.stderr and "downloading" not in again.stderr
        finally:
            imagefactory("stop", "pulled", env=env)


def test_boot_from_refuses_what_is_not_a_vm_image(stored: Stored, tmp_path: Path) -> None:
    done = imagefactory(
        "boot", "--from", stored.server.url, stored.installer_digest, "--node-id", "n",
        "--admin-token-file", str(stored.server.admin_token_file),
        env={"IMAGEFACTORY_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = error_lines(done.stderr)
    assert f"--from boots VM images (.qcow2); {stored.installer_digest} is install.sh" in line
    assert not (tmp_path / "cache").exists()
