"""`boot --from` on the command line before any download: IMAGE or --from, never both,
and what it needs to download (no request is made: the master's port is closed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from imagefactory.cli.main import main

DIGEST = "sha256:" + "ab" * 32
CLOSED = "http://127.0.0.1:9"  # discard: nothing listens there


def boot(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["boot", "--node-id", "n", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), "give either IMAGE or --from MASTER_URL DIGEST"),
        (("image.qcow2", "--from", CLOSED, DIGEST), "give either IMAGE or --from"),
        (("--from", CLOSED, "sha256:ab"), "'sha256:ab' is not a digest like sha256:<64 hex>"),
        (("--from", CLOSED, DIGEST, "--runtime", "runc"), "--runtime is for container images"),
        (("--from", CLOSED, DIGEST), "--from needs --admin-token-file, or the node's --token"),
        (("--from", CLOSED), "requires 2 arguments"),
    ],
)
def test_bad_use_is_one_line(args: tuple[str, ...], words: str) -> None:
    code, output = boot(*args)
    assert code == 2 and words in output, output
    assert "Traceback" not in output


def test_a_master_that_is_down_is_one_line(tmp_path: Path) -> None:
    token = tmp_path / "admin"
    token.write_text("t0k\n")
    code, output = boot("--from", CLOSED, DIGEST, "--admin-token-file", str(token))
    assert code == 2 and "Error: cannot reach core services at http://127.0.0.1:9" in output
    assert "--url" not in output, "boot --from has no --url to point at"
    code, output = boot("--from", CLOSED, DIGEST, "--token", "node-token")
    assert code == 2 and "Error: download from http://127.0.0.1:9 failed" in output
