"""The fleet CA (imagefactory/pki.py and `imagefactory ca`): files, modes, certificates that
the standard library's ssl verifies, rotation, and refusals."""

from __future__ import annotations

import json
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from executor.files import output_file as real_output_file
from imagefactory import pki
from imagefactory.cli.main import main as cli


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ca(tmp_path: Path) -> Path:
    ca_dir = tmp_path / "ca"
    pki.create_ca(ca_dir)
    return ca_dir


def _san(cert_path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in ext]


def test_init_writes_a_private_key_and_public_certificates(tmp_path: Path) -> None:
    ca_dir = _ca(tmp_path)
    assert _mode(ca_dir) == 0o700
    assert _mode(ca_dir / "ca.key") == 0o600
    assert _mode(ca_dir / "ca.crt") == 0o644
    assert (ca_dir / "bundle.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_init_refuses_to_replace_an_existing_ca(tmp_path: Path) -> None:
    ca_dir = _ca(tmp_path)
    key = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(pki.PkiError, match="already there"):
        pki.create_ca(ca_dir)
    assert (ca_dir / "ca.key").read_bytes() == key


def test_issued_server_certificate_verifies_with_the_bundle(tmp_path: Path) -> None:
    ca_dir = _ca(tmp_path)
    issued = pki.issue(ca_dir, "master", ("master.example.net", "10.0.2.2", "::1"))
    assert _mode(issued.key) == 0o600 and _mode(issued.cert) == 0o644
    assert _san(issued.cert) == ["master.example.net", "10.0.2.2", "::1"]
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    # The pair loads into an ssl context (what uvicorn does) and the bundle into a client's.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(issued.cert, issued.key)
    client = ssl.create_default_context(cafile=str(ca_dir / "bundle.crt"))
    assert len(client.get_ca_certs()) == 1


def test_client_certificate_needs_no_san_and_is_for_clients(tmp_path: Path) -> None:
    ca_dir = _ca(tmp_path)
    issued = pki.issue(ca_dir, "node-1", (), client=True, out_dir=tmp_path / "out")
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert issued.cert.parent == tmp_path / "out"


@pytest.mark.parametrize(
    ("name", "sans", "message"),
    [
        ("master", (), "at least one --san"),
        ("../etc/passwd", ("a.example",), "invalid certificate name"),
        ("ca", ("a.example",), "invalid certificate name"),
        ("bundle", ("a.example",), "invalid certificate name"),
        ("master", ("bad name",), "neither an IP address nor a DNS name"),
        ("master", ("a..b",), "neither an IP address nor a DNS name"),
        ("master", ("-x.example",), "neither an IP address nor a DNS name"),
    ],
)
def test_issue_refuses_bad_input(
    tmp_path: Path, name: str, sans: tuple[str, ...], message: str
) -> None:
    ca_dir = _ca(tmp_path)
    with pytest.raises(pki.PkiError, match=message):
        pki.issue(ca_dir, name, sans)
    assert sorted(p.name for p in ca_dir.iterdir()) == ["bundle.crt", "ca.crt", "ca.key"]


def test_issue_never_overwrites_a_key(tmp_path: Path) -> None:
    ca_dir = _ca(tmp_path)
    first = pki.issue(ca_dir, "master", ("m.example",))
    key = first.key.read_bytes()
    with pytest.raises(pki.PkiError, match="exists"):
        pki.issue(ca_dir, "master", ("m.example",))
    assert first.key.read_bytes() == key


def test_issue_without_a_ca_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="imagefactory ca init"):
        pki.issue(tmp_path / "none", "master", ("m.example",))


