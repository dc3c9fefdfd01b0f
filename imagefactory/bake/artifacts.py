"""What a bake copies into the guest, all built on the host (the guest has no network):

artifacts/
  executor-lib.tar.gz   the `executor` package and its pure-Python dependencies,
                        unpacked to GUEST_LIB (a .pth file puts it on sys.path)
  executor              launcher, installed as GUEST_LAUNCHER
  pipeline.tar.gz       the pipeline archive (`executor pack` format), GUEST_PIPELINE
  executor.service      the systemd unit that runs `executor agent` at boot, GUEST_UNIT
  wheels/               the pipeline's requirements (bake/wheels.py): wheels, their
                        requirements.lock and pip's own wheel, installed offline into
                        GUEST_VENV (VM images), whose python then runs the launcher

The GUEST_* paths below are the one place these guest paths are written down: the unit
and the launcher name them, and `provision_env()` hands them to packer/scripts/provision.sh
as environment variables (through the Packer template that bake/render.py writes), so the
script installs to the same paths.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType

import executor
from executor.pack import pack
from executor.pipeline import Pipeline, PipelineError, load_pipeline
from executor.settings import SYSTEM_STATE_DIR
from imagefactory.bake.wheels import Wheelhouse
from imagefactory.errors import die

WHEELS_DIR = "wheels"
GUEST_LIB = "/opt/executor/lib"
GUEST_PIPELINE = "/opt/executor/pipeline.tar.gz"
GUEST_LAUNCHER = "/usr/local/bin/executor"
GUEST_UNIT = "/etc/systemd/system/executor.service"
GUEST_NODE_ENV = "/etc/executor/node.env"
GUEST_STATE_DIR = str(SYSTEM_STATE_DIR)
"""The agent's state directory: the executor's own default, made by systemd
(StateDirectory=, mode 0700) for GUEST_USER, whose home it is."""
GUEST_USER = "executor"
"""The unprivileged system user the agent and its tasks run as."""

GUEST_VENV = "/opt/executor/venv"
"""The executor's own virtual environment (VM images): the pipeline's wheels go there."""
GUEST_SITE = "/opt/executor/site"
"""Container images and bare-metal packages: the pipeline's wheels, installed by the bake
for the target's platform (bake/wheels.py install_wheels)."""
GUEST_PTH = "/usr/lib/python3/dist-packages/fleetbake-executor.pth"
"""Container images and bare-metal packages: puts GUEST_LIB (and GUEST_SITE) on every
python3's sys.path, workers included."""
SYSTEM_PYTHON = "/usr/bin/python3"
VENV_PYTHON = f"{GUEST_VENV}/bin/python3"


def launcher(python: str) -> str:
    """The `executor` command, run by `python` (SYSTEM_PYTHON or VENV_PYTHON)."""
    return f"""\
#!{python}
# fleetbake: the executor agent (library in {GUEST_LIB}).
import sys

from executor.cli import main

if __name__ == "__main__":  # a forkserver imports this file again: it must not run main
    sys.exit(main())
"""


@dataclass(frozen=True)
class Artifacts:
    dir: Path
    pipeline_name: str
    pipeline_sha256: str
    executor_version: str


# `$$` is a `$` for the shell once systemd has read the line.
_POWER_OFF_IF_ASKED = (
    "/bin/sh -c '[ \"$$EXECUTOR_ON_COMPLETE\" != poweroff ] || exec systemctl --no-block poweroff'"
)


# node.env is written by cloud-init's init modules (write-files): in cloud-init-local for
# imagefactory's seeds (dsmode local; cloud-init.service is then skipped), else in
# cloud-init.service. The agent waits for nothing later (cloud-config and cloud-final run
# beside it).
_UNIT_ORDERING = """\
Wants=cloud-init.service network-online.target
After=cloud-init.service network-online.target
"""
_UNIT_ORDERING_BARE_METAL = """\
Wants=network-online.target
After=network-online.target
"""


