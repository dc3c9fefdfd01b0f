"""`imagefactory install`: run a bare-metal installer on devices over SSH, and wait for
their agents the way `boot --wait` does (boot/waiting.py, fed by the device's journal)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click

from imagefactory.boot.console import ConsoleFollower
from imagefactory.errors import die
from imagefactory.install.destination import Destination
from imagefactory.install.fleet import (
    After,
    Fleet,
    Job,
    Outcome,
    Session,
    node_job,
    summary_lines,
)
from imagefactory.install.remote import JournalFollower

WAITS = ("none", "heartbeat", "report")
UNIT = "executor.service"
_echo_lock = threading.Lock()


class InstallFailed(click.ClickException):
    """At least one device failed (exit 1); the summary above says which and why."""

    exit_code = 1


def progress(message: str) -> None:
    with _echo_lock:  # one line at a time from the devices' threads
        click.echo(message, err=True)


def find_script(path: Path) -> Path:
    """install.sh in an installer directory (or the file itself), checked against the
    SHA256SUMS next to it, so a damaged copy is never sent to a device."""
    script = path / "install.sh" if path.is_dir() else path
    if not script.is_file():
        raise die(
            f"no installer at {path}",
            hint="give the TARGET-installer directory `imagefactory bake --format installer` wrote",
        )
    sums = script.parent / "SHA256SUMS"
    try:
        lines = sums.read_text().splitlines()
    except OSError as exc:
        raise die(f"cannot read {sums}: {exc.strerror}") from None
    listed = {name: sha for sha, name in (line.split("  ", 1) for line in lines if "  " in line)}
    actual = hashlib.sha256(script.read_bytes()).hexdigest()
    if listed.get(script.name) != actual:
        raise die(f"{script} does not match {sums}", hint="bake the installer again")
    return script


def waiter(
    wait: str,
    timeout_s: float,
    admin_url: str | None,
    admin_token_file: Path | None,
    workdir: Path,
    insecure: bool = False,
) -> After | None:
    """The --wait step of each device, composed from boot's wait logic: the device's
    journal stands in for a VM's serial console, the SSH session for the VM process."""
    if wait == "none":
        return None
    from imagefactory.boot import console, nodestate, waiting
    from imagefactory.install.remote import RemoteError

    api = None
    if admin_token_file is not None:
        from imagefactory.tokens import read_secret

        assert admin_url is not None
        api = waiting.MasterApi(admin_url, read_secret(admin_token_file), insecure=insecure)

    def after(session: Session) -> str | None:
        outcome = session.outcome
        dest, node_id = outcome.dest, outcome.node_id or ""
        journal = workdir / f"{node_id}.journal"
        follower = JournalFollower(session.client, session.sudo, UNIT, journal)
        record = nodestate.NodeRecord(
            node_id=node_id,
            run_id=outcome.extra.get("run_id") or "",
            instance_id=str(dest),
            backend="ssh",
            ssh_port=dest.port,
            ssh_user=dest.user,
            ssh_key="",
            workdir=str(workdir),
            console_log=str(journal),
        )
        follow = console.ConsoleFollower(journal)
        device = _Agent(follower, follow)
        node = waiting.BootedNode(record, device, follow, time.monotonic())

        def say(text: str) -> None:
            progress(f"[{dest}] {text}")

        try:
            if wait in ("heartbeat", "report") and api is not None and not record.run_id:
                # The run's id is the agent's own: read it off its first status line.
                waiting.wait_for("heartbeat", timeout_s, [node], say, None)
                last = node.follower.last
                assert last is not None
                node.record = dataclasses.replace(record, run_id=last.run)
                outcome.extra["run_id"] = last.run
            waiting.wait_for(wait, timeout_s, [node], say, api)
        except waiting.BootTimeout as exc:
            first, *tail = exc.message.splitlines()
            for line in tail:
                say(line)
            raise RemoteError(first) from None
        finally:
            follower.stop()
        if wait == "report" and node.run_status != "succeeded":
            raise RemoteError(f"the run ended {node.run_status}")
        return node.outcome

    return after


@dataclass(frozen=True)
class _Agent:
    """The `Machine` of boot's wait for a device: it "runs" while the SSH session is up
    and the agent has not printed a final status (so an agent that gave up, e.g. on a
    configuration error, fails the wait at once instead of at the timeout)."""

    journal: JournalFollower
    statuses: ConsoleFollower

    def running(self) -> bool:
        last = self.statuses.last
        return self.journal.running() and not (last is not None and last.final)

    def stop(self) -> None:
        self.journal.stop()


