"""Byte-compiling a base's Python packages once, natively when the host can.

Every Python package's postinst runs `py3compile -p PACKAGE`: under qemu-user that is an
emulated interpreter start and an emulated compile per package (about 30 s for a base).
While the packages install, py3compile is a stand-in that only records its arguments:

    essential hook     dpkg-divert py3compile; STANDIN takes its place
    postinsts          STANDIN appends `argc, argv...` (NUL-separated) to QUEUE
    setup script       STANDIN goes, the real py3compile comes back (guestconfig)
    customize hook     the recorded calls, in order, each run as the target's own
                       py3compile in the chroot (bake/finish.py calls `replay`)

So the files, their paths and their embedded source paths are exactly what py3compile
makes, because it is py3compile that makes them. For a foreign target the interpreter is
the host's own `python3.X` binary in place of the target's (bake/hosttools.py) when the
host's `python3.X-minimal` is the very same Debian version as the target's: bytecode does
not depend on the architecture, and the target's standard library is what it runs.
Otherwise (another version, or a host whose loader the chroot cannot reach) the calls
run emulated, as the postinsts would have run them.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from imagefactory.bake import hosttools

PY3COMPILE = "/usr/bin/py3compile"
QUEUE = "/var/cache/fleetbake-py3compile.queue"

STANDIN = f"""\
#!/bin/sh
# fleetbake: while the base's packages install, byte-compiling is recorded here and run
# once at the end of the build (imagefactory/bake/pycompile.py).
# Until python3 has unpacked the real py3compile, postinsts would not have found one.
[ -e {PY3COMPILE}.distrib ] || exit 0
printf '%s\\0' "$#" "$@" >> {QUEUE}
"""


def parse_queue(data: bytes) -> list[list[str]]:
    """The recorded calls: each is `argc\\0arg1\\0...argN\\0`."""
    fields = data.split(b"\0")
    if fields[-1] != b"":
        raise ValueError("the py3compile queue ends in the middle of a call")
    fields.pop()
    calls = []
    while fields:
        count = fields.pop(0)
        if not count.isdigit() or int(count) > len(fields):
            raise ValueError(f"the py3compile queue is damaged near {count[:40]!r}")
        calls.append([arg.decode() for arg in fields[: int(count)]])
        del fields[: int(count)]
    return calls


def replay_script(calls: list[list[str]]) -> str:
    """The chroot's shell script: each recorded call, in order, as a postinst would."""
    lines = ["set -e", "umask 022"]
    lines += [shlex.join(["py3compile", *args]) for args in calls]
    return "\n".join(lines) + "\n"


def interpreters(root: Path) -> list[str]:
    """The target's `python3.X` binaries (guest paths), which py3compile compiles with."""
    return sorted(
        f"/usr/bin/{p.name}"
        for p in (root / "usr/bin").glob("python3.*")
        if p.name.removeprefix("python3.").isdigit() and p.is_file() and not p.is_symlink()
    )


def native_binds(root: Path, found: list[str]) -> tuple[list[hosttools.Bind], list[str]]:
    """The host's binaries for the target's interpreters `found` (`interpreters`) in the
    chroot, or why they cannot be used."""
    if not found:
        return [], ["the target has no python3.X"]
    packages = tuple(f"{Path(guest).name}-minimal" for guest in found)
    binds, reasons = hosttools.tool_binds(root, packages)
    if missing := sorted(set(found) - {b.guest for b in binds}):
        reasons = reasons or [f"no host {', '.join(missing)}"]
    return ([], reasons) if reasons else (binds, [])


def replay(root: Path, foreign: bool) -> str:
    """Run the recorded calls once and remove the queue; says how it compiled."""
    queue = root / QUEUE[1:]
    if not queue.exists():
        return "nothing to byte-compile"
    script = replay_script(parse_queue(queue.read_bytes()))
    found = interpreters(root)
    binds, reasons = native_binds(root, found) if foreign else ([], [])
    probe = [*found[:1], "-S", "-c", ""]
    if foreign and not reasons and hosttools.run_native(root, binds, probe, script):
        how = f"byte-compiled with the host's {', '.join(found)}"
    else:
        hosttools.run_in_chroot(root, script)
        why = "; ".join(reasons) or ("a native target" if not foreign else "the probe failed")
        how = f"byte-compiled in the chroot ({why})"
    queue.unlink()
    return how
