"""End to end: a pipeline that needs numpy (a wheel with a C extension, from
requirements.txt) and libgomp1 (a Debian library, from pipeline.json) is baked with both
installed offline, boots, runs and reports; the image carries its lock file and SBOM."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from tests.baking import BakeImage
from tests.e2e import fleet
from tests.integration.services_harness import ServerProcess

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]

NUMERIC = fleet.REPO / "examples" / "numeric"


@pytest.mark.parametrize("target_name", fleet.TARGETS)
def test_numpy_and_a_debian_library_run_on_the_node(
    bake_image: BakeImage, server: ServerProcess, tmp_path: Path, target_name: str
) -> None:
    baked = bake_image(NUMERIC, target_name)
    # What the bake recorded: the wheel it installed, the declared package, the SBOM.
    numpy = [p for p in baked.manifest["python_packages"] if p["name"] == "numpy"]
    assert len(numpy) == 1 and len(numpy[0]["sha256"]) == 64
    lock = (baked.dir / "requirements.lock").read_text()
    assert f"numpy=={numpy[0]['version']} --hash=sha256:{numpy[0]['sha256']}" in lock
    assert baked.manifest["debian_packages_declared"] == ["libgomp1"]
    assert "libgomp1" in {p["name"] for p in baked.manifest["packages"]}
    sbom = (baked.dir / baked.manifest["sbom"]["file"]).read_text()
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(sbom) is None
    purls = {c.get("purl", "") for c in json.loads(sbom)["components"]}
    assert f"pkg:pypi/numpy@{numpy[0]['version']}" in purls
    assert any(p.startswith("pkg:deb/debian/libgomp1@") for p in purls)

    node_id, run_id = f"needs-{target_name}", f"run-{uuid.uuid4().hex[:12]}"
    b = fleet.boot(baked.image, server.url, server.secret_file, node_id, run_id, tmp_path / "n")
    try:
        code, err = b.wait()
        if code != 0:
            pytest.fail(f"boot exited {code}: {err[-2000:]}\n{b.console_tail()}")
    finally:
        b.stop()
    got = fleet.report(server, run_id)
    fleet.save_artifacts("numeric", [b], {f"{run_id}.log": fleet.combined_log(server, run_id)})
    assert got["status"] == "succeeded", got
    assert got["tasks"]["sample"]["result"] == {"n": 100000, "numpy": numpy[0]["version"]}
    summary = got["tasks"]["report"]["result"]
    assert abs(summary["summary"]["mean"] - 10.0) < 0.05  # normal(10, 2), 100,000 samples
    assert abs(summary["summary"]["std"] - 2.0) < 0.05
    assert summary["processors"] >= 1  # omp_get_num_procs() from libgomp.so.1