@click.command("install")
@click.argument("installer", type=click.Path(path_type=Path))
@click.option(
    "--ssh",
    "destinations",
    multiple=True,
    required=True,
    metavar="USER@HOST[:PORT]",
    help="A device to install on; repeatable (devices run in parallel). A login other "
    "than root needs passwordless sudo.",
)
@click.option("--node-id", help="The node's ID; with several --ssh: NODE-ID-1..NODE-ID-K.")
@click.option("--master", metavar="URL", help="The master's URL as the DEVICES reach it.")
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Derive each node's token from this secret (as the server does).",
)
@click.option("--token", help="The node's token (one device only; prefer --secret-file).")
@click.option("--run-id", help="EXECUTOR_RUN_ID (default: the agent makes one and keeps it).")
@click.option(
    "--env",
    "env_pairs",
    multiple=True,
    metavar="K=V",
    help="Extra node.env variable; repeatable. Newlines are refused.",
)
@click.option(
    "--on-complete",
    type=click.Choice(["none", "poweroff"]),
    default="none",
    show_default=True,
    help="What the agent does once its report is delivered (a device usually stays up).",
)
@click.option(
    "--master-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The fleet CA's bundle.crt: the devices verify the https:// master against it "
    "(EXECUTOR_MASTER_CA).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow a plain http:// master reached over a network: by the devices "
    "(EXECUTOR_INSECURE=1) and by this host's --wait with --admin-token-file (the tokens "
    "travel unencrypted).",
)
@click.option(
    "--identity-file",
    "-i",
    type=click.Path(dir_okay=False, path_type=Path),
    help="SSH private key (default: the SSH agent and ~/.ssh keys).",
)
@click.option(
    "--known-hosts",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("~/.ssh/known_hosts"),
    show_default=True,
    help="Trusted host keys (OpenSSH format); --accept-new-host-key adds to it.",
)
@click.option(
    "--host-key-fingerprint",
    "fingerprints",
    multiple=True,
    metavar="SHA256:...",
    help="Trust a device whose host key has this fingerprint (`ssh-keygen -lf`); repeatable.",
)
@click.option(
    "--accept-new-host-key",
    is_flag=True,
    help="Trust a device's key on first sight and record it in --known-hosts (a changed "
    "key is still refused).",
)
@click.option(
    "--wait",
    type=click.Choice(WAITS),
    default="heartbeat",
    show_default=True,
    help="Wait for each agent's first heartbeat or its report, as `boot --wait` does "
    "(from the device's journal, or the master's admin API with --admin-token-file).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="Seconds to wait per device.",
)
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Ask the master's admin API for heartbeats and reports instead of the journal.",
)
@click.option(
    "--admin-url",
    metavar="URL",
    help="The master's URL as THIS host reaches it, for --admin-token-file (default: --master).",
)
@click.option("--uninstall", is_flag=True, help="Remove the node from the devices instead.")
@click.option("--purge", is_flag=True, help="With --uninstall: remove the agent's state too.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def install_command(
    installer: Path,
    destinations: tuple[str, ...],
    node_id: str | None,
    master: str | None,
    secret_file: Path | None,
    token: str | None,
    run_id: str | None,
    env_pairs: tuple[str, ...],
    on_complete: str,
    master_ca: Path | None,
    insecure: bool,
    identity_file: Path | None,
    known_hosts: Path,
    fingerprints: tuple[str, ...],
    accept_new_host_key: bool,
    wait: str,
    timeout_s: float,
    admin_token_file: Path | None,
    admin_url: str | None,
    uninstall: bool,
    purge: bool,
    as_json: bool,
) -> None:
    """Install a bare-metal node on devices over SSH, from INSTALLER (the TARGET-installer
    directory of `imagefactory bake --format installer`, or its install.sh).

    For each device: check its host key, upload install.sh with SFTP (the token goes in
    a separate 0600 file, never on a command line), run it as root (directly, or with
    `sudo -n`), stream its output prefixed with the device, remove the upload, then wait
    for the agent. Devices run in parallel; one that fails does not stop the others, and
    the summary says which failed and why (exit 1). Running it again with the same
    inputs changes nothing on a device. --uninstall removes the package, its unit, user
    and node.env (--purge: the agent's state as well).
    """
    from imagefactory.install.destination import parse_destination
    from imagefactory.install.hostkeys import HostKeyPolicy, check_fingerprint

    script = find_script(installer)
    dests = [parse_destination(d) for d in destinations]
    if len(set(dests)) != len(dests):
        raise die("the same --ssh device is given twice")
    try:
        trusted = frozenset(check_fingerprint(f) for f in fingerprints)
    except ValueError as exc:
        raise die(str(exc)) from None
    policy = HostKeyPolicy(known_hosts.expanduser(), trusted, accept_new_host_key)
    if purge and not uninstall:
        raise die("--purge goes with --uninstall")
    if master_ca is not None:  # --wait checks the master with the devices' CA too
        from imagefactory.client import CA_ENV

        os.environ.setdefault(CA_ENV, str(master_ca))
    given = NodeInputs(
        node_id, master, secret_file, token, run_id, env_pairs, on_complete, master_ca, insecure
    )
    jobs = (
        [Job(d, None, ("--uninstall", "--purge") if purge else ("--uninstall",)) for d in dests]
        if uninstall
        else node_jobs(dests, given)
    )
    if admin_token_file is not None and (admin_url or master) is None:
        raise die("--admin-token-file needs --admin-url (or --master)")
    with tempfile.TemporaryDirectory(prefix="imagefactory-install-") as tmp:
        after = None if uninstall else waiter(
            wait, timeout_s, admin_url or master, admin_token_file, Path(tmp), insecure
        )  # fmt: skip
        fleet = Fleet(script, policy, identity_file, progress, after)
        outcomes = fleet.run(jobs)
    report(outcomes, as_json)


