"""Seed contents: node.env, identity, users, and the ISO that carries them."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from imagefactory.boot import nodeenv, seed
from imagefactory.cli.main import main
from imagefactory.tokens import node_token

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJzR7LL/Ue0FjAugj3CGe8cgKqg4LrDTq1GCTlDzTOAB me@host"


def docs(made: seed.Seed) -> dict[str, Any]:
    return {name: yaml.safe_load(text) for name, text in made.files.items()}


def node_env_of(user_data: dict[str, Any]) -> str:
    (entry,) = [f for f in user_data["write_files"] if f["path"] == "/etc/executor/node.env"]
    assert entry["permissions"] == "0600"
    assert entry["owner"] == "root:root"
    content = entry["content"]
    assert isinstance(content, str)
    return content


def test_user_data_writes_node_env_with_all_variables() -> None:
    node = seed.NodeVars(
        node_id="n-1",
        run_id="r1",
        master_url="http://10.0.2.100:8080",
        token="tok",
        extra_env=(("EXECUTOR_WORKERS", "2"), ("GREETING", 'say "hi" $USER')),
    )
    made = seed.render_seed(node)
    assert made.files["user-data"].startswith("#cloud-config\n")
    assert node_env_of(docs(made)["user-data"]) == (
        'EXECUTOR_NODE_ID="n-1"\n'
        'EXECUTOR_RUN_ID="r1"\n'
        'EXECUTOR_MASTER_URL="http://10.0.2.100:8080"\n'
        'EXECUTOR_TOKEN="tok"\n'
        'EXECUTOR_ON_COMPLETE="poweroff"\n'
        'EXECUTOR_WORKERS="2"\n'
        'GREETING="say \\"hi\\" \\$USER"\n'
    )


def test_unset_options_leave_their_variables_out() -> None:
    text = node_env_of(docs(seed.render_seed(seed.NodeVars(node_id="solo")))["user-data"])
    assert text == 'EXECUTOR_NODE_ID="solo"\nEXECUTOR_ON_COMPLETE="poweroff"\n'


def test_meta_data_has_identity_and_no_token() -> None:
    node = seed.NodeVars(node_id="Node_7.x", run_id="r", master_url="http://m", token="SECRET")
    made = seed.render_seed(node)
    meta = docs(made)["meta-data"]
    assert meta["instance-id"] == made.instance_id
    assert meta["local-hostname"] == made.hostname == "node-7-x"
    assert meta["executor"] == {"node_id": "Node_7.x", "run_id": "r", "master_url": "http://m"}
    assert "SECRET" not in made.files["meta-data"]


def test_meta_data_has_cloud_init_local_apply_the_whole_seed() -> None:
    """dsmode local: node.env is written before the network, by the stage the agent's
    ordering reaches first (docs/bake.md)."""
    assert docs(seed.render_seed(seed.NodeVars(node_id="n")))["meta-data"]["dsmode"] == "local"


def test_every_render_gets_a_fresh_instance_id() -> None:
    node = seed.NodeVars(node_id="n")
    assert seed.render_seed(node).instance_id != seed.render_seed(node).instance_id


def test_no_password_and_ops_only_with_a_key() -> None:
    without = docs(seed.render_seed(seed.NodeVars(node_id="n")))["user-data"]
    assert without["ssh_pwauth"] is False and without["disable_root"] is True
    assert without["users"] == {}
    with_key = docs(seed.render_seed(seed.NodeVars(node_id="n", ssh_keys=(KEY,))))["user-data"]
    (ops,) = with_key["users"]
    assert ops["name"] == "ops" and ops["lock_passwd"] is True
    assert ops["ssh_authorized_keys"] == [KEY]
    assert not any("passw" in k and k != "lock_passwd" for k in ops)


def test_hostile_values_cannot_break_the_yaml() -> None:
    value = "x\": 1 #c ]} {{ $node_env ${users} \\ ' ✓"
    node = seed.NodeVars(node_id="n", extra_env=(("V", value),))
    made = seed.render_seed(node)
    assert node_env_of(docs(made)["user-data"]) == nodeenv.render(node.env())
    assert node.env()[-1] == ("V", value)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (seed.NodeVars(node_id="bad id"), "invalid node ID"),
        (seed.NodeVars(node_id="-lead"), "invalid node ID"),
        (seed.NodeVars(node_id="n", on_complete="reboot"), "invalid on-complete"),
        (seed.NodeVars(node_id="n", extra_env=(("EXECUTOR_TOKEN", "x"),)), "cannot set"),
        (seed.NodeVars(node_id="n", extra_env=(("V", "a\nb"),)), "contains a newline"),
    ],
)
def test_bad_node_variables_are_refused(node: seed.NodeVars, message: str) -> None:
    with pytest.raises(click.ClickException, match=message):
        seed.render_seed(node)


def test_iso_holds_the_three_files(tmp_path: Path) -> None:
    made = seed.render_seed(seed.NodeVars(node_id="n", ssh_keys=(KEY,)))
    iso = tmp_path / "seed.iso"
    seed.write_iso(made, iso)
    assert seed.read_iso(iso) == made.files
    # The primary volume descriptor at sector 16 carries the NoCloud label.
    pvd = iso.read_bytes()[16 * 2048 : 17 * 2048]
    assert pvd[1:6] == b"CD001" and pvd[40:72].rstrip() == b"cidata"
    assert stat.S_IMODE(iso.stat().st_mode) == 0o600  # it carries the node's token


def test_a_seed_written_into_a_device_leaves_the_device(tmp_path: Path) -> None:
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    before = null.lstat()
    seed.write_iso(seed.render_seed(seed.NodeVars(node_id="n")), null)
    after = null.lstat()
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino


def run_seed(tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    out = tmp_path / "seed.iso"
    result = CliRunner().invoke(main, ["seed", "-o", str(out), *args])
    return result.exit_code, result.output, out


def test_seed_command_derives_the_token_from_the_secret(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("  s3cret\n")
    code, output, out = run_seed(tmp_path, "--node-id", "n-3", "--secret-file", str(secret))
    assert code == 0, output
    user_data = yaml.safe_load(seed.read_iso(out)["user-data"])
    assert f'EXECUTOR_TOKEN="{node_token("s3cret", "n-3")}"' in node_env_of(user_data)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--node-id", "n", "--env", "NOEQUALS"], "not of the form KEY=VALUE"),
        (["--node-id", "n", "--env", "A=x\ny"], "contains a newline"),
        (["--node-id", "n", "--token", "t", "--secret-file", "/nope"], "not both"),
        (["--node-id", "n", "--secret-file", "/nonexistent/secret"], "does not exist"),
        (["--node-id", "n", "--ssh-key", "/nonexistent.pub"], "cannot read SSH public key"),
        (["--node-id", "a/b"], "invalid node ID"),
        (["--node-id", "n", "--env", "A=x\udcffy"], "the value of A is not UTF-8 text"),
        (["--node-id", "n", "--master", "not a url"], "invalid master URL 'not a url'"),
        (["--node-id", "n", "--master", "ftp://h/"], "invalid master URL"),
        (["--node-id", "n", "--master", "http://h/ x"], "invalid master URL"),
    ],
)
def test_seed_command_rejects_bad_input_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    code, output, out = run_seed(tmp_path, *args)
    assert code == 2
    assert output.startswith("Error: ") and message in output
    assert "Traceback" not in output and not out.exists()


def test_a_private_key_is_not_taken_for_a_public_one(tmp_path: Path) -> None:
    private = tmp_path / "id"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END-----\n")
    code, output, _ = run_seed(tmp_path, "--node-id", "n", "--ssh-key", str(private))
    assert code == 2 and "does not hold one SSH public key" in output
