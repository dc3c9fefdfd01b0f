"""Build only the root filesystem of a target's base with the code checked out here, and
keep it: what `scripts/compare_rootfs.py` compares when a change to the base's recipe
must leave its content alone.

    .venv/bin/python scripts/build_rootfs.py aarch64-linux /var/tmp/old    # on the old commit
    .venv/bin/python scripts/build_rootfs.py aarch64-linux /var/tmp/new    # on the new one
    .venv/bin/python scripts/compare_rootfs.py /var/tmp/old/rootfs /var/tmp/new/rootfs \\
        --ignore '/boot/initrd.img-*'

The root is DIR/rootfs and mmdebstrap's log DIR/mmdebstrap.log; DIR must not exist. The
root filesystem's UUID (in /etc/fstab and the GRUB files) is the same fixed placeholder in
every build, so two builds compare equal. Runs as root (mmdebstrap's root mode), with the
host's Debian apt sources or --mirror.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from imagefactory.bake.base import PLACEHOLDER_UUID, BaseSpec, build_rootfs, mirror_args
from imagefactory.errors import HostError, UserError, die
from imagefactory.stages import Stages
from imagefactory.targets import get_target, target_names


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("target", choices=target_names())
    parser.add_argument("dir", type=Path, help="a new directory for the root and its log")
    parser.add_argument("--mirror", help="Debian mirror URL (default: the host's apt sources)")
    args = parser.parse_args()
    spec = BaseSpec(get_target(args.target), mirror=args.mirror)
    started = time.monotonic()
    try:
        if os.geteuid() != 0:
            raise die("run it as root: mmdebstrap builds the root in its root mode")
        mirror_args(spec)  # no apt sources: say so before DIR exists
        args.dir.mkdir(parents=True)
        log = args.dir / "mmdebstrap.log"
        root = build_rootfs(spec, args.dir, PLACEHOLDER_UUID, log, Stages(out=sys.stderr))
    except (UserError, HostError) as exc:
        print(f"Error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"Error: {exc.filename or args.dir}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"{root}: {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