def test_leaf_never_outlives_the_ca(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    pki.create_ca(ca_dir, days=10)
    issued = pki.issue(ca_dir, "master", ("m.example",), days=397)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    assert issued.not_after == ca_cert.not_valid_after_utc


def test_rotation_trusts_old_and_new_until_finished(tmp_path: Path) -> None:
    ca_dir = _ca(tmp_path)
    old_ca = (ca_dir / "ca.crt").read_bytes()
    old_key = (ca_dir / "ca.key").read_bytes()
    pki.rotate_ca(ca_dir)
    assert (ca_dir / "ca.key").read_bytes() != old_key
    assert _mode(ca_dir / "ca.key") == 0o600
    bundle = (ca_dir / "bundle.crt").read_bytes()
    assert bundle == (ca_dir / "ca.crt").read_bytes() + old_ca
    assert len(x509.load_pem_x509_certificates(bundle)) == 2
    pki.finish_rotation(ca_dir)
    assert (ca_dir / "bundle.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()


def test_check_bundle(tmp_path: Path) -> None:
    ca_dir = _ca(tmp_path)
    pem = (ca_dir / "bundle.crt").read_bytes()
    assert pki.check_bundle(pem, "x") == pem
    with pytest.raises(pki.PkiError, match="no PEM certificate"):
        pki.check_bundle(b"hello", "x")
    leaf = pki.issue(ca_dir, "master", ("m.example",)).cert.read_bytes()
    with pytest.raises(pki.PkiError, match="not a CA certificate"):
        pki.check_bundle(leaf, "x")
    broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    with pytest.raises(pki.PkiError, match="not a valid certificate"):
        pki.check_bundle(broken, "x")


def test_cli_init_issue_rotate(tmp_path: Path) -> None:
    runner = CliRunner()
    ca_dir = str(tmp_path / "ca")
    done = runner.invoke(cli, ["ca", "init", "--ca-dir", ca_dir, "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["bundle"] == f"{ca_dir}/bundle.crt"
    args = ["ca", "issue", "master", "--ca-dir", ca_dir, "--san", "127.0.0.1", "--json"]
    done = runner.invoke(cli, args)
    assert done.exit_code == 0, done.output
    fields = json.loads(done.stdout)
    assert fields["sans"] == ["127.0.0.1"] and fields["key"] == f"{ca_dir}/master.key"
    done = runner.invoke(cli, ["ca", "rotate", "--ca-dir", ca_dir])
    assert done.exit_code == 0 and "trusts the new and old CA" in done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["ca", "issue", "master"],
        ["ca", "issue", "master", "--san", "not a name"],
        ["ca", "init"],
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    ca_dir = tmp_path / "ca"
    pki.create_ca(ca_dir)
    done = CliRunner().invoke(cli, [*args, "--ca-dir", str(ca_dir)])
    assert done.exit_code == 2
    assert done.stderr.startswith("Error: ") and done.stderr.count("\n") == 1


def _snapshot(ca_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (_mode(p), p.read_bytes()) for p in sorted(ca_dir.iterdir())}


BAD_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("a" * 65, id="65-characters"),
    pytest.param("é" * 33, id="66-bytes-in-utf8"),
    pytest.param("fleet\nCA", id="newline"),
    pytest.param("tab\there", id="tab"),
]


@pytest.mark.parametrize("command", ["init", "rotate"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_cli_bad_ca_name_is_one_line_and_leaves_the_ca_untouched(
    tmp_path: Path, command: str, name: str
) -> None:
    ca_dir = _ca(tmp_path)
    before = _snapshot(ca_dir)
    done = CliRunner().invoke(cli, ["ca", command, "--ca-dir", str(ca_dir), "--name", name])
    assert done.exit_code == 2, done.output
    assert done.stderr.startswith("Error: --name: invalid common name")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.output
    assert _snapshot(ca_dir) == before
    pki.issue(ca_dir, "master", ("m.example",))  # the CA still works


def test_cli_init_with_a_bad_name_makes_no_directory(tmp_path: Path) -> None:
    done = CliRunner().invoke(cli, ["ca", "init", "--ca-dir", str(tmp_path / "ca"), "--name", ""])
    assert done.exit_code == 2 and done.stderr.startswith("Error: --name:")
    assert not (tmp_path / "ca").exists()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_rotate_with_a_bad_name_raises_pki_error_and_keeps_the_ca(
    tmp_path: Path, name: str
) -> None:
    ca_dir = _ca(tmp_path)
    before = _snapshot(ca_dir)
    with pytest.raises(pki.PkiError, match="invalid common name"):
        pki.rotate_ca(ca_dir, name)
    assert _snapshot(ca_dir) == before
    with pytest.raises(pki.PkiError, match="invalid common name"):
        pki.create_ca(tmp_path / "other", name)
    assert not (tmp_path / "other").exists()


def test_longest_names_are_accepted(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    pki.create_ca(ca_dir, "a" * 64)
    pki.rotate_ca(ca_dir, "é" * 32)
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=" + "é" * 32


def test_rotate_that_fails_while_writing_leaves_the_old_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_dir = _ca(tmp_path)
    before = _snapshot(ca_dir)
    calls: list[str] = []

    def full_disk_on_the_third(path: Path, mode: int) -> Any:
        calls.append(Path(path).name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_output_file(path, mode)

    monkeypatch.setattr(pki, "output_file", full_disk_on_the_third)
    with pytest.raises(OSError, match="No space left"):
        pki.rotate_ca(ca_dir)
    assert sorted(calls) == ["bundle.crt", "ca.crt", "ca.key"]
    assert _snapshot(ca_dir) == before  # no temporary file left behind either
    pki.load_ca(ca_dir)


def test_a_key_that_is_not_the_certificate_s_is_refused(tmp_path: Path) -> None:
    ca_dir = _ca(tmp_path)
    other = pki.create_ca(tmp_path / "other").parent
    (ca_dir / "ca.key").write_bytes((other / "ca.key").read_bytes())
    with pytest.raises(pki.PkiError, match="is not the key of"):
        pki.issue(ca_dir, "master", ("m.example",))


def test_cli_rotate_with_a_name_trusts_old_and_new(tmp_path: Path) -> None:
    ca_dir = _ca(tmp_path)
    done = CliRunner().invoke(cli, ["ca", "rotate", "--ca-dir", str(ca_dir), "--name", "CA 2"])
    assert done.exit_code == 0, done.output
    assert _mode(ca_dir / "ca.key") == 0o600
    bundle = x509.load_pem_x509_certificates((ca_dir / "bundle.crt").read_bytes())
    names = [c.subject.rfc4514_string() for c in bundle]
    assert names == ["CN=CA 2", "CN=fleetbake fleet CA"]
    key, cert = pki.load_ca(ca_dir)
    assert cert.subject.rfc4514_string() == "CN=CA 2"
    assert not [p for p in ca_dir.iterdir() if p.name.startswith(".")]
