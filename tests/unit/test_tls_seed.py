"""Seeds carry the fleet CA: `--master-ca` puts the CA certificates into node.env on one
line, which the agent reads back as the same PEM; boot's guestfwd (a host-local forward)
marks a plain http:// master as no exposure; the admin client's transport rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from executor.agent.config import load_config
from imagefactory import pki
from imagefactory.boot import nodeenv, seed
from imagefactory.cli.main import main
from imagefactory.client import tls_verify
from imagefactory.errors import UserError


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca_dir = tmp_path_factory.mktemp("pki") / "ca"
    pki.create_ca(ca_dir)
    pki.rotate_ca(ca_dir)  # a bundle of two CA certificates, as during a rotation
    return ca_dir


def test_node_env_carries_the_bundle_and_the_agent_reads_it_back(
    ca_dir: Path, tmp_path: Path
) -> None:
    bundle = (ca_dir / "bundle.crt").read_text()
    node = seed.NodeVars("n1", master_url="https://10.0.2.100:8443", token="t", master_ca=bundle)
    pairs = dict(node.env())
    assert "\n" not in pairs["EXECUTOR_MASTER_CA"]
    nodeenv.render(node.env())  # fits node.env's one-line syntax
    env = {**pairs, "EXECUTOR_PIPELINE": str(tmp_path), "EXECUTOR_STATE_DIR": str(tmp_path)}
    assert load_config(env).master_ca == bundle


def test_master_ca_needs_an_https_master(ca_dir: Path) -> None:
    bundle = (ca_dir / "bundle.crt").read_text()
    node = seed.NodeVars("n1", master_url="http://10.0.2.100:8080", master_ca=bundle)
    with pytest.raises(UserError, match="--master-ca needs an https:// master URL"):
        node.env()


@pytest.mark.parametrize(
    ("url", "insecure", "expected"),
    [
        ("http://10.0.2.100:8080", True, "1"),
        ("https://10.0.2.100:8443", True, None),
        ("http://10.0.2.100:8080", False, None),
    ],
)
def test_insecure_only_for_plain_http_through_a_local_forward(
    url: str, insecure: bool, expected: str | None
) -> None:
    pairs = dict(seed.NodeVars("n1", master_url=url, insecure=insecure and "http:" in url).env())
    assert pairs.get("EXECUTOR_INSECURE") == expected


def test_seed_cli_writes_the_ca_and_refuses_a_bad_one(ca_dir: Path, tmp_path: Path) -> None:
    iso = tmp_path / "seed.iso"
    base = ["seed", "--node-id", "n1", "--token", "t", "-o", str(iso)]
    ok = CliRunner().invoke(
        main,
        [*base, "--master", "https://10.0.2.100:8443", "--master-ca", str(ca_dir / "bundle.crt")],
    )
    assert ok.exit_code == 0, ok.output
    user_data = seed.read_iso(iso)["user-data"]
    assert "EXECUTOR_MASTER_CA" in user_data and "-----END CERTIFICATE-----" in user_data
    leaf = pki.issue(ca_dir, "leaf", ("m.example",)).cert
    for path, message in (
        (leaf, "is not a CA certificate"),
        (tmp_path / "missing.pem", "cannot read --master-ca"),
    ):
        bad = CliRunner().invoke(
            main, [*base, "--master", "https://m.example", "--master-ca", str(path)]
        )
        assert bad.exit_code == 2 and message in bad.stderr, bad.output
    plain = CliRunner().invoke(
        main, [*base, "--master", "http://10.0.2.100:1", "--master-ca", str(ca_dir / "ca.crt")]
    )
    assert plain.exit_code == 2 and "needs an https:// master URL" in plain.stderr


@pytest.mark.parametrize("url", ["http://10.0.0.5:8750", "http://master.example.net"])
def test_admin_client_refuses_plain_http_beyond_loopback(url: str) -> None:
    with pytest.raises(UserError, match="refusing plain http://"):
        tls_verify(url)
    assert tls_verify(url, insecure=True).check_hostname


def test_admin_commands_refuse_plain_http_before_connecting(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("x\n")
    args = ["nodes", "--url", "http://10.0.0.5:8750", "--admin-token-file", str(token)]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 2 and "refusing plain http:// to 10.0.0.5" in done.stderr
