"""The agent's TLS settings: EXECUTOR_MASTER_CA as a file or as PEM text, the client
certificate for mutual TLS, and the refusal of plain http:// beyond loopback. Nothing here
connects anywhere: the refusals happen while the configuration is read."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from executor.agent.config import AgentConfigError, is_loopback, load_config
from executor.agent.master import Master
from imagefactory import pki


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A node with a token that no message may echo."""
    names = ("EXECUTOR_NODE_ID", "EXECUTOR_PIPELINE", "EXECUTOR_STATE_DIR", "EXECUTOR_TOKEN")
    values = ("node-a", str(tmp_path), str(tmp_path / "state"), "s3cr3t-node-token")
    return dict(zip(names, values, strict=True))


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca_dir = tmp_path_factory.mktemp("pki") / "ca"
    pki.create_ca(ca_dir)
    pki.issue(ca_dir, "node-a", (), client=True)
    return ca_dir


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.2.100:8750",
        "http://192.168.1.5",
        "http://master.example.net:8080",
        "http://[fe80::1]:80",
        "http://127.0.0.1.nip.io",
    ],
)
def test_plain_http_beyond_loopback_is_refused(env: dict[str, str], url: str) -> None:
    with pytest.raises(AgentConfigError, match="plain http://.*EXECUTOR_INSECURE=1") as exc:
        load_config({**env, "EXECUTOR_MASTER_URL": url})
    assert "\n" not in str(exc.value) and "s3cr3t" not in str(exc.value)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8750", "http://127.8.9.10", "http://localhost:1", "http://[::1]:80"]
)
def test_plain_http_on_loopback_is_allowed(env: dict[str, str], url: str) -> None:
    assert load_config({**env, "EXECUTOR_MASTER_URL": url}).insecure is False
    assert is_loopback(url)


def test_insecure_opt_out_is_logged(env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    env = {**env, "EXECUTOR_MASTER_URL": "http://10.0.2.100:8750", "EXECUTOR_INSECURE": "1"}
    with caplog.at_level(logging.WARNING, logger="executor.agent.config"):
        assert load_config(env).insecure is True
    assert [r.getMessage() for r in caplog.records] == [
        "insecure: EXECUTOR_INSECURE=1, the master http://10.0.2.100:8750 is plain http://"
    ]


@pytest.mark.parametrize("value", ["yes", "true", "2", "on"])
def test_insecure_takes_only_0_or_1(env: dict[str, str], value: str) -> None:
    with pytest.raises(AgentConfigError, match="EXECUTOR_INSECURE: .* is not 0 or 1"):
        load_config({**env, "EXECUTOR_INSECURE": value})


def test_https_beyond_loopback_needs_no_opt_out(env: dict[str, str]) -> None:
    config = load_config({**env, "EXECUTOR_MASTER_URL": "https://10.0.2.100:8750"})
    assert config.master_ca is None and config.insecure is False


def test_master_ca_as_a_file_or_as_pem_text(env: dict[str, str], ca_dir: Path) -> None:
    bundle = ca_dir / "bundle.crt"
    env = {**env, "EXECUTOR_MASTER_URL": "https://10.0.2.100:8750"}
    from_file = load_config({**env, "EXECUTOR_MASTER_CA": str(bundle)}).master_ca
    from_text = load_config({**env, "EXECUTOR_MASTER_CA": bundle.read_text()}).master_ca
    one_line = load_config({**env, "EXECUTOR_MASTER_CA": pki.one_line(bundle.read_text())})
    assert from_file == from_text == one_line.master_ca == bundle.read_text()
    master = Master("https://10.0.2.100:8750", "tok", "node-a", ca_pem=from_file)
    context = master.tls()
    assert context.check_hostname and len(context.get_ca_certs()) == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/nonexistent/ca.pem", "cannot read /nonexistent/ca.pem"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----", "not a usable"),
    ],
)
def test_bad_master_ca_is_one_line(env: dict[str, str], value: str, message: str) -> None:
    env = {**env, "EXECUTOR_MASTER_URL": "https://m.example", "EXECUTOR_MASTER_CA": value}
    with pytest.raises(AgentConfigError, match=message) as exc:
        load_config(env)
    assert "\n" not in str(exc.value)


def test_master_ca_file_without_a_certificate(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "empty.pem").write_text("hello\n")
    env = {
        **env,
        "EXECUTOR_MASTER_URL": "https://m.example",
        "EXECUTOR_MASTER_CA": str(tmp_path / "empty.pem"),
    }
    with pytest.raises(AgentConfigError, match="holds no PEM certificate"):
        load_config(env)


def test_master_ca_with_plain_http_is_a_mistake(env: dict[str, str], ca_dir: Path) -> None:
    env = {
        **env,
        "EXECUTOR_MASTER_URL": "http://127.0.0.1:8750",
        "EXECUTOR_MASTER_CA": str(ca_dir / "bundle.crt"),
    }
    with pytest.raises(AgentConfigError, match="EXECUTOR_MASTER_URL is not https://"):
        load_config(env)


def test_client_certificate(env: dict[str, str], ca_dir: Path) -> None:
    env = {**env, "EXECUTOR_MASTER_URL": "https://m.example"}
    cert, key = str(ca_dir / "node-a.crt"), str(ca_dir / "node-a.key")
    config = load_config(
        {**env, "EXECUTOR_MASTER_CLIENT_CERT": cert, "EXECUTOR_MASTER_CLIENT_KEY": key}
    )
    assert config.client_cert == (cert, key)
    with pytest.raises(AgentConfigError, match="go together"):
        load_config({**env, "EXECUTOR_MASTER_CLIENT_CERT": cert})
    # A key that is not the certificate's.
    wrong = {
        "EXECUTOR_MASTER_CLIENT_CERT": cert,
        "EXECUTOR_MASTER_CLIENT_KEY": str(ca_dir / "ca.key"),
    }
    with pytest.raises(AgentConfigError, match="EXECUTOR_MASTER_CLIENT_CERT/_KEY"):
        load_config({**env, **wrong})
