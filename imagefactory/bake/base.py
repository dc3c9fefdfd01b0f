"""Base images: Debian packages -> root filesystem (mmdebstrap) -> self-booting qcow2.

    BaseSpec ──► base_inputs() ──► cache key ──(hit)──► cached base.qcow2
                                        └─(miss)─► mmdebstrap ─► grub.cfg ─► bootdisk.assemble
                                                   ─► qemu-img convert ─► cache entry

The cache key is the sha256 of every input (suite, architecture, packages, mirror or
host apt sources, the files written into the guest, and BASE_RECIPE), so the second
bake of a target reuses its base and any change to the recipe builds a new one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import shlex
import shutil
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefactory.bake import bootdisk, guestconfig
from imagefactory.bake.cache import IMAGE_NAME, BaseCache, Entry, sha256_file
from imagefactory.errors import die
from imagefactory.run import CommandError, run
from imagefactory.stages import Stages, follow
from imagefactory.targets import Target

BASE_RECIPE = 4
"""Bump when the build steps change in a way the other inputs do not show."""

COMMON_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "initramfs-tools", "zstd", "kmod",
    "cloud-init", "cloud-guest-utils", "fdisk", "python3", "openssh-server",
    "iproute2", "procps", "e2fsprogs", "netbase", "sudo",
)  # fmt: skip

# Documentation is not needed in an appliance image; keep the licences.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)


ROOT_UUID_NAMESPACE = uuid.UUID("6f6c9a59-2a53-4f0e-9b4e-2b1f5f0f2c11")

PLACEHOLDER_UUID = "00000000-0000-0000-0000-000000000000"
"""The root filesystem UUID where the real one (root_uuid, derived from the cache key)
cannot be used yet: in the cache key's inputs, and in roots built only to be compared."""


def divert_deferred_tools() -> str:
    """The essential hook: the tools in guestconfig.DEFERRED_TOOLS become `true` while the
    packages install, and those in RECORDED_TOOLS are diverted for the stand-ins that
    the next hook copies in; the setup script puts them all back."""
    divert = 'chroot "$1" dpkg-divert --quiet --local --rename --add'
    return " && ".join(
        [f'{divert} {tool} && ln -s /bin/true "$1{tool}"' for tool in guestconfig.DEFERRED_TOOLS]
        + [f"{divert} {tool}" for tool in guestconfig.RECORDED_TOOLS]
    )


@dataclass(frozen=True)
class BaseImage:
    """A base disk ready for Packer."""

    image: Path
    sha256: str
    key: str
    """Cache key (built bases) or the sha256 (given bases)."""
    inputs: dict[str, Any]
    source: str
    """`built`, `cached` or `given`."""


@dataclass(frozen=True)
class BaseSpec:
    target: Target
    suite: str = "bookworm"
    """Debian release the base is built from."""
    mirror: str | None = None
    """Debian mirror URL; None uses the host's Debian apt sources."""
    root_mib: int = 2048
    """Size of the root filesystem; cloud-init grows it to the final disk at first boot."""
    extra_packages: tuple[str, ...] = ()
    """Debian packages the pipeline declares (pipeline.json `debian_packages`)."""

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*base_packages(self.target), *self.extra_packages)))


def base_packages(target: Target) -> tuple[str, ...]:
    return (*COMMON_PACKAGES, target.kernel_package, *target.bootloader_packages)


def host_sources() -> list[Path]:
    """The host's apt source files that point at Debian itself (not third-party repos)."""
    candidates = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]
    found = []
    for name in candidates:
        path = Path(name)
        if path.suffix not in (".list", ".sources") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        active = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        if any("/debian" in ln for ln in active):
            found.append(path)
    return found


def mirror_args(spec: BaseSpec) -> list[str]:
    if spec.mirror:
        return [spec.mirror]
    sources = host_sources()
    if not sources:
        raise die(
            "the host has no Debian apt sources to build the base image from",
            hint="pass --mirror URL (a Debian mirror)",
        )
    return [str(p) for p in sources]


