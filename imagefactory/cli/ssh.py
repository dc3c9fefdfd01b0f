"""`imagefactory ssh NODE -- CMD`: run a command on a booted node."""

from __future__ import annotations

import shlex
import sys

import click

from imagefactory.boot import nodestate, ssh


@click.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("node_id")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=120.0,
    show_default=True,
    help="Seconds to keep retrying while the node's sshd comes up.",
)
@click.option("--print-command", is_flag=True, help="Print the equivalent `ssh` command line.")
def ssh_command(node_id: str, command: tuple[str, ...], wait_s: float, print_command: bool) -> None:
    """Run COMMAND on NODE_ID (booted with --keep or --wait none) over SSH as `ops`.

    The node's SSH port and per-boot key come from its state directory
    (~/.local/state/imagefactory/nodes/NODE_ID/node.json). The exit status is the
    remote command's.
    """
    record = nodestate.load(node_id)
    if print_command:
        click.echo(shlex.join(ssh.openssh_command(record)))
        return
    if not command:
        raise click.UsageError("give a command after --, e.g. imagefactory ssh n-1 -- uname -a")
    client = ssh.connect(record, wait_s=wait_s)
    try:
        # Like OpenSSH: the words are joined with spaces and run by the remote shell.
        result = ssh.execute(client, " ".join(command))
    finally:
        client.close()
    sys.stdout.buffer.write(result.stdout)
    sys.stderr.buffer.write(result.stderr)
    sys.exit(result.status)
