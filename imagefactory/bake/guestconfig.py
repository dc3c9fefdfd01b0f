"""Files written into a base root filesystem, as data: path inside the guest -> content.

Everything here is pure, so the exact bytes that go into the base (and into its cache
key) are visible and testable.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from imagefactory.bake import pycompile
from imagefactory.targets import Target

# Modules a virtio guest needs to find its root disk; the rest of the kernel's modules
# stay on the root filesystem. A short list keeps mkinitramfs fast under qemu-user.
COMMON_INITRAMFS_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net", "sd_mod", "sr_mod",
    "ext4", "crc32c_generic", "vfat", "nls_cp437", "nls_ascii",
)  # fmt: skip

GRUB_MODULES_COMMON = (
    "part_gpt", "ext2", "fat", "search", "normal", "linux", "configfile",
    "echo", "test", "gzio",
)  # fmt: skip
GRUB_MODULES_PLATFORM = {"i386-pc": ("biosdisk",), "x86_64-efi": ("efi_gop",)}

DEFERRED_TOOLS = {
    # Every kernel, module or udev package would run mkinitramfs again.
    "/usr/sbin/update-initramfs": "update-initramfs -c -k all",
    # ca-certificates' postinst runs it, then triggers itself to run it again: a shell
    # loop over ~150 certificates, 40 s under qemu-user; one run gives the same files.
    "/usr/sbin/update-ca-certificates": (
        "[ ! -x /usr/sbin/update-ca-certificates ] || update-ca-certificates"
    ),
}
"""Tools that are `true` while the packages install (base.py's essential hook): the
setup script puts each back, and bake/finish.py runs each once, with this command."""

RECORDED_TOOLS = {pycompile.PY3COMPILE: pycompile.STANDIN}
"""Tools replaced by a stand-in that records their calls while the packages install: the
setup script puts each back, and the calls are run once afterwards (bake/pycompile.py)."""

GRUB_OUT_DIR = "/boot/efi-images"
"""Where the setup script leaves GRUB images for the disk assembler (outside the rootfs)."""


def grub_embed_cfg(root_uuid: str) -> str:
    """The config built into every GRUB image: find the root filesystem, read its grub.cfg."""
    return (
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        "set prefix=($root)/boot/grub\n"
        "configfile ($root)/boot/grub/grub.cfg\n"
    )


def kernel_cmdline(target: Target, root_uuid: str) -> str:
    # The serial console comes last so /dev/console (and journal+console output) is serial.
    return f"root=UUID={root_uuid} ro console=tty0 console={target.console} net.ifnames=0"


def grub_cfg(target: Target, root_uuid: str, kernel_version: str) -> str:
    return (
        "set timeout=0\nset default=0\n"
        "menuentry 'Debian GNU/Linux (fleetbake)' {\n"
        f"  linux /boot/vmlinuz-{kernel_version} {kernel_cmdline(target, root_uuid)}\n"
        f"  initrd /boot/initrd.img-{kernel_version}\n"
        "}\n"
    )


def fstab(root_uuid: str) -> str:
    return f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n"


def setup_script(target: Target) -> str:
    """Runs once inside the root filesystem (chroot) after all packages are installed."""
    lines = ["set -eu"]
    # The last diversion removed is the one recipe 2 removed last: dpkg's diversions-old
    # (its backup of the previous list) stays the same.
    for tool in (*RECORDED_TOOLS, *DEFERRED_TOOLS):
        lines += [f"rm -f {tool}", f"dpkg-divert --quiet --local --rename --remove {tool}"]
    lines += [
        "systemctl enable systemd-networkd.service fleetbake-ssh-keygen.service",
        # Reaps LVM snapshots of e2scrub at every boot; the root here is plain ext4.
        "systemctl disable e2scrub_reap.service",
        # Nodes never reach a mirror (restricted network): no periodic apt runs.
        "systemctl mask apt-daily.timer apt-daily-upgrade.timer",
        "rm -f /etc/ssh/ssh_host_*",
        f"mkdir -p {GRUB_OUT_DIR}",
    ]
    for platform in target.grub_platforms:
        modules = " ".join(GRUB_MODULES_COMMON + GRUB_MODULES_PLATFORM.get(platform, ()))
        name = "core.img" if platform == "i386-pc" else f"{platform}.efi"
        lines.append(
            f"grub-mkimage -O {platform} -d /usr/lib/grub/{platform} "
            f"-c /etc/fleetbake/grub-embed.cfg -p /boot/grub "
            f"-o {GRUB_OUT_DIR}/{name} {modules}"
        )
        if platform == "i386-pc":
            lines.append(f"cp /usr/lib/grub/i386-pc/boot.img {GRUB_OUT_DIR}/boot.img")
    lines.append("rm -f /fleetbake-setup.sh")
    return "\n".join(lines) + "\n"


# FSTYPE names the root's type, which the fsck hook cannot find out in a chroot: the
# initramfs then carries e2fsck and checks the root before mounting it, and
# systemd-fsck-root.service (ConditionPathExists=!/run/initramfs/fsck-root) is skipped.
INITRAMFS_CONF = "MODULES=list\nCOMPRESS=zstd\nFSTYPE=ext4\n"

BESIDE_THE_AGENT_UNITS = ("cloud-config.service", "cloud-final.service")
"""cloud-init's later stages, which start when the agent does (both follow the init stage)."""

BESIDE_THE_AGENT = """\
# fleetbake: the agent starts beside this stage; on a node's few (often emulated) CPUs
# it goes first. The stage still runs in full, an operator's commands included.
[Service]
Nice=10
"""

SSH_KEYGEN_UNIT = """\
[Unit]
Description=Generate SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=ssh.service
"""

NETWORK_UNIT = """\
[Match]
Name=eth* en*

[Network]
DHCP=yes
"""

SSHD_CONFIG = """\
# fleetbake: keys only.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
"""

INIT_MODULES_RAN = "/run/fleetbake/init-modules-ran"
"""Touched by bootcmd, one of the first init modules, in every boot: when it exists before
cloud-init.service starts, cloud-init-local is the stage that ran them."""

CLOUD_CFG = f"""\
# fleetbake: the NoCloud seed is the only datasource, so boot never probes the network
# for metadata; the network itself is systemd-networkd with DHCP (see
# /etc/systemd/network/20-wired.network).
datasource_list: [NoCloud, None]
network: {{config: disabled}}
# Only the modules a node's seed needs, all in the init stage that the agent waits for:
# node.env (write-files), the root filesystem grown to the disk, the hostname, the `ops`
# user and the SSH host key. A seed whose meta-data says `dsmode: local` (imagefactory's
# do) has them run by cloud-init-local, before the network, and bootcmd's marker then
# skips cloud-init.service (see its drop-in); any other seed has them run there.
# The later stages keep only the runners of an operator's own commands and scripts, and
# run beside the agent, not before it.
cloud_init_modules:
  - seed_random
  - bootcmd
  - write-files
  - growpart
  - resizefs
  - set_hostname
  - update_hostname
  - update_etc_hosts
  - users-groups
  - ssh
cloud_config_modules:
  - runcmd
cloud_final_modules:
  - scripts-per-once
  - scripts-per-boot
  - scripts-per-instance
  - scripts-user
  - final-message
  - power-state-change
# The node's host name resolves (127.0.1.1, Debian's way), so sudo need not ask DNS.
manage_etc_hosts: localhost
bootcmd:
  - [mkdir, -p, {PurePosixPath(INIT_MODULES_RAN).parent}]
  - [touch, {INIT_MODULES_RAN}]
"""

INIT_STAGE_DROPIN = f"""\
# fleetbake: with a `dsmode: local` seed cloud-init-local has run the init modules; this
# stage would only start Python to find that out, on the agent's path (sysinit.target).
[Unit]
ConditionPathExists=!{INIT_MODULES_RAN}
"""


def overlay_files(target: Target, root_uuid: str) -> dict[str, str]:
    """Files copied into the root filesystem before the setup script runs."""
    modules = COMMON_INITRAMFS_MODULES + target.initramfs_modules
    return {
        "/etc/initramfs-tools/conf.d/fleetbake.conf": INITRAMFS_CONF,
        "/etc/initramfs-tools/modules": "\n".join(modules) + "\n",
        "/etc/fleetbake/grub-embed.cfg": grub_embed_cfg(root_uuid),
        "/etc/fstab": fstab(root_uuid),
        "/etc/hostname": "localhost\n",
        "/etc/systemd/network/20-wired.network": NETWORK_UNIT,
        "/etc/systemd/system/fleetbake-ssh-keygen.service": SSH_KEYGEN_UNIT,
        "/etc/ssh/sshd_config.d/50-fleetbake.conf": SSHD_CONFIG,
        "/etc/cloud/cloud.cfg.d/90-fleetbake.cfg": CLOUD_CFG,
        "/etc/systemd/system/cloud-init.service.d/50-fleetbake.conf": INIT_STAGE_DROPIN,
        **{
            f"/etc/systemd/system/{unit}.d/50-fleetbake.conf": BESIDE_THE_AGENT
            for unit in BESIDE_THE_AGENT_UNITS
        },
        "/fleetbake-setup.sh": setup_script(target),
    }