def base_inputs(spec: BaseSpec) -> dict[str, Any]:
    """Everything the base image depends on (the cache key is their sha256)."""
    mirrors = [spec.mirror] if spec.mirror else [p.read_text() for p in host_sources()]
    return {
        "recipe": BASE_RECIPE,
        "suite": spec.suite,
        "arch": spec.target.debian_arch,
        "packages": sorted(spec.packages),
        "dpkg_options": list(DPKG_OPTIONS),
        "mirrors": mirrors,
        "root_mib": spec.root_mib,
        "files": guestconfig.overlay_files(spec.target, PLACEHOLDER_UUID),
        "standins": guestconfig.RECORDED_TOOLS,
        "grub_platforms": list(spec.target.grub_platforms),
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def root_uuid(key: str) -> str:
    """The root filesystem UUID, derived from the cache key so a rebuild is identical."""
    return str(uuid.uuid5(ROOT_UUID_NAMESPACE, key))


def finish_hook(target: Target) -> str:
    """The last customize hook: py3compile's calls and the deferred tools, run once from
    the host (bake/finish.py)."""
    kind = "native" if target.is_native else "foreign"
    return f'{shlex.quote(sys.executable)} -m imagefactory.bake.finish "$1" {kind}'


def hostinstall_hooks(target: Target, state: Path) -> tuple[list[str], list[str]]:
    """A foreign target's essential and customize hooks that put the host's binaries in
    place while the packages install (bake/hostinstall.py); a native target needs none."""
    if target.is_native:
        return [], []
    command = f"{shlex.quote(sys.executable)} -m imagefactory.bake.hostinstall"
    where = f'"$1" {shlex.quote(str(state))}'
    return [f"--essential-hook={command} bind {where}"], [
        f"--customize-hook={command} unbind {where}"
    ]


PRIVATE_MOUNTS = ("unshare", "--mount", "--propagation", "private")
"""How mmdebstrap runs when its hooks mount: those mounts, and its own (/proc, /sys, /dev),
end with it whatever happens."""


def mmdebstrap_argv(
    spec: BaseSpec, rootfs: Path, overlay: Path, mirrors: list[str], standins: Path | None = None
) -> list[str]:
    """`standins` holds guestconfig.RECORDED_TOOLS' stand-ins (default: beside `overlay`);
    the host binaries' copies go beside it too."""
    standins = standins or overlay.parent / "standins"
    bind, unbind = hostinstall_hooks(spec.target, standins.parent / "hostinstall")
    return [
        *(PRIVATE_MOUNTS if bind else ()),
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        f"--arch={spec.target.debian_arch}",
        "--format=directory",
        f"--include={','.join(spec.packages)}",
        *(f"--dpkgopt={opt}" for opt in DPKG_OPTIONS),
        f"--essential-hook={divert_deferred_tools()}",
        f"--essential-hook=sync-in {shlex.quote(str(standins))} /",  # split like a shell
        *bind,
        *unbind,
        f"--customize-hook=sync-in {shlex.quote(str(overlay))} /",
        '--customize-hook=chroot "$1" /bin/sh /fleetbake-setup.sh',
        f"--customize-hook={finish_hook(spec.target)}",
        spec.suite,
        str(rootfs),
        *mirrors,
    ]


def write_overlay(overlay: Path, files: dict[str, str], mode: int | None = None) -> None:
    """Files (guest path -> content) under `overlay`; scripts are executable."""
    for name, content in files.items():
        path = overlay / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(mode or (0o755 if name.endswith(".sh") else 0o644))


def kernel_version(rootfs: Path) -> str:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise die(f"expected one kernel in the base root filesystem, found {len(kernels)}")
    return kernels[0].name.removeprefix("vmlinuz-")


def unmount_below(path: Path) -> None:
    """Lazily unmount anything left mounted inside `path` by an interrupted mmdebstrap,
    so that removing the scratch directory never reaches into /proc, /sys or /dev."""
    prefix = str(path.resolve()) + "/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        run(["umount", "--lazy", mount], check=False)


def run_mmdebstrap(
    argv: list[str],
    spec: BaseSpec,
    work: Path,
    log_path: Path,
    stages: Stages,
    env: dict[str, str] | None = None,
) -> None:
    """Run mmdebstrap as the `rootfs` stage; a failure stops with its last lines."""
    try:
        with stages.stage("rootfs", f"mmdebstrap {spec.suite} {spec.target.debian_arch}"):
            follow(argv, log_path, _mmdebstrap_progress(stages), env=env)
    except CommandError as exc:
        raise die(
            f"mmdebstrap failed (exit code {exc.returncode}); last lines:\n{exc.stdout}\n"
            f"full log: {log_path}"
        ) from None
    finally:
        unmount_below(work)


def _from_entry(entry: Entry, source: str) -> BaseImage:
    return BaseImage(entry.image, entry.sha256, entry.key, entry.inputs, source)


def build_rootfs(spec: BaseSpec, work: Path, fs_uuid: str, log_path: Path, stages: Stages) -> Path:
    """The base's root filesystem, made by mmdebstrap in `work`/rootfs (the files it is
    given, and the host binaries' copies, beside it); mmdebstrap's log goes to `log_path`."""
    rootfs, overlay, standins = work / "rootfs", work / "overlay", work / "standins"
    write_overlay(overlay, guestconfig.overlay_files(spec.target, fs_uuid))
    write_overlay(standins, guestconfig.RECORDED_TOOLS, mode=0o755)
    argv = mmdebstrap_argv(spec, rootfs, overlay, mirror_args(spec), standins)
    run_mmdebstrap(argv, spec, work, log_path, stages)
    return rootfs


def build_base(spec: BaseSpec, cache: BaseCache, stages: Stages) -> BaseImage:
    """Return the cached base for `spec`, building it first if needed."""
    inputs = base_inputs(spec)
    key = cache_key(inputs)
    if entry := cache.lookup(key):
        stages.say(f"==> base: reusing cached base {key[:12]} ({entry.image})")
        return _from_entry(entry, "cached")
    target = spec.target
    fs_uuid = root_uuid(key)
    with cache.building(key, inputs) as work:
        log_path = work.parent / f"{key[:12]}-mmdebstrap.log"
        rootfs, grub_dir = build_rootfs(spec, work, fs_uuid, log_path, stages), work / "grub"
        version = kernel_version(rootfs)
        (rootfs / "boot/grub").mkdir(parents=True, exist_ok=True)
        (rootfs / "boot/grub/grub.cfg").write_text(guestconfig.grub_cfg(target, fs_uuid, version))
        shutil.move(rootfs / guestconfig.GRUB_OUT_DIR.lstrip("/"), grub_dir)
        with stages.stage("disk", "partitions, filesystems, GRUB, qcow2"):
            raw = work / "disk.raw"
            layout = bootdisk.Layout(spec.root_mib)
            bootdisk.assemble(raw, layout, rootfs, fs_uuid, grub_dir, target.grub_platforms)
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, work / IMAGE_NAME])
        log_path.unlink(missing_ok=True)
    built = cache.lookup(key)
    assert built is not None
    return _from_entry(built, "built")


