"""The software bill of materials of an environment, as CycloneDX JSON.

It lists the Debian packages the environment carries (what dpkg reported inside it), the
Python packages of the executor's environment (the executor's own bundle and the
pipeline's wheels, with their sha256), and the pipeline archive with its sha256.
manifest.json links to it by file name and sha256.
"""

from __future__ import annotations

import datetime
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from cyclonedx.model import HashAlgorithm, HashType
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot5
from packageurl import PackageURL

SBOM_NAME = "sbom.cdx.json"
_SERIAL_NAMESPACE = uuid.UUID("0b6f4c38-5f0e-4d55-9a55-1f0d7d4f7a61")


@dataclass(frozen=True)
class PythonPackage:
    name: str
    version: str
    sha256: str | None = None
    """The wheel's sha256; None for the executor's own bundle (copied, not a wheel)."""


def build_sbom(
    environment: str,
    pipeline_name: str,
    pipeline_sha256: str,
    debian_packages: Iterable[dict[str, str]],
    python_packages: Iterable[PythonPackage],
    distro: str = "debian-12",
) -> str:
    """CycloneDX 1.5 JSON. The serial number derives from the contents, and the time from
    SOURCE_DATE_EPOCH when it is set, so the same inputs give the same document."""
    bom = Bom()
    root = Component(
        name=environment, type=ComponentType.PLATFORM, bom_ref=f"environment:{environment}"
    )
    bom.metadata.component = root
    bom.metadata.timestamp = _timestamp()
    pipeline = Component(
        name=pipeline_name,
        type=ComponentType.APPLICATION,
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=pipeline_sha256)],
        bom_ref=f"pipeline:{pipeline_name}",
    )
    components = [pipeline]
    for row in debian_packages:
        purl = PackageURL(
            "deb", "debian", row["name"], row["version"], {"arch": row["arch"], "distro": distro}
        )
        components.append(
            Component(
                name=row["name"],
                version=row["version"],
                type=ComponentType.LIBRARY,
                purl=purl,
                bom_ref=purl.to_string(),
            )
        )
    for package in python_packages:
        purl = PackageURL("pypi", None, package.name, package.version)
        hashes = (
            [HashType(alg=HashAlgorithm.SHA_256, content=package.sha256)] if package.sha256 else []
        )
        components.append(
            Component(
                name=package.name,
                version=package.version,
                type=ComponentType.LIBRARY,
                purl=purl,
                hashes=hashes,
                bom_ref=purl.to_string(),
            )
        )
    for component in components:
        bom.components.add(component)
    bom.register_dependency(root, components)
    refs = sorted(str(c.bom_ref) for c in components)
    bom.serial_number = uuid.uuid5(_SERIAL_NAMESPACE, "\n".join([environment, *refs]))
    return JsonV1Dot5(bom).output_as_string(indent=2) + "\n"


def _timestamp() -> datetime.datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
    return datetime.datetime.now(datetime.UTC)