@dataclass(frozen=True)
class NodeInputs:
    """The node options of `install`, as given (checked by `node_jobs`)."""

    node_id: str | None
    master: str | None
    secret_file: Path | None
    token: str | None
    run_id: str | None
    env_pairs: tuple[str, ...]
    on_complete: str
    master_ca_file: Path | None
    insecure: bool


def node_jobs(dests: list[Destination], given: NodeInputs) -> list[Job]:
    """One job per device, every value checked here (as the seed checks them) before any
    device is touched; install.sh gets the node.env the seed would write."""
    from imagefactory import pki
    from imagefactory.boot import nodeenv, seed
    from imagefactory.boot.launch import node_ids
    from imagefactory.tokens import node_token, read_secret

    if given.node_id is None or given.master is None:
        raise die("--node-id and --master are required (or give --uninstall)")
    if (given.token is None) == (given.secret_file is None):
        raise die("give one of --token or --secret-file")
    if given.token is not None and len(dests) > 1:
        raise die("a --token belongs to one node", hint="with several --ssh, give --secret-file")
    secret = read_secret(given.secret_file) if given.secret_file is not None else None
    master_ca = None
    if given.master_ca_file is not None:
        try:
            master_ca = pki.check_bundle(given.master_ca_file.read_bytes(), "--master-ca")
        except OSError as exc:
            raise die(f"cannot read --master-ca {given.master_ca_file}: {exc.strerror}") from None
        except pki.PkiError as exc:
            raise die(f"--master-ca: {exc}") from None
    env = tuple(nodeenv.parse_assignment(p) for p in given.env_pairs)
    ids = node_ids(seed.check_node_id(given.node_id), len(dests))
    jobs = []
    for i, (dest, nid) in enumerate(zip(dests, ids, strict=True)):
        rid = given.run_id if len(dests) == 1 or given.run_id is None else f"{given.run_id}-{i + 1}"
        if rid is not None:
            seed.check_node_id(rid)
        token = given.token if secret is None else node_token(secret, nid)
        node = seed.NodeVars(
            nid, rid, given.master, token, given.on_complete, env,
            master_ca=None if master_ca is None else master_ca.decode("ascii"),
            insecure=given.insecure,
        )  # fmt: skip
        jobs.append(node_job(dest, node.env()))
    return jobs


def report(outcomes: list[Outcome], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([o.summary() for o in outcomes], indent=2))
    failed = [o for o in outcomes if o.status == "failed"]
    progress(f"==> {len(outcomes) - len(failed)} of {len(outcomes)} device(s) done")
    for line in summary_lines(outcomes):
        progress(line)
    if failed:
        names = ", ".join(str(o.dest) for o in failed)
        raise InstallFailed(f"failed on {len(failed)} of {len(outcomes)} device(s): {names}")
