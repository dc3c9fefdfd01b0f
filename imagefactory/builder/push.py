"""Push an OCI environment to the registry the master names, with skopeo, and read back
the digest the registry stored (skopeo's --digestfile). An https registry is verified
against the builder's CA file when it has one (docs/tls.md), else the system's CAs."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from executor.agent.config import is_loopback
from imagefactory.run import run


def repository_name(pipeline: str) -> str:
    """A pipeline name as a registry repository path component (lowercase letters and
    digits joined by single dashes)."""
    return re.sub(r"[^a-z0-9]+", "-", pipeline.lower()).strip("-") or "pipeline"


class PlainRegistry(Exception):
    """A plain-HTTP registry beyond loopback, without the builder's --insecure."""


def registry_destination(
    registry: str, reference: str, allow_plain: bool = False
) -> tuple[str, bool]:
    """(`docker://HOST[:PORT]/REFERENCE`, whether to verify TLS): `http://host:port` is a
    plain-HTTP registry, refused beyond loopback unless `allow_plain`; `host:port` or
    `https://...` uses TLS."""
    insecure = registry.startswith("http://")
    if insecure and not allow_plain and not is_loopback(registry):
        raise PlainRegistry(
            f"refusing to push to plain-HTTP registry {registry} (give the builder --insecure)"
        )
    host = registry.removeprefix("http://").removeprefix("https://").rstrip("/")
    return f"docker://{host}/{reference}", not insecure


def skopeo_copy_argv(
    layout: Path,
    destination: str,
    tls_verify: bool,
    digestfile: Path,
    cert_dir: Path | None = None,
) -> list[str]:
    trust = [] if cert_dir is None else ["--dest-cert-dir", str(cert_dir)]
    return [
        "skopeo", "copy", "--quiet", f"--dest-tls-verify={'true' if tls_verify else 'false'}",
        *trust, "--digestfile", str(digestfile), f"oci:{layout}", destination,
    ]  # fmt: skip


def push_oci(
    layout: Path,
    registry: str,
    reference: str,
    ca_file: Path | None = None,
    allow_plain: bool = False,
) -> dict[str, str]:
    """Copy the OCI layout `layout` to REGISTRY/REFERENCE: {reference, digest}. Raises
    PlainRegistry, or the run's CommandError (e.g. a certificate skopeo does not trust)."""
    destination, tls_verify = registry_destination(registry, reference, allow_plain)
    with tempfile.TemporaryDirectory(prefix="fleetbake-push-") as tmp:
        digestfile = Path(tmp) / "digest"
        cert_dir = None
        if ca_file is not None and tls_verify:
            # skopeo trusts every *.crt of a certificate directory as a CA.
            cert_dir = Path(tmp) / "certs"
            cert_dir.mkdir()
            shutil.copyfile(ca_file, cert_dir / "fleet-ca.crt")
        argv = skopeo_copy_argv(layout, destination, tls_verify, digestfile, cert_dir)
        run(argv, timeout=3600, die_with_parent=True)
        digest = digestfile.read_text().strip()
    return {"reference": destination.removeprefix("docker://"), "digest": digest}
