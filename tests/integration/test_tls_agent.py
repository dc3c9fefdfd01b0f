"""TLS end to end on loopback, with a CA made by the test: `imagefactory serve` over HTTPS
and a real `executor agent` that verifies it. A certificate from another CA, for another
host name or out of date is refused with one clear line; the report stays spooled and is
delivered once the master has a good certificate. Mutual TLS with `serve --client-ca`."""

from __future__ import annotations

import datetime
import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from imagefactory import pki
from tests.integration.services_harness import BIN, AgentProcess, ServerProcess, write_pipeline

pytestmark = pytest.mark.timeout(600)

NOT_TRUSTED = "master certificate not trusted: "


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.Issued]:
    """The fleet CA's master certificate, and three bad ones."""
    root = tmp_path_factory.mktemp("pki")
    fleet, other = root / "fleet", root / "other"
    pki.create_ca(fleet)
    pki.create_ca(other, "some other CA")
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    return {
        "good": pki.issue(fleet, "master", ("127.0.0.1", "localhost")),
        "wrong-ca": pki.issue(other, "master", ("127.0.0.1",)),
        "wrong-host": pki.issue(fleet, "elsewhere", ("master.example.net",)),
        "expired": pki.issue(fleet, "old", ("127.0.0.1",), days=1, not_before=long_ago),
        "node-a": pki.issue(fleet, "node-a", (), client=True),
    }


def tls_args(issued: pki.Issued, client_ca: Path | None = None) -> tuple[str, ...]:
    args = ("--tls-cert", str(issued.cert), "--tls-key", str(issued.key))
    return args if client_ca is None else (*args, "--client-ca", str(client_ca))


def bundle(certs: dict[str, pki.Issued]) -> Path:
    return certs["good"].cert.parent / "bundle.crt"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "server")
    proc.workdir.mkdir()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def make(server: ServerProcess, **env: str) -> AgentProcess:
        workdir = tmp_path / f"agent-{len(started)}"
        workdir.mkdir()
        variables = {
            "EXECUTOR_NODE_ID": "node-a",
            "EXECUTOR_MASTER_URL": f"https://127.0.0.1:{server.port}",
            "EXECUTOR_TOKEN": server.node_token("node-a"),
            "EXECUTOR_PIPELINE": str(write_pipeline(tmp_path / "p")),
            "EXECUTOR_HEARTBEAT_S": "0.5",
            **env,
        }
        proc = AgentProcess(workdir, variables)
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.kill()


def stored_runs(server: ServerProcess) -> list[str]:
    return [json.loads(row[7])["run_id"] for row in server.rows("reports")]


def test_agent_delivers_over_https_and_verifies(
    server: ServerProcess, agent: Callable[..., AgentProcess], certs: dict[str, pki.Issued]
) -> None:
    server.extra_args = tls_args(certs["good"])
    server.start()
    assert server.url.startswith("https://127.0.0.1:")
    proc = agent(server, EXECUTOR_MASTER_CA=str(bundle(certs)), EXECUTOR_RUN_ID="run-tls")
    assert proc.wait() == 0, proc.tail()
    assert stored_runs(server) == ["run-tls"]
    assert NOT_TRUSTED not in (proc.workdir / "agent.err").read_text()
    # Plain HTTP to the HTTPS port gets nowhere.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/v1/nodes", timeout=5)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("wrong-ca", "unable to get local issuer certificate"),
        ("wrong-host", "IP address mismatch, certificate is not valid for '127.0.0.1'."),
        ("expired", "certificate has expired"),
    ],
)
def test_untrusted_master_is_refused_and_the_report_waits_in_the_spool(
    server: ServerProcess,
    agent: Callable[..., AgentProcess],
    certs: dict[str, pki.Issued],
    bad: str,
    why: str,
) -> None:
    server.extra_args = tls_args(certs[bad])
    server.start()
    proc = agent(server, EXECUTOR_MASTER_CA=str(bundle(certs)))
    spooled = proc.wait_for("spool/*.json")
    errors = (proc.workdir / "agent.err").read_text().splitlines()
    deadline = time.monotonic() + 60
    while not any(NOT_TRUSTED in line for line in errors) and time.monotonic() < deadline:
        time.sleep(0.5)
        errors = (proc.workdir / "agent.err").read_text().splitlines()
    refusals = [line for line in errors if NOT_TRUSTED in line]
    assert len(refusals) == 1, proc.tail()
    assert refusals[0].endswith(f"{NOT_TRUSTED}{why} (https://127.0.0.1:{server.port})")
    assert stored_runs(server) == [] and spooled.exists()
    # The operator fixes the master's certificate; the agent delivers without a restart.
    server.stop()
    server.extra_args = tls_args(certs["good"])
    server.start()
    assert proc.wait(timeout_s=180) == 0, proc.tail()
    assert stored_runs(server) == [spooled.stem] and not spooled.exists()


