"""Render the Packer HCL2 build for one target from the sources in packer/.

The HCL in packer/ is the same for every target; what differs is data, written as
`fleetbake.auto.pkrvars.hcl` next to a copy of the sources (Packer loads `*.auto.pkrvars.hcl`
by itself). Packer 1.7+ also gets `plugins.pkr.hcl` with `required_plugins`, which
Packer 1.6.6 would reject. The guest paths that scripts/provision.sh installs to come from
bake/artifacts.py, as the script's environment (`provision_env`).

    RenderConfig ──► qemuargs() + pkrvars() ──► DIR/{*.pkr.hcl, fleetbake.auto.pkrvars.hcl,
                                                     scripts/, [plugins.pkr.hcl]}
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imagefactory.bake.artifacts import provision_env
from imagefactory.host.firmware import Firmware
from imagefactory.run import run
from imagefactory.targets import Target

PACKER_SOURCES = Path(__file__).resolve().parents[2] / "packer"
SOURCE_FILES = ("fleetbake.pkr.hcl", "variables.pkr.hcl")
PLUGINS_FILE = "plugins.pkr.hcl"
VARS_FILE = "fleetbake.auto.pkrvars.hcl"

PLUGINS_HCL = """\
packer {
  required_plugins {
    qemu = {
      version = ">= 1.0.0"
      source  = "github.com/hashicorp/qemu"
    }
  }
}
"""

# Packer fills in the forwarded SSH port; restrict=on keeps the guest off every network
# but this one forward (Packer's default -netdev is replaced because the id matches).
NETDEV = "user,id=user.0,restrict=on,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"

# Any -device in qemuargs replaces all of Packer's devices, so all are listed: the NIC,
# and the seed CD (Packer names its drive cdrom0) on a PCI virtio-scsi controller,
# which works on q35 and virt alike (Packer's own choice, virtio-scsi-device, is MMIO).
DEVICES = (
    ["-device", "virtio-net,netdev=user.0"],
    ["-device", "virtio-scsi-pci,id=scsi0"],
    ["-device", "scsi-cd,bus=scsi0.0,drive=cdrom0"],
)


@dataclass(frozen=True)
class RenderConfig:
    target: Target
    base_image: Path
    base_sha256: str
    """sha256 of the base, or "" when it is not built yet (then Packer skips the check)."""
    build_dir: Path
    """Per-build working directory: output, seed, key, artifacts and logs live under it."""
    accelerator: str
    firmware: Firmware | None
    image_format: str = "qcow2"
    disk_size: str | None = None
    """None: the target's default."""
    memory_mib: int | None = None
    cpus: int = 2

    @property
    def output_directory(self) -> Path:
        return self.build_dir / "packer-output"

    @property
    def vm_name(self) -> str:
        return f"{self.target.name}.{self.image_format}"

    @property
    def console_log(self) -> Path:
        return self.build_dir / "console.log"


def split_args(flat: Sequence[str]) -> list[list[str]]:
    """`("-boot", "strict=off", "-x")` -> `[["-boot", "strict=off"], ["-x"]]`."""
    groups: list[list[str]] = []
    for arg in flat:
        if arg.startswith("-") or not groups:
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return groups


def qemuargs(cfg: RenderConfig) -> list[list[str]]:
    """Extra QEMU arguments; never -drive (it would drop Packer's disk and seed CD)."""
    target = cfg.target
    cpu = target.cpu_kvm if cfg.accelerator == "kvm" else target.cpu_tcg
    args = [["-cpu", cpu], ["-netdev", NETDEV], *DEVICES, ["-serial", f"file:{cfg.console_log}"]]
    if target.firmware == "uefi":
        if cfg.firmware is None:
            raise ValueError(f"{target.name} needs UEFI firmware")
        args.append(["-bios", str(cfg.firmware.code)])
    args.extend(split_args(target.extra_qemu_args))
    return args


