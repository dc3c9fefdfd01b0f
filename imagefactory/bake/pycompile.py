"""Byte-compiling a base's Python packages once, natively when the host can.

Every Python package's postinst runs `py3compile -p PACKAGE`: under qemu-user that is an
emulated interpreter start and an emulated compile per package (about 30 s for a base).
While the packages install, py3compile is a stand-in that only records its arguments:

    essential hook     dpkg-divert py3compile; STANDIN takes its place
    postinsts          STANDIN appends `argc, argv...` (NUL-separated) to QUEUE
    setup script       STANDIN goes, the real py3compile comes back (guestconfig)
    customize hook     `python -m imagefactory.bake.pycompile ROOT`: the recorded calls,
                       in order, each run as the target's own py3compile in the chroot

So the files, their paths and their embedded source paths are exactly what py3compile
makes, because it is py3compile that makes them. For a foreign target the interpreter is
the host's own `python3.X` binary, bind-mounted over the target's in a private mount
namespace (with the host's libraries beside it), when the host's `python3.X-minimal` is
the very same Debian version as the target's: bytecode does not depend on the
architecture, and the target's standard library is what it runs. Otherwise (another
version, or a host whose loader the chroot cannot reach) the calls run emulated, as the
postinsts would have run them.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from imagefactory.run import CommandError, run

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

PROBE_FAILED = 100
"""Exit code of the native script when the host's interpreter cannot start in the chroot."""


@dataclass(frozen=True)
class Bind:
    """A host path bind-mounted at a guest path for the native run."""

    host: Path
    guest: str


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


def installed_version(status: str, package: str) -> str | None:
    """The version of `package` if dpkg's status file (text) says it is installed."""
    for paragraph in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in paragraph.splitlines() if ": " in line)
        if fields.get("Package") == package and fields.get("Status", "").endswith(" installed"):
            return fields.get("Version")
    return None


def replay_script(calls: list[list[str]]) -> str:
    """The chroot's shell script: each recorded call, in order, as a postinst would."""
    lines = ["set -e", "umask 022"]
    lines += [shlex.join(["py3compile", *args]) for args in calls]
    return "\n".join(lines) + "\n"


def native_script(binds: list[Bind], interpreter: str, replay: str) -> str:
    """Run inside `unshare --mount` with the root as $1: bind the host's files, check the
    host's interpreter starts in the chroot, then run the replay there."""
    lines = ["set -eu"]
    lines += [f'mount --bind {shlex.quote(str(b.host))} "$1"{shlex.quote(b.guest)}' for b in binds]
    lines += [
        f'chroot "$1" {shlex.quote(interpreter)} -S -c "" || exit {PROBE_FAILED}',
        f'exec chroot "$1" /bin/sh -c {shlex.quote(replay)}',
    ]
    return "\n".join(lines) + "\n"


def interpreters(root: Path) -> list[str]:
    """The target's `python3.X` binaries (guest paths), which py3compile compiles with."""
    return sorted(
        f"/usr/bin/{p.name}"
        for p in (root / "usr/bin").glob("python3.*")
        if p.name.removeprefix("python3.").isdigit() and p.is_file() and not p.is_symlink()
    )


def host_version(package: str) -> str | None:
    try:
        out = run(["dpkg-query", "-W", "-f=${Status}|${Version}", package])
    except (CommandError, OSError):
        return None
    status, _, version = out.stdout.partition("|")
    return version if status.endswith(" installed") else None


def native_binds(root: Path) -> tuple[list[Bind], list[str]]:
    """What lets the host's interpreters run in a foreign chroot, and why not (reasons)."""
    multiarch = getattr(sys.implementation, "_multiarch", "")
    libs = [f"/usr/lib/{multiarch}", "/lib64"] if multiarch else []
    binds = [Bind(Path(d), d) for d in libs if Path(d).is_dir()]
    reasons = [f"{b.guest} exists in the target" for b in binds if (root / b.guest[1:]).exists()]
    if not binds:
        reasons.append("the host's library directory is unknown")
    status = (root / "var/lib/dpkg/status").read_text(encoding="utf-8")
    for guest in interpreters(root):
        package = f"{Path(guest).name}-minimal"
        ours, theirs = host_version(package), installed_version(status, package)
        if ours is None or ours != theirs or not Path(guest).is_file():
            reasons.append(f"host {package} {ours or 'not installed'}, target's {theirs}")
        else:
            binds.append(Bind(Path(guest), guest))
    return binds, reasons


def replay_native(root: Path, binds: list[Bind], interpreter: str, replay: str) -> bool:
    """The replay with the host's interpreters; False if they cannot start in the chroot."""
    made = [root / b.guest[1:] for b in binds if not (root / b.guest[1:]).exists()]
    for path in made:
        path.mkdir()
    try:
        script = native_script(binds, interpreter, replay)
        unshare = ["unshare", "--mount", "--propagation", "private"]
        argv = [*unshare, "sh", "-c", script, "sh", str(root)]
        done = run(argv, check=False)
    finally:
        for path in reversed(made):
            path.rmdir()
    if done.returncode not in (0, PROBE_FAILED):
        raise CommandError(argv, done.returncode, done.stdout, done.stderr)
    return done.returncode == 0


def replay(root: Path, foreign: bool) -> str:
    """Run the recorded calls once and remove the queue; says how it compiled."""
    queue = root / QUEUE[1:]
    if not queue.exists():
        return "nothing to byte-compile"
    script = replay_script(parse_queue(queue.read_bytes()))
    found = interpreters(root)
    binds, reasons = native_binds(root) if foreign and found else ([], [])
    if foreign and not found:
        reasons.append("the target has no python3.X")
    if foreign and not reasons and replay_native(root, binds, found[0], script):
        how = f"byte-compiled with the host's {', '.join(found)}"
    else:
        run(["chroot", root, "/bin/sh", "-c", script])
        why = "; ".join(reasons) or ("a native target" if not foreign else "the probe failed")
        how = f"byte-compiled in the chroot ({why})"
    queue.unlink()
    return how


def main(argv: list[str]) -> int:
    """`python -m imagefactory.bake.pycompile ROOT native|foreign` (mmdebstrap's hook)."""
    root, kind = Path(argv[0]), argv[1]
    try:
        print(f"I: fleetbake: {replay(root, kind == 'foreign')}", flush=True)
    except (CommandError, ValueError, OSError) as exc:
        print(f"E: fleetbake: byte-compiling failed: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
