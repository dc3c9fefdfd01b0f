"""docker and podman as the runtime of container nodes, through their own command lines
(same commands for both): load the baked archive, run one detached container per node
with no network of its own, follow its output into console.log, stop it.

A container starts with `--network none` (loopback only); the master is then forwarded
into its network namespace (/proc/PID/ns/net) as for runc (boot/netns.py), so the
agent's first heartbeat may be retried once if it is sent before the forward listens.
As with runc, the image's root is read-only (tmpfs /tmp and /run), capabilities are
dropped and no_new_privs is set; the node's state directory is a bind-mounted volume.

A container host may also be remote (`ssh://[user@]host[:port]`): every command then
talks to that host's engine over SSH (`docker -H`, `podman --url`), the image is pulled
there by digest, the container uses the engine's default network (the master as that
host reaches it) and its state directory is a tmpfs owned by the image's user.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from executor.settings import SYSTEM_STATE_DIR
from imagefactory.errors import die
from imagefactory.run import CommandError, run, spawn

ENGINES = ("docker", "podman")
STOP_GRACE_S = 30
"""`stop -t`: time for the agent to cancel the run and deliver its report."""
PODMAN_SOCKET = "/run/podman/podman.sock"
"""The rootful Podman service's socket: where `podman --url ssh://host` connects."""


def command(engine: str, host: str | None = None) -> list[str]:
    """The start of every command line for `engine`, on this machine or, with `host`
    (`ssh://[user@]host[:port]`), on that host over SSH."""
    if host is None:
        return [engine]
    if engine == "docker":
        return [engine, "-H", host]
    return [engine, "--url", host + PODMAN_SOCKET]


def pull_argv(
    engine: str,
    reference: str,
    tls_verify: bool = True,
    cert_dir: Path | None = None,
    host: str | None = None,
) -> list[str]:
    """Pull `reference` (pinned by digest). docker takes registry trust from its daemon's
    settings; podman is told (a certificate directory only when local)."""
    trust = []
    if engine == "podman":
        trust = [f"--tls-verify={'true' if tls_verify else 'false'}"]
        if cert_dir is not None and host is None:
            trust += ["--cert-dir", str(cert_dir)]
    return [*command(engine, host), "pull", "--quiet", *trust, reference]


def image_name(layout: Path) -> str:
    """The name `bake --format oci` gave the archive (manifest.json `oci.name`)."""
    try:
        name = json.loads((layout / "manifest.json").read_text(encoding="utf-8"))["oci"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise die(f"{layout} has no manifest.json naming its image") from None
    if not isinstance(name, str):
        raise die(f"{layout}/manifest.json names no image")
    return name


def load(engine: str, layout: Path) -> str:
    """`ENGINE load` of the layout's archive; the image's name."""
    name = image_name(layout)
    archives = sorted(layout.glob("*-oci.tar"))
    if len(archives) != 1:
        raise die(f"{layout} holds {len(archives)} *-oci.tar archives, expected 1")
    try:
        run([engine, "load", "-i", str(archives[0])])
    except CommandError as exc:
        raise die(f"{engine} load failed: {exc.stderr.strip()}") from None
    return name


def image_user(engine: str, name: str, host: str | None = None) -> tuple[int, int]:
    argv = [*command(engine, host), "image", "inspect", "--format", "{{.Config.User}}", name]
    out = run(argv).stdout
    uid, _, gid = out.strip().partition(":")
    return int(uid or 0), int(gid or uid or 0)


def run_argv(
    engine: str,
    name: str,
    image: str,
    hostname: str,
    env_file: Path,
    state: Path | None,
    host: str | None = None,
    user: tuple[int, int] = (0, 0),
) -> list[str]:
    """The run line. `state`: the host directory mounted at the agent's state directory,
    with no network (the master is forwarded in); None on a remote host: a tmpfs owned
    by the image's `user` there, and the engine's default network."""
    if state is None:
        uid, gid = user
        where = ["--tmpfs", f"{SYSTEM_STATE_DIR}:mode=0700,uid={uid},gid={gid}"]
    else:
        where = ["--network", "none", "--volume", f"{state}:{SYSTEM_STATE_DIR}"]
    return [
        *command(engine, host), "run", "--detach", "--name", name, "--hostname", hostname,
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--read-only", "--tmpfs", "/tmp:mode=1777", "--tmpfs", "/run",
        "--env-file", str(env_file), *where, "--stop-timeout", str(STOP_GRACE_S), image,
    ]  # fmt: skip


def write_env_file(path: Path, env: tuple[tuple[str, str], ...]) -> None:
    """`KEY=value` lines (values are checked to hold no line break); mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in env)


def start(engine: str, argv: list[str], host: str | None = None) -> int:
    """Start the container; the pid of its first process on its host (for its namespace)."""
    try:
        run(argv)
    except CommandError as exc:
        raise die(f"{engine} run failed: {exc.stderr.strip()}") from None
    name = argv[argv.index("--name") + 1]
    inspect = [*command(engine, host), "inspect", "--format", "{{.State.Pid}}", name]
    return int(run(inspect).stdout.strip() or 0)


def follow_logs(
    engine: str, name: str, console_log: Path, die_with_parent: bool
) -> subprocess.Popen[bytes]:
    with console_log.open("ab") as log:
        return spawn(
            [engine, "logs", "--follow", name],
            stdout=log.fileno(),
            stderr=subprocess.STDOUT,
            die_with_parent=die_with_parent,
        )


def running(engine: str, name: str, host: str | None = None) -> bool:
    argv = [*command(engine, host), "inspect", "--format", "{{.State.Running}}", name]
    result = run(argv, check=False)
    return result.returncode == 0 and result.stdout.strip() == "true"


def stop(engine: str, name: str, host: str | None = None) -> None:
    """SIGTERM (the run is cancelled and reported), SIGKILL after the grace; remove."""
    run([*command(engine, host), "stop", "--time", str(STOP_GRACE_S), name], check=False)
    run([*command(engine, host), "rm", "--force", name], check=False)
