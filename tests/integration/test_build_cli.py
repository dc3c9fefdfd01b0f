"""`imagefactory builds ...` and `imagefactory environments ...` as users run them, against a
real `imagefactory serve` and a real builder baking installer environments."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imagefactory.cli.bake import FORMATS
from tests.integration.build_fleet import ADMIN, TARGET, Fleet, publish_pipelines
from tests.integration.services_harness import BIN, ServerProcess

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif("installer" not in FORMATS, reason="needs the installer format"),
]


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "imagefactory"), *args, "--url", server.url,
            "--admin-token-file", str(server.admin_token_file)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def test_builds_and_environments_commands(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    try:
        server = fleet.server()
        first, second = publish_pipelines(server.url, tmp_path, 2)
        submit = ["builds", "submit", "-t", TARGET, "--format", "installer"]
        queued = cli(server, *submit, "-p", second)
        assert queued.returncode == 0, queued.stderr
        second_id = queued.stdout.strip()
        cancelled = cli(server, "builds", "cancel", second_id, "--json")
        assert json.loads(cancelled.stdout)["state"] == "cancelled"

        fleet.builder(server.url, "b1")
        followed = cli(server, *submit, "-p", first, "--follow", "--json")
        assert followed.returncode == 0, followed.stderr
        build = json.loads(followed.stdout)
        assert build["state"] == "succeeded" and build["builder_id"] == "b1"
        assert "==> package: done in" in followed.stderr
        again = cli(server, *submit, "-p", first)
        assert again.stdout.strip() == build["build_id"], "built once, returned again"

        listed = json.loads(cli(server, "builds", "list", "--json").stdout)
        assert {b["build_id"]: b["state"] for b in listed} == {
            build["build_id"]: "succeeded",
            second_id: "cancelled",
        }
        table = cli(server, "builds", "list", "--state", "cancelled").stdout.splitlines()
        assert table[0].split()[:2] == ["BUILD_ID", "TARGET"] and len(table) == 2
        shown = cli(server, "builds", "show", second_id, "--follow")
        assert shown.returncode == 1 and "state cancelled" in shown.stdout
        logs = cli(server, "builds", "logs", build["build_id"])
        assert "==> script: install.sh with the package embedded" in logs.stdout

        [env] = json.loads(cli(server, "environments", "list", "--json").stdout)
        digest = env["digest"]
        assert env["build_id"] == build["build_id"] and env["name"] == "install.sh"
        whole = httpx.get(
            f"{server.url}/v1/environments/{digest}",
            headers={"Authorization": f"Bearer {ADMIN}"},
        ).content
        out = tmp_path / "pulled"
        part = out / f".{digest.removeprefix('sha256:')}.part"
        # What an interrupted pull leaves: the first part of the file.
        out.mkdir()
        part.write_bytes(whole[: len(whole) // 2])
        pulled = cli(server, "environments", "pull", digest, "-o", str(out), "--json")
        assert pulled.returncode == 0, pulled.stderr
        assert f"resuming at {len(whole) // 2} of {len(whole)} bytes" in pulled.stderr
        assert json.loads(pulled.stdout)["path"] == str(out / "install.sh")
        assert (out / "install.sh").read_bytes() == whole and not part.exists()
        # A part that is not the start of this file fails the check and is removed.
        wrong = tmp_path / "wrong"
        wrong.mkdir()
        (wrong / part.name).write_bytes(b"#!/bin/sh\nnot the same bytes at all\n")
        refused = cli(server, "environments", "pull", digest, "-o", str(wrong))
        assert refused.returncode == 2 and "Error: downloaded data has digest" in refused.stderr
        assert not (wrong / part.name).exists() and not (wrong / "install.sh").exists()

        pruned = json.loads(cli(server, "environments", "prune", "--json").stdout)
        assert digest not in pruned["removed"]
        assert cli(server, "environments", "pull", digest, "-o", str(out)).returncode == 0
        fleet.builders[0].stop()
        assert "b1" in {b["builder_id"] for b in _builders(server)}
    finally:
        fleet.close()


def _builders(server: ServerProcess) -> list[dict[str, str]]:
    response = httpx.get(f"{server.url}/v1/builders", headers={"Authorization": f"Bearer {ADMIN}"})
    rows: list[dict[str, str]] = response.json()
    return rows


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("cli") / "server")
    proc.workdir.mkdir()
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["builds", "show", "123"], "is not a build id"),
        (["builds", "show", "f" * 32], "404 no build"),
        (["builds", "submit", "-t", "sparc", "-p", "x"], "unknown target 'sparc'"),
        (["builds", "submit", "-t", TARGET, "--format", "vmdk", "-p", "x"], "unknown format"),
        (["builds", "submit", "-t", TARGET, "-p", "missing"], "no pipeline named missing"),
        (["builds", "submit", "-t", TARGET, "-p", "x@sha256:00"], "invalid pipeline"),
        (["environments", "pull", "sha256:00", "-o", "x"], "is not a digest"),
        (["environments", "pull", "sha256:" + "0" * 64, "-o", "x"], "no environment"),
    ],
)
def test_bad_input_is_one_line(
    server: ServerProcess, tmp_path: Path, args: list[str], words: str
) -> None:
    done = subprocess.run(
        [str(BIN / "imagefactory"), *args, "--url", server.url,
         "--admin-token-file", str(server.admin_token_file)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
