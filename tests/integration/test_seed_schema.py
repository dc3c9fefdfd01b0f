"""The rendered seed checked by the real tools: cloud-init's schema and blkid's label probe."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from imagefactory.boot import seed

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJzR7LL/Ue0FjAugj3CGe8cgKqg4LrDTq1GCTlDzTOAB me@host"

NODES = {
    "minimal": seed.NodeVars(node_id="n"),
    "full": seed.NodeVars(
        node_id="n-1",
        run_id="run-1",
        master_url="http://10.0.2.100:8080",
        token="0" * 64,
        on_complete="none",
        extra_env=(("HOSTILE", 'a "b" $c `d` \\e ✓ = #'),),
        ssh_keys=(KEY,),
    ),
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run scripts/setup-host.sh")
    return path


@pytest.mark.parametrize("name", NODES)
def test_user_data_is_valid_cloud_config(tmp_path: Path, name: str) -> None:
    user_data = tmp_path / "user-data"
    user_data.write_text(seed.render_seed(NODES[name]).files["user-data"], encoding="utf-8")
    proc = subprocess.run(
        [tool("cloud-init"), "schema", "--config-file", str(user_data)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Valid cloud-config" in proc.stdout


def test_schema_check_catches_a_broken_document(tmp_path: Path) -> None:
    # Guards the test above: the checker must really reject what it does not accept.
    bad = tmp_path / "user-data"
    bad.write_text("#cloud-config\nssh_pwauth: maybe\nusers: 7\n", encoding="utf-8")
    proc = subprocess.run(
        [tool("cloud-init"), "schema", "--config-file", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode != 0


def test_blkid_sees_a_cidata_iso9660_volume(tmp_path: Path) -> None:
    iso = tmp_path / "seed.iso"
    seed.write_iso(seed.render_seed(NODES["full"]), iso)
    probe = subprocess.run(
        [tool("blkid"), "-o", "export", str(iso)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "TYPE=iso9660" in probe
    assert "LABEL=cidata" in probe
