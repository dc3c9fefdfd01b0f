"""The fleet's private certificate authority (docs/tls.md), made with `cryptography`.

A CA directory holds:

    ca.key       the CA's private key (0600; it never leaves this machine)
    ca.crt       the current CA certificate (public)
    bundle.crt   every CA certificate clients should trust: the current one, and during a
                 rotation the previous one as well (this is what nodes get as --master-ca)
    NAME.key     keys of issued certificates (0600), NAME.crt their certificates

Keys are written with O_EXCL at mode 0600, so they are never readable by others, not even
for a moment, and an existing key is never overwritten by accident. A rotation writes the
new CA's files in full beside the old ones before it renames them into place, so a failure
(a bad name, a full disk) leaves the old CA whole.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from executor.files import output_file, write_output

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
BUNDLE = "bundle.crt"
CA_DAYS = 3650
LEAF_DAYS = 397
CN_MAX = 64  # RFC 5280's ub-common-name; `cryptography` counts it in UTF-8 bytes
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_DNS_RE = re.compile(r"(?=.{1,253}\Z)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+\Z")
_BEGIN = b"-----BEGIN CERTIFICATE-----"


class PkiError(Exception):
    """A CA operation that cannot be done; str() is one line."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    sans: tuple[str, ...]
    not_after: datetime.datetime


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_key(path: Path, pem: bytes) -> None:
    """A new 0600 file; never replaces an existing one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PkiError(f"{path} exists; remove it first to replace it") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _write_public(path: Path, pem: bytes) -> None:
    write_output(path, pem, 0o644)


def check_common_name(name: str) -> str:
    """A certificate's common name: printable, 1 to CN_MAX characters (bytes in UTF-8)."""
    if not name.isprintable() or not 1 <= len(name.encode()) <= CN_MAX:
        raise PkiError(
            f"invalid common name {name!r}: use 1 to {CN_MAX} printable characters "
            f"({CN_MAX} bytes in UTF-8, the X.509 limit)"
        )
    return name


def _ca_name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, check_common_name(common_name))])


def create_ca(ca_dir: Path, common_name: str = "fleetbake fleet CA", days: int = CA_DAYS) -> Path:
    """Make a new CA in `ca_dir` (created 0700); returns the certificate's path."""
    key, cert_pem = _new_ca(common_name, days)  # a bad name stops here, before any write
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (ca_dir / CA_KEY).exists():
        raise PkiError(f"{ca_dir / CA_KEY} exists: a CA is already there (rotate it instead)")
    _write_key(ca_dir / CA_KEY, _key_pem(key))
    _write_public(ca_dir / CA_CERT, cert_pem)
    _write_public(ca_dir / BUNDLE, cert_pem)
    return ca_dir / CA_CERT


def _new_ca(common_name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A new CA key and its self-signed certificate (PEM), in memory."""
    key = _new_key()
    name = _ca_name(common_name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM)


def rotate_ca(ca_dir: Path, common_name: str = "fleetbake fleet CA", days: int = CA_DAYS) -> Path:
    """Replace the CA's key and certificate; the bundle holds the new and the previous CA
    certificates until `finish_rotation`. The previous key is replaced: nothing is
    issued from it any more."""
    old_pem = _read(ca_dir / CA_CERT)
    load_ca(ca_dir)  # a CA must be there and usable
    key, new_pem = _new_ca(common_name, days)
    files = (
        (CA_CERT, new_pem, 0o644),
        (CA_KEY, _key_pem(key), 0o600),
        (BUNDLE, new_pem + old_pem, 0o644),
    )
    # Each file goes to a temporary file first and is renamed into place as its block
    # ends, in reverse order; an error while writing any of them (a full disk) ends every
    # block with it, so nothing is renamed and the old CA stays whole.
    with ExitStack() as blocks:
        for name, data, mode in files:
            blocks.enter_context(output_file(ca_dir / name, mode)).write(data)
    return ca_dir / BUNDLE


def finish_rotation(ca_dir: Path) -> Path:
    """Trust only the current CA again (once every server has a certificate from it)."""
    _write_public(ca_dir / BUNDLE, _read(ca_dir / CA_CERT))
    return ca_dir / BUNDLE


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path} not found (run `imagefactory ca init` first)") from None
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}") from None


def load_ca(ca_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key(_read(ca_dir / CA_KEY), password=None)
        cert = x509.load_pem_x509_certificate(_read(ca_dir / CA_CERT))
    except ValueError as exc:
        raise PkiError(f"the CA in {ca_dir} is not readable: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{ca_dir / CA_KEY} is not an EC key made by `imagefactory ca init`")
    if key.public_key() != cert.public_key():
        raise PkiError(f"{ca_dir / CA_KEY} is not the key of {ca_dir / CA_CERT}")
    return key, cert


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or name in ("ca", "bundle"):
        raise PkiError(
            f"invalid certificate name {name!r}: use letters, digits, '.', '_' and '-' "
            "(not 'ca' or 'bundle')"
        )
    return name


def parse_san(value: str) -> x509.GeneralName:
    """An IP address or a DNS name (a leading `*.` is allowed)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _DNS_RE.match(value):
        raise PkiError(f"--san {value!r} is neither an IP address nor a DNS name")
    return x509.DNSName(value.rstrip(".").lower())


def issue(
    ca_dir: Path,
    name: str,
    sans: tuple[str, ...],
    *,
    client: bool = False,
    days: int = LEAF_DAYS,
    out_dir: Path | None = None,
    not_before: datetime.datetime | None = None,
) -> Issued:
    """Issue a server certificate for `sans` (or, with `client`, a client certificate named
    `name`) signed by the CA; the key is made here and written 0600 beside the certificate."""
    check_name(name)
    names = [parse_san(s) for s in sans]
    if not names and not client:
        raise PkiError("a server certificate needs at least one --san (DNS name or IP address)")
    ca_key, ca_cert = load_ca(ca_dir)
    out = out_dir or ca_dir
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = _new_key()
    start = not_before or _now() - datetime.timedelta(minutes=5)
    end = min(start + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_ca_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    key_path, cert_path = out / f"{name}.key", out / f"{name}.crt"
    _write_key(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path, tuple(sans), end)


def one_line(pem: str) -> str:
    """The certificates of `pem` without line breaks (for one node.env line); the agent
    (executor/agent/config.py) wraps them again."""
    return "".join(line.strip() for line in pem.splitlines())


def check_bundle(pem: bytes, source: str) -> bytes:
    """PEM text holding at least one CA certificate, each parseable; else PkiError."""
    if _BEGIN not in pem:
        raise PkiError(f"{source} holds no PEM certificate")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise PkiError(f"{source}: not a valid certificate: {exc}") from None
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise PkiError(f"{source}: {cert.subject.rfc4514_string()} is not a CA certificate")
    return pem