def pkrvars(cfg: RenderConfig) -> dict[str, object]:
    target = cfg.target
    return {
        "base_image": str(cfg.base_image),
        "base_checksum": f"sha256:{cfg.base_sha256}" if cfg.base_sha256 else "none",
        "output_directory": str(cfg.output_directory),
        "vm_name": cfg.vm_name,
        "format": cfg.image_format,
        "disk_size": cfg.disk_size or target.disk_size,
        "memory": cfg.memory_mib or target.memory_mib,
        "cpus": cfg.cpus,
        "accelerator": cfg.accelerator,
        "qemu_binary": target.qemu_binary,
        "machine_type": target.machine,
        "qemuargs": qemuargs(cfg),
        "seed_files": [str(cfg.build_dir / "seed" / n) for n in ("meta-data", "user-data")],
        "ssh_private_key_file": str(cfg.build_dir / "build_key"),
        "artifacts_dir": str(cfg.build_dir / "artifacts"),
        "scripts_dir": str(cfg.build_dir / "packer" / "scripts"),
        "report_dir": str(cfg.build_dir / "report"),
        "provision_env": [f"{k}={v}" for k, v in provision_env().items()],
    }


def hcl_value(value: object) -> str:
    """A Python value as an HCL2 literal (strings escaped so `${` stays literal)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value).replace("${", "$${").replace("%{", "%%{")
    if isinstance(value, list):
        return "[" + ", ".join(hcl_value(v) for v in value) + "]"
    raise TypeError(f"no HCL literal for {type(value).__name__}")


def pkrvars_hcl(values: dict[str, object]) -> str:
    width = max(len(k) for k in values)
    lines = [f"{k.ljust(width)} = {hcl_value(v)}" for k, v in values.items()]
    return "# Written by `imagefactory render`; values for one target.\n" + "\n".join(lines) + "\n"


def needs_required_plugins(packer_version: tuple[int, ...]) -> bool:
    return packer_version >= (1, 7)


def build_seed(key_comment: str) -> tuple[str, str]:
    """(meta-data, user-data) of the build VM's NoCloud seed; the public key is added
    by `write_build_seed`. Root logs in with the per-build key only."""
    meta = f"instance-id: fleetbake-build-{uuid.uuid4()}\nlocal-hostname: fleetbake-build\n"
    user = (
        "#cloud-config\n"
        "disable_root: false\n"
        "users: []\n"
        "ssh_pwauth: false\n"
        f"ssh_authorized_keys:\n  - {json.dumps(key_comment)}\n"
        # The build needs only the init stage (hostname, growpart, SSH); the later stages
        # would compete with provisioning for the emulated CPU.
        "cloud_config_modules: []\n"
        "cloud_final_modules: []\n"
    )
    return meta, user


def write_build_seed(build_dir: Path) -> None:
    """A fresh SSH key pair and the seed that authorizes it, for one build."""
    key = build_dir / "build_key"
    key.unlink(missing_ok=True)
    key.with_suffix(".pub").unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleetbake-build", "-f", key])
    meta, user = build_seed(key.with_suffix(".pub").read_text().strip())
    seed = build_dir / "seed"
    seed.mkdir(parents=True, exist_ok=True)
    (seed / "meta-data").write_text(meta)
    (seed / "user-data").write_text(user)


def render(cfg: RenderConfig, packer_version: tuple[int, ...]) -> Path:
    """Write the build's HCL2 into `build_dir/packer`, with the seed and key it names;
    return the HCL directory (what `packer build` takes)."""
    out = cfg.build_dir / "packer"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("artifacts", "report"):
        (cfg.build_dir / name).mkdir(exist_ok=True)
    write_build_seed(cfg.build_dir)
    for name in SOURCE_FILES:
        shutil.copyfile(PACKER_SOURCES / name, out / name)
    shutil.copytree(PACKER_SOURCES / "scripts", out / "scripts", dirs_exist_ok=True)
    (out / VARS_FILE).write_text(pkrvars_hcl(pkrvars(cfg)))
    plugins = out / PLUGINS_FILE
    if needs_required_plugins(packer_version):
        plugins.write_text(PLUGINS_HCL)
    else:
        plugins.unlink(missing_ok=True)
    return out