def executor_unit(pipeline_sha256: str, *, cloud_init: bool = True) -> str:
    """The agent's unit. node.env (written by cloud-init from the seed) comes after the
    defaults, so a seed can point the agent at another pipeline or a gateway.

    The agent and its tasks run as the unprivileged system user GUEST_USER (made by
    provision.sh), which cannot gain privileges, sees the system read-only and home
    directories not at all, and may write only its state directory and a private /tmp.
    node.env stays root's: systemd reads it. Powering off needs root, so systemd does it
    once the agent has ended (ExecStopPost with `+`, run with full privileges), if
    node.env asks for it; the agent's own power-off command is a no-op here.

    `cloud_init=False` is the bare-metal package's unit: no cloud-init there, its
    installer writes node.env; the [Service] section is the same."""
    state = PurePosixPath(GUEST_STATE_DIR).relative_to("/var/lib")
    ordering = _UNIT_ORDERING if cloud_init else _UNIT_ORDERING_BARE_METAL
    return f"""\
[Unit]
Description=fleetbake executor agent
{ordering}
[Service]
Type=exec
Environment=EXECUTOR_PIPELINE={GUEST_PIPELINE}
Environment=EXECUTOR_PIPELINE_SHA256={pipeline_sha256}
Environment=EXECUTOR_POWEROFF_COMMAND=true
EnvironmentFile=-{GUEST_NODE_ENV}
ExecStart={GUEST_LAUNCHER} agent
ExecStopPost=+{_POWER_OFF_IF_ASKED}
StandardOutput=journal+console
StandardError=journal+console
User={GUEST_USER}
Group={GUEST_USER}
StateDirectory={state}
StateDirectoryMode=0700
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""


def provision_env() -> dict[str, str]:
    """The environment of packer/scripts/provision.sh: where it installs each artifact."""
    return {
        "FLEETBAKE_LIB": GUEST_LIB,
        "FLEETBAKE_VENV": GUEST_VENV,
        "FLEETBAKE_LAUNCHER": GUEST_LAUNCHER,
        "FLEETBAKE_PIPELINE": GUEST_PIPELINE,
        "FLEETBAKE_UNIT": GUEST_UNIT,
        "FLEETBAKE_CONFIG_DIR": str(PurePosixPath(GUEST_NODE_ENV).parent),
        "FLEETBAKE_USER": GUEST_USER,
        "FLEETBAKE_STATE_DIR": GUEST_STATE_DIR,
    }


def _package_dir(module: ModuleType) -> Path:
    assert module.__file__ is not None
    return Path(module.__file__).parent


def _bundled_packages() -> list[Path]:
    import packaging
    import tenacity

    return [_package_dir(executor), _package_dir(tenacity), _package_dir(packaging)]


def _add_tree(tar: tarfile.TarFile, root: Path) -> None:
    for path in sorted([root, *root.rglob("*")]):
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root.parent)))
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if path.is_dir() else 0o644
        if path.is_dir():
            tar.addfile(info)
        else:
            with path.open("rb") as f:
                tar.addfile(info, f)


def library_archive(out: Path) -> None:
    """The executor and its dependencies as one reproducible .tar.gz."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for package in _bundled_packages():
            _add_tree(tar, package)
    with gzip.GzipFile(out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())


def check_pipeline(path: Path) -> Pipeline:
    """Validate like `executor validate`, except that task imports are checked only when
    this Python has the pipeline's declared requirements (the image has them: its
    provisioning runs `executor validate` again, with every import)."""
    try:
        return load_pipeline(path, imports="when-installed")
    except PipelineError as exc:
        raise die(str(exc)) from None


def pipeline_archive(source: Path, out: Path) -> str:
    """Pack a pipeline directory (or copy an archive) to `out`; return its sha256."""
    if source.is_dir():
        try:
            return pack(source, out)
        except PipelineError as exc:
            raise die(str(exc)) from None
    shutil.copyfile(source, out)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def build_artifacts(
    pipeline: Path,
    out: Path,
    python: str = SYSTEM_PYTHON,
    wheelhouse: Wheelhouse | None = None,
) -> Artifacts:
    """Everything above in `out`; `python` runs the launcher, and a wheelhouse (the
    pipeline's requirements) is copied to `out/wheels/` for an offline install."""
    name = check_pipeline(pipeline).name
    out.mkdir(parents=True, exist_ok=True)
    sha = pipeline_archive(pipeline, out / "pipeline.tar.gz")
    library_archive(out / "executor-lib.tar.gz")
    if wheelhouse is not None:
        shutil.copytree(wheelhouse.dir, out / WHEELS_DIR)
    command = out / "executor"
    command.write_text(launcher(python))
    command.chmod(0o755)
    (out / "executor.service").write_text(executor_unit(sha))
    return Artifacts(out, name, sha, executor.__version__)