def given_base(path_or_url: str, sha256: str | None, cache: BaseCache, stages: Stages) -> BaseImage:
    """A user's base qcow2 (such as Debian's genericcloud image), checked against its
    sha256; a URL is downloaded once into the cache."""
    if not sha256 or not re.fullmatch(r"[0-9a-f]{64}", sha256.lower()):
        raise die("--base-image needs --base-sha256 HEX (64 hex digits)")
    sha256 = sha256.lower()
    if "://" in path_or_url:
        path = cache.dir.parent / "downloads" / f"{sha256}.qcow2"
        if not path.is_file():
            with stages.stage("download", path_or_url):
                _download(path_or_url, path)
    else:
        path = Path(path_or_url)
        if not path.is_file():
            raise die(f"{path}: no such base image")
    actual = sha256_file(path)
    if actual != sha256:
        raise die(f"{path_or_url}: sha256 is {actual}, expected {sha256}")
    stages.say(f"==> base: using the given base {path} (sha256 checked)")
    return BaseImage(path.resolve(), sha256, sha256, {"given": path_or_url}, "given")


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, part.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        raise die(f"cannot download {url}: {exc}") from None
    part.rename(dest)


def _mmdebstrap_progress(stages: Stages) -> Any:
    """Show mmdebstrap's phase lines (`I: ...`), not every package."""

    def on_line(line: str) -> None:
        if line.startswith(("I: ", "E: ", "W: ")):
            stages.detail(line)

    return on_line