def test_mutual_tls_needs_a_client_certificate_and_the_token(
    server: ServerProcess, agent: Callable[..., AgentProcess], certs: dict[str, pki.Issued]
) -> None:
    ca_cert = certs["good"].cert.parent / "ca.crt"
    server.extra_args = tls_args(certs["good"], client_ca=ca_cert)
    server.start()
    url = f"https://127.0.0.1:{server.port}/v1/nodes"
    trust = ssl.create_default_context(cafile=str(bundle(certs)))
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
        httpx.get(url, verify=trust, timeout=10)
    mutual = ssl.create_default_context(cafile=str(bundle(certs)))
    node = certs["node-a"]
    mutual.load_cert_chain(node.cert, node.key)
    assert httpx.get(url, verify=mutual, timeout=10).status_code == 401, "token still needed"
    bearer = {"Authorization": f"Bearer {server.admin_token}"}
    assert httpx.get(url, verify=mutual, headers=bearer, timeout=10).status_code == 200
    admin = ("nodes", "--url", server.url, "--admin-token-file", str(server.admin_token_file))
    client = ("--client-cert", str(node.cert), "--client-key", str(node.key))
    with_cert = imagefactory(*admin, *client, "--ca-file", str(bundle(certs)))
    assert with_cert.returncode == 0, with_cert.stderr
    without = imagefactory(*admin, "--ca-file", str(bundle(certs)))
    assert without.returncode == 2 and without.stderr.startswith("Error: cannot reach")
    proc = agent(
        server,
        EXECUTOR_MASTER_CA=str(bundle(certs)),
        EXECUTOR_MASTER_CLIENT_CERT=str(node.cert),
        EXECUTOR_MASTER_CLIENT_KEY=str(node.key),
        EXECUTOR_RUN_ID="run-mtls",
    )
    assert proc.wait() == 0, proc.tail()
    assert stored_runs(server) == ["run-mtls"]


def imagefactory(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFACTORY_")}
    return subprocess.run(
        [str(BIN / "imagefactory"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )


def test_admin_cli_verifies_the_master(server: ServerProcess, certs: dict[str, pki.Issued]) -> None:
    server.extra_args = tls_args(certs["good"])
    server.start()
    admin = ("nodes", "--url", server.url, "--admin-token-file", str(server.admin_token_file))
    trusted = imagefactory(*admin, "--ca-file", str(bundle(certs)), "--json")
    assert trusted.returncode == 0 and json.loads(trusted.stdout) == [], trusted.stderr
    from_env = imagefactory(*admin, "--json", IMAGEFACTORY_CA=str(bundle(certs)))
    assert from_env.returncode == 0, from_env.stderr
    untrusted = imagefactory(*admin)
    assert untrusted.returncode == 2
    [line] = untrusted.stderr.splitlines()
    assert "server certificate not trusted: unable to get local issuer certificate" in line
    by_name = f"https://localhost:{server.port}"  # the certificate names localhost too
    assert imagefactory(*admin, "--url", by_name, "--ca-file", str(bundle(certs))).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key"), "cannot use"),
        (("--tls-cert", "/x.crt"), "--tls-cert and --tls-key go together"),
        (("--client-ca", "/x.crt"), "--client-ca needs --tls-cert"),
        (("--tls-cert", "{good}", "--tls-key", "{other_key}"), "cannot use --tls-cert"),
        (("--tls-cert", "{good}", "--tls-key", "{good_key}", "--client-ca", "/x"), "--client-ca"),
    ],
)
def test_serve_refuses_bad_tls_options(
    tmp_path: Path, certs: dict[str, pki.Issued], args: tuple[str, ...], message: str
) -> None:
    files = {
        "good": certs["good"].cert,
        "good_key": certs["good"].key,
        "other_key": certs["expired"].key,  # not the certificate's key
    }
    argv = [a.format(**files) for a in args]
    done = subprocess.run(
        [str(BIN / "imagefactory"), "serve", "--port", "0", "--db", str(tmp_path / "db"),
         "--secret-file", str(tmp_path / "s"), "--admin-token-file", str(tmp_path / "a"), *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    [error] = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert message in error and "Traceback" not in done.stderr


def test_builder_verifies_the_master(
    server: ServerProcess, certs: dict[str, pki.Issued], tmp_path: Path
) -> None:
    """A builder with the fleet CA registers over HTTPS; one without it does not."""
    server.extra_args = tls_args(certs["good"])
    server.start()
    token = imagefactory("token", "--builder", "b1", "--secret-file", str(server.secret_file))
    (tmp_path / "b1.token").write_text(token.stdout)
    trust = ssl.create_default_context(cafile=str(bundle(certs)))
    bearer = {"Authorization": f"Bearer {server.admin_token}"}
    builders: list[subprocess.Popen[bytes]] = []
    for ca_args in ((), ("--ca-file", str(bundle(certs)))):
        with (tmp_path / f"builder-{len(builders)}.log").open("wb") as log:
            builders.append(
                subprocess.Popen(
                    [
                        str(BIN / "imagefactory"),
                        "builder",
                        "--master",
                        server.url,
                        "--builder-id",
                        "b1",
                        "--token-file",
                        str(tmp_path / "b1.token"),
                        "--work-dir",
                        str(tmp_path / f"work-{len(builders)}"),
                        *ca_args,
                    ],
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )  # fmt: skip
            )
    try:
        deadline = time.monotonic() + 60
        registered: list[object] = []
        while not registered and time.monotonic() < deadline:
            time.sleep(0.5)
            answer = httpx.get(f"{server.url}/v1/builders", verify=trust, headers=bearer)
            registered = answer.json()
        assert [b["builder_id"] for b in registered] == ["b1"]  # type: ignore[index]
        assert builders[0].poll() is None or builders[0].returncode != 0
        untrusted = (tmp_path / "builder-0.log").read_text()
        assert "certificate" in untrusted, untrusted
    finally:
        for proc in builders:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
