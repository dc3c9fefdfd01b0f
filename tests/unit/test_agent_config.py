"""The agent's environment: every variable checked, one clear line per problem."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from executor.agent.config import AgentConfigError, load_config


@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    return {
        "EXECUTOR_NODE_ID": "node-a",
        "EXECUTOR_PIPELINE": str(tmp_path),
        "EXECUTOR_STATE_DIR": str(tmp_path / "state"),
    }


def test_defaults(base: dict[str, str]) -> None:
    config = load_config(base)
    assert config.run.node_id == "node-a"
    assert config.master_url is None and config.token is None
    assert config.heartbeat_s == 10.0 and config.on_complete == "none"
    assert config.poweroff_command == ("systemctl", "poweroff")
    assert config.pipeline_sha256 is None and config.gateway_name is None


@pytest.mark.parametrize("stored", [b"", b"not an id!\n", b"\xff\xfe", b"../../etc\n"])
def test_a_corrupt_stored_run_id_counts_as_missing(
    base: dict[str, str], stored: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    state = Path(base["EXECUTOR_STATE_DIR"])
    state.mkdir()
    (state / "run-id").write_bytes(stored)
    run_id = load_config(base).run.run_id
    assert (state / "run-id").read_text() == f"{run_id}\n"
    assert stat.S_IMODE((state / "run-id").stat().st_mode) == 0o600
    assert load_config(base).run.run_id == run_id
    assert "unreadable or corrupt" in caplog.text


def test_an_invalid_fastpaths_switch_is_a_configuration_error(base: dict[str, str]) -> None:
    with pytest.raises(AgentConfigError, match="^EXECUTOR_FASTPATHS: 'fast' is neither"):
        load_config({**base, "EXECUTOR_FASTPATHS": "fast"})


@pytest.mark.parametrize("node_id", ["-n", ".n", "_n"])
def test_ids_the_server_would_refuse_are_refused_at_start(
    base: dict[str, str], node_id: str
) -> None:
    with pytest.raises(AgentConfigError, match="starting with a letter or digit"):
        load_config({**base, "EXECUTOR_NODE_ID": node_id})


@pytest.mark.parametrize(
    ("name", "value"),
    [("EXECUTOR_PIPELINE_MAX_BYTES", "0"), ("EXECUTOR_PIPELINE_MAX_DOWNLOAD_BYTES", "big")],
)
def test_archive_limits_are_checked_with_the_rest(
    base: dict[str, str], name: str, value: str
) -> None:
    assert load_config(base).archive_limits.max_files == 20_000
    with pytest.raises(AgentConfigError, match=f"^{name}: '{value}' is not an integer >= 1$"):
        load_config({**base, name: value})


def test_generated_run_id_is_persisted(base: dict[str, str]) -> None:
    first = load_config(base).run.run_id
    assert load_config(base).run.run_id == first
    assert (Path(base["EXECUTOR_STATE_DIR"]) / "run-id").read_text().strip() == first
    assert load_config({**base, "EXECUTOR_RUN_ID": "explicit"}).run.run_id == "explicit"


def test_full_configuration(base: dict[str, str]) -> None:
    config = load_config(
        {
            **base,
            "EXECUTOR_MASTER_URL": "http://10.0.2.100:8750/",
            "EXECUTOR_INSECURE": "1",
            "EXECUTOR_TOKEN": " tok ",
            "EXECUTOR_PIPELINE": "gateway:etl",
            "EXECUTOR_PIPELINE_SHA256": "AB" * 32,
            "EXECUTOR_HEARTBEAT_S": "2.5",
            "EXECUTOR_ON_COMPLETE": "poweroff",
            "EXECUTOR_POWEROFF_GRACE_S": "30",
            "EXECUTOR_POWEROFF_COMMAND": "touch '/tmp/a b'",
        }
    )
    assert config.master_url == "http://10.0.2.100:8750" and config.token == "tok"
    assert config.gateway_name == "etl" and config.pipeline_sha256 == "ab" * 32
    assert (config.heartbeat_s, config.poweroff_grace_s) == (2.5, 30.0)
    assert config.poweroff_command == ("touch", "/tmp/a b")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"EXECUTOR_PIPELINE": ""}, "EXECUTOR_PIPELINE is required"),
        ({"EXECUTOR_MASTER_URL": "http://127.0.0.1:1"}, "EXECUTOR_TOKEN is required"),
        ({"EXECUTOR_MASTER_URL": "ftp://m", "EXECUTOR_TOKEN": "t"}, "not an http(s):// URL"),
        ({"EXECUTOR_PIPELINE": "gateway:etl"}, "needs EXECUTOR_MASTER_URL"),
        ({"EXECUTOR_PIPELINE": "gateway:bad name"}, "EXECUTOR_PIPELINE"),
        ({"EXECUTOR_PIPELINE_SHA256": "abc"}, "not 64 hexadecimal digits"),
        ({"EXECUTOR_HEARTBEAT_S": "0"}, "EXECUTOR_HEARTBEAT_S"),
        ({"EXECUTOR_HEARTBEAT_S": "soon"}, "not a positive number"),
        ({"EXECUTOR_HEARTBEAT_S": "inf"}, "not a positive number"),
        ({"EXECUTOR_ON_COMPLETE": "reboot"}, "not none or poweroff"),
        ({"EXECUTOR_POWEROFF_COMMAND": "'unclosed"}, "EXECUTOR_POWEROFF_COMMAND"),
        ({"EXECUTOR_NODE_ID": "bad id"}, "EXECUTOR_NODE_ID"),
        ({"EXECUTOR_RUN_ID": "../x"}, "EXECUTOR_RUN_ID"),
        ({"EXECUTOR_WORKERS": "0"}, "EXECUTOR_WORKERS"),
    ],
)
def test_invalid_settings(base: dict[str, str], changes: dict[str, str], message: str) -> None:
    with pytest.raises(AgentConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config({**base, **changes})


def test_unwritable_state_dir(base: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AgentConfigError, match="EXECUTOR_STATE_DIR"):
        load_config({**base, "EXECUTOR_STATE_DIR": str(blocker / "sub")})


@pytest.mark.parametrize(
    "token", ["abc\ndef", "t\u00f6ken", "tok\u20acen", "a b", "tab\tbed", "nul\x00"]
)
def test_a_token_that_cannot_go_into_an_http_header_is_refused(
    base: dict[str, str], token: str
) -> None:
    env = {**base, "EXECUTOR_MASTER_URL": "http://127.0.0.1:1", "EXECUTOR_TOKEN": token}
    with pytest.raises(AgentConfigError) as raised:
        load_config(env)
    message = str(raised.value)
    assert message.startswith("EXECUTOR_TOKEN: the token must be printable ASCII")
    assert token not in message and "\n" not in message, "the token is secret, the line one"


def test_a_token_file_with_two_lines_is_refused(base: dict[str, str], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("abc\ndef\n")
    env = {
        **base,
        "EXECUTOR_MASTER_URL": "http://127.0.0.1:1",
        "EXECUTOR_TOKEN_FILE": str(token_file),
    }
    with pytest.raises(
        AgentConfigError,
        match=f"^EXECUTOR_TOKEN_FILE: {token_file}: the token must be printable ASCII",
    ):
        load_config(env)
