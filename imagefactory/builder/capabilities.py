"""What this host can build, from the doctor's checks: the targets whose image tools are
all there, and the formats whose own tools are (`oci`: skopeo and mmdebstrap;
`installer`: dpkg-deb; VM images: the image tools). A format the doctor has no check for
is offered as it is: its bake says what is missing, and the build fails with that."""

from __future__ import annotations

from collections.abc import Sequence

from imagefactory.host.doctor import (
    BUILD_TOOLS,
    INSTALLER_TOOLS,
    OCI_TOOLS,
    can_build,
    tool_check,
)
from imagefactory.targets import TARGETS

FORMAT_TOOLS: dict[str, tuple[tuple[str, str], ...]] = {
    "qcow2": BUILD_TOOLS,
    "raw": BUILD_TOOLS,
    "oci": (*OCI_TOOLS, ("mmdebstrap", "mmdebstrap")),
    "installer": INSTALLER_TOOLS[:1],
}


def buildable_targets() -> tuple[str, ...]:
    return tuple(t.name for t in TARGETS if can_build(t))


def buildable_formats(formats: Sequence[str]) -> tuple[str, ...]:
    return tuple(
        f for f in formats if all(tool_check(*tool).ok for tool in FORMAT_TOOLS.get(f, ()))
    )
