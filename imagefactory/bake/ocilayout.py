"""An OCI image layout on disk (opencontainers/image-spec, layout.md): `oci-layout`,
`index.json` and content-addressed `blobs/sha256/`.

    layers + ImageConfig ──config_doc()──► config blob ─┐
                         ──manifest_doc()──────────────► manifest blob ──► index.json

Every JSON document is serialized one way (sorted keys, no spaces), so equal inputs give
equal digests; the image's time is SOURCE_DATE_EPOCH, never the clock.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefactory.bake.ocilayer import Layer

LAYOUT_VERSION = "1.0.0"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class Platform:
    architecture: str
    """GOARCH spelling: amd64, arm64."""
    variant: str | None = None

    def doc(self) -> dict[str, str]:
        found = {"architecture": self.architecture, "os": "linux"}
        return found | ({"variant": self.variant} if self.variant else {})

    @classmethod
    def from_doc(cls, doc: dict[str, str]) -> Platform:
        return cls(doc["architecture"], doc.get("variant"))


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def doc(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class ImageConfig:
    """What a runtime reads from the image config (the `config` object)."""

    entrypoint: tuple[str, ...]
    env: tuple[str, ...]
    user: str
    working_dir: str
    volumes: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    stop_signal: str = "SIGTERM"


def canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def rfc3339(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def config_doc(
    config: ImageConfig, platform: Platform, layers: list[Layer], epoch: int, history: list[str]
) -> dict[str, Any]:
    return {
        **platform.doc(),
        "created": rfc3339(epoch),
        "config": {
            "Entrypoint": list(config.entrypoint),
            "Env": list(config.env),
            "User": config.user,
            "WorkingDir": config.working_dir,
            "Volumes": {v: {} for v in config.volumes},
            "Labels": dict(config.labels),
            "StopSignal": config.stop_signal,
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": rfc3339(epoch), "created_by": h} for h in history],
    }


def manifest_doc(config: Descriptor, layers: list[Layer], epoch: int) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.doc(),
        "layers": [Descriptor(MEDIA_LAYER, la.digest, la.size).doc() for la in layers],
        "annotations": {"org.opencontainers.image.created": rfc3339(epoch)},
    }


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": LAYOUT_VERSION}))

    def add_bytes(self, media_type: str, data: bytes) -> Descriptor:
        digest = hashlib.sha256(data).hexdigest()
        (self.blobs / digest).write_bytes(data)
        return Descriptor(media_type, f"sha256:{digest}", len(data))

    def add_layer(self, layer: Layer) -> None:
        """Copy a layer blob in (a copy, not a link: the cached base layer must never
        change with the output)."""
        dest = self.blobs / layer.digest.removeprefix("sha256:")
        if not dest.exists():
            shutil.copyfile(layer.path, dest)

    def add_image(
        self,
        config: ImageConfig,
        platform: Platform,
        layers: list[Layer],
        epoch: int,
        history: list[str],
    ) -> Descriptor:
        """Store the layers, config and manifest of one image; return the manifest's
        descriptor."""
        for layer in layers:
            self.add_layer(layer)
        doc = config_doc(config, platform, layers, epoch, history)
        config_desc = self.add_bytes(MEDIA_CONFIG, canonical(doc))
        return self.add_bytes(MEDIA_MANIFEST, canonical(manifest_doc(config_desc, layers, epoch)))

    def add_index(self, entries: list[tuple[Descriptor, Platform]]) -> Descriptor:
        """An image index blob listing one manifest per platform (a multi-arch image)."""
        manifests = [desc.doc(platform=platform.doc()) for desc, platform in entries]
        doc = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": manifests}
        return self.add_bytes(MEDIA_INDEX, canonical(doc))

    def write_index(self, entries: list[tuple[Descriptor, Platform | None, str]]) -> None:
        """index.json: one image (a manifest, or an image index) per ref name."""
        manifests = [
            desc.doc(annotations={REF_NAME: ref}) | ({"platform": p.doc()} if p else {})
            for desc, p, ref in entries
        ]
        doc = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": manifests}
        (self.root / "index.json").write_bytes(canonical(doc))
