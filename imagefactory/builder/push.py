"""Push an OCI environment to the registry the master names, with skopeo, and read back
the digest the registry stored (skopeo's --digestfile)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from imagefactory.run import run


def repository_name(pipeline: str) -> str:
    """A pipeline name as a registry repository path component (lowercase letters and
    digits joined by single dashes)."""
    return re.sub(r"[^a-z0-9]+", "-", pipeline.lower()).strip("-") or "pipeline"


def registry_destination(registry: str, reference: str) -> tuple[str, bool]:
    """(`docker://HOST[:PORT]/REFERENCE`, whether to verify TLS): `http://host:port` is a
    plain-HTTP registry (loopback, tests); `host:port` or `https://...` uses TLS."""
    insecure = registry.startswith("http://")
    host = registry.removeprefix("http://").removeprefix("https://").rstrip("/")
    return f"docker://{host}/{reference}", not insecure


def skopeo_copy_argv(
    layout: Path, destination: str, tls_verify: bool, digestfile: Path
) -> list[str]:
    return [
        "skopeo", "copy", "--quiet", f"--dest-tls-verify={'true' if tls_verify else 'false'}",
        "--digestfile", str(digestfile), f"oci:{layout}", destination,
    ]  # fmt: skip


def push_oci(layout: Path, registry: str, reference: str) -> dict[str, str]:
    """Copy the OCI layout `layout` to REGISTRY/REFERENCE: {reference, digest}."""
    destination, tls_verify = registry_destination(registry, reference)
    with tempfile.TemporaryDirectory(prefix="fleetbake-push-") as tmp:
        digestfile = Path(tmp) / "digest"
        run(skopeo_copy_argv(layout, destination, tls_verify, digestfile), timeout=3600)
        digest = digestfile.read_text().strip()
    return {"reference": destination.removeprefix("docker://"), "digest": digest}
