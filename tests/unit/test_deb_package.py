"""`imagefactory bake --format installer`: the .deb (read back with dpkg-deb, checked with
lintian), install.sh's embedded copy, manifest.json and SHA256SUMS."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imagefactory.bake.artifacts import (
    GUEST_LAUNCHER,
    GUEST_LIB,
    GUEST_PIPELINE,
    GUEST_PTH,
    executor_unit,
)
from imagefactory.bake.debpkg import DEB_UNIT, LINTIAN_OVERRIDES, PACKAGE
from imagefactory.bake.installer import package_version
from tests.installer_bake import ETL, bake_installer

IMAGEFACTORY = str(Path(sys.executable).with_name("imagefactory"))


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bake_installer(tmp_path_factory.mktemp("installer"))


def deb_of(out: Path) -> Path:
    (deb,) = out.glob("*.deb")
    return deb


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], check=True, capture_output=True, text=True).stdout


def test_output_directory_holds_the_five_files(out: Path) -> None:
    assert out.name == "x86_64-linux-installer"
    names = sorted(p.name for p in out.iterdir())
    expected = ["install.sh", "manifest.json", "SHA256SUMS", "sbom.cdx.json", deb_of(out).name]
    assert names == sorted(expected)
    assert re.fullmatch(
        r"fleetbake-node_\d+\.\d+\.\d+\+\d{14}\.[0-9a-f]{12}_amd64\.deb", deb_of(out).name
    )
    assert (out / "install.sh").stat().st_mode & 0o777 == 0o755


def test_sha256sums_and_manifest_agree_with_the_files(out: Path) -> None:
    subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=out, check=True,
                   capture_output=True)  # fmt: skip
    lines = (out / "SHA256SUMS").read_text().splitlines()
    sums = {name: sha for sha, name in (line.split("  ", 1) for line in lines)}
    assert set(sums) == {"install.sh", deb_of(out).name}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "installer"
    assert manifest["target"] == "x86_64-linux"
    assert manifest["image"]["file"] == "install.sh"
    assert manifest["image"]["sha256"] == sums["install.sh"]
    package = manifest["package"]
    assert package["file"] == deb_of(out).name
    assert package["sha256"] == sums[deb_of(out).name]
    assert package["size"] == deb_of(out).stat().st_size
    assert manifest["pipeline"]["name"] == "etl-demo"
    assert manifest["pipeline"]["path"] == GUEST_PIPELINE
    assert set(manifest["stages_s"]) >= {"artifacts", "package", "script", "total"}


def test_control_fields(out: Path) -> None:
    fields = dict(
        line.split(": ", 1)
        for line in dpkg_deb("--field", str(deb_of(out))).splitlines()
        if ": " in line and not line.startswith(" ")
    )
    assert fields["Package"] == PACKAGE
    assert fields["Architecture"] == "amd64"
    assert fields["Depends"] == "python3 (>= 3.11), systemd"
    manifest = json.loads((out / "manifest.json").read_text())
    assert fields["Version"] == manifest["package"]["version"]


def test_package_carries_the_image_layout_owned_by_root(out: Path) -> None:
    listing = dpkg_deb("--contents", str(deb_of(out)))
    rows = {line.split()[-1].lstrip("."): line.split() for line in listing.splitlines()}
    for path in (GUEST_LAUNCHER, GUEST_PIPELINE, GUEST_PTH, DEB_UNIT,
                 f"{GUEST_LIB}/executor/agent/main.py", f"{GUEST_LIB}/tenacity/__init__.py",
                 f"/usr/share/doc/{PACKAGE}/copyright"):  # fmt: skip
        assert path in rows, f"{path} missing from the package"
    assert all(row[1] == "root/root" for row in rows.values())
    assert rows[GUEST_LAUNCHER][0] == "-rwxr-xr-x"
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in rows)


def test_unit_has_the_image_hardening_without_cloud_init(out: Path, tmp_path: Path) -> None:
    dpkg_deb("--extract", str(deb_of(out)), str(tmp_path))
    unit = (tmp_path / DEB_UNIT.lstrip("/")).read_text()
    sha = json.loads((out / "manifest.json").read_text())["pipeline"]["sha256"]
    image_unit = executor_unit(sha)
    assert unit.split("[Service]")[1] == image_unit.split("[Service]")[1]
    assert "cloud" not in unit
    assert "After=network-online.target" in unit
    pipeline = (tmp_path / GUEST_PIPELINE.lstrip("/")).read_bytes()
    assert hashlib.sha256(pipeline).hexdigest() == sha


def test_install_sh_embeds_exactly_the_package(out: Path) -> None:
    text = (out / "install.sh").read_text()
    encoded = text.split("<<'FLEETBAKE_PAYLOAD_END'\n", 1)[1].split("\nFLEETBAKE_PAYLOAD_END\n")[0]
    assert base64.b64decode(encoded) == deb_of(out).read_bytes()
    assert text.rstrip().endswith('main "$@"')
    assert not re.search(r"@[A-Z_]+@", text), "a template placeholder was left unfilled"


def test_maintainer_scripts_are_valid_sh(out: Path, tmp_path: Path) -> None:
    dpkg_deb("--control", str(deb_of(out)), str(tmp_path))
    for name in ("postinst", "prerm", "postrm"):
        script = tmp_path / name
        assert script.stat().st_mode & 0o111
        subprocess.run(["sh", "-n", str(script)], check=True)
        assert "@" not in script.read_text()


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian is not installed")
def test_lintian_reports_no_errors_or_warnings(out: Path) -> None:
    def lintian(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["lintian", *args, str(deb_of(out))], capture_output=True, text=True, timeout=300
        )

    result = lintian("--fail-on", "error,warning")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    # Only the tags of the site-local layout are overridden, each for a stated reason.
    shown = lintian("--show-overrides").stdout.splitlines()
    overridden = {line.split()[2] for line in shown if line.startswith("O:")}
    assert "dir-or-file-in-opt" in overridden
    assert overridden <= {tag.split()[0] for tag in LINTIAN_OVERRIDES}


def test_cli_bakes_an_installer_and_summarises_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [IMAGEFACTORY, "bake", "--target", "aarch64-linux", "--format", "installer",
         "--pipeline", str(ETL), "--output", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (summary,) = json.loads(result.stdout)["images"]
    assert summary["target"] == "aarch64-linux"
    assert summary["image"] == str(tmp_path / "aarch64-linux-installer" / "install.sh")
    assert "==> package:" in result.stderr
    assert list((tmp_path / "aarch64-linux-installer").glob("fleetbake-node_*_arm64.deb"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "scratch left behind"


def test_cli_refuses_a_bad_pipeline_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [IMAGEFACTORY, "bake", "--target", "x86_64-linux", "--format", "installer",
         "--pipeline", str(tmp_path / "missing"), "--output", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "x86_64-linux-installer").exists()


def test_pipeline_debian_packages_become_dependencies(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipe"
    shutil.copytree(ETL, pipeline)
    doc = json.loads((pipeline / "pipeline.json").read_text())
    doc["debian_packages"] = ["jq", "curl"]
    (pipeline / "pipeline.json").write_text(json.dumps(doc))
    out = bake_installer(tmp_path / "out", pipeline=pipeline)
    control = dpkg_deb("--field", str(deb_of(out)), "Depends")
    assert control.strip() == "python3 (>= 3.11), systemd, jq, curl"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["package"]["depends"] == control.strip()


def test_pipeline_requirements_are_installed_into_the_package(tmp_path: Path) -> None:
    """examples/numeric: numpy's aarch64 wheel (a C extension) installed by the bake into
    the package, on sys.path through the .pth; libgomp1 a dependency; lock and SBOM beside."""
    out = bake_installer(tmp_path / "out", "aarch64-linux", ETL.parent / "numeric")
    deb = deb_of(out)
    files = dpkg_deb("--contents", str(deb))
    assert "./opt/executor/site/numpy/__init__.py" in files
    [extension] = [
        line.split()[-1] for line in files.splitlines() if "_multiarray_umath.cpython-311" in line
    ]
    assert extension.endswith("-aarch64-linux-gnu.so")
    unpacked = tmp_path / "root"
    dpkg_deb("-x", str(deb), str(unpacked))
    pth = (unpacked / GUEST_PTH.lstrip("/")).read_text()
    assert pth == f"{GUEST_LIB}\n/opt/executor/site\n"
    # numpy's extensions are for CPython 3.11 only: so is the package.
    depends = "python3 (>= 3.11), python3 (<< 3.12), systemd, libgomp1"
    assert dpkg_deb("--field", str(deb), "Depends").strip() == depends
    manifest = json.loads((out / "manifest.json").read_text())
    [numpy] = [p for p in manifest["python_packages"] if p["name"] == "numpy"]
    lock = (out / "requirements.lock").read_text()
    assert "fleetbake-lock platform=cp311-manylinux_2_36_aarch64" in lock
    assert f"numpy=={numpy['version']} --hash=sha256:{numpy['sha256']}" in lock
    assert manifest["sbom"]["file"] == "sbom.cdx.json"
    if shutil.which("lintian"):  # a package with a foreign wheel inside has no lintian error
        result = subprocess.run(
            ["lintian", "--fail-on", "error", str(deb)], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_bakes_at_the_same_time_of_other_contents_get_other_versions() -> None:
    """Under SOURCE_DATE_EPOCH two bakes share a time: their contents still tell them
    apart, so install.sh does not take a new pipeline for the installed one."""
    when = datetime.datetime(2026, 12, 5, 7, 0, tzinfo=datetime.UTC)
    first = package_version("0.1.0", when, "a" * 64)
    assert first == "0.1.0+20261205070000.aaaaaaaaaaaa"
    assert package_version("0.1.0", when, "b" * 64) != first
    later = package_version("0.1.0", when + datetime.timedelta(seconds=1), "0" * 64)
    newer = subprocess.run(["dpkg", "--compare-versions", later, "gt", first], check=False)
    assert newer.returncode == 0
