"""The `imagefactory` command line.

Subcommands live in their own modules and are imported only when used, so that
`imagefactory --help` and each command start fast and stay independent. To add a
command, add a row to COMMANDS.

The group is also the error boundary of every command: a failed command line or an OS
error that no step handled stops with one `Error: ...` line (exit 4), Ctrl-C with
`Aborted!` (exit 130); the traceback only with --debug. Exit codes: imagefactory.errors.
"""

from __future__ import annotations

import errno
import importlib
import logging
import traceback
from typing import Any

import click

from imagefactory import __version__
from imagefactory.errors import EXIT_INTERRUPTED, HostError
from imagefactory.run import CommandError

# name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "seed": "imagefactory.cli.seed:seed_command",
    "boot": "imagefactory.cli.boot:boot_command",
    "stop": "imagefactory.cli.boot:stop_command",
    "ssh": "imagefactory.cli.ssh:ssh_command",
    "serve": "imagefactory.cli.services:serve",
    "token": "imagefactory.cli.services:token",
    "nodes": "imagefactory.cli.services:nodes",
    "runs": "imagefactory.cli.services:runs",
    "report": "imagefactory.cli.services:report",
    "logs": "imagefactory.cli.services:logs",
    "publish": "imagefactory.cli.services:publish",
    "builds": "imagefactory.cli.builds:builds_group",
    "builder": "imagefactory.cli.builder:builder_command",
    "environments": "imagefactory.cli.environments:environments_group",
    "devices": "imagefactory.cli.devices:devices_group",
    "bake": "imagefactory.cli.bake:bake_command",
    "render": "imagefactory.cli.bake:render_command",
    "targets": "imagefactory.cli.host:targets_command",
    "doctor": "imagefactory.cli.host:doctor_command",
    "cache": "imagefactory.cli.host:cache_group",
    "install": "imagefactory.cli.install:install_command",
    "deploy": "imagefactory.cli.deploy:deploy_command",
    "undeploy": "imagefactory.cli.deploy:undeploy_command",
    "ca": "imagefactory.cli.ca:ca_group",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS:
            module_name, attr = COMMANDS[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _traceback_if_debug(ctx)
            click.echo("\nAborted!", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except (CommandError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # click ends quietly when stdout is closed early (`| head`)
            _traceback_if_debug(ctx)
            raise HostError.of(exc) from exc


def _traceback_if_debug(ctx: click.Context) -> None:
    if ctx.params.get("debug"):
        traceback.print_exc()


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit status: 0 success; 1 the work failed (a node or its run, a doctor check); "
    "2 usage or user error; 4 a command or file operation on the host failed; 130 "
    "interrupted. `ssh` exits with the remote command's status.",
)
@click.version_option(__version__, prog_name="imagefactory")
@click.option(
    "--debug",
    is_flag=True,
    help="Log every command line run, and print the traceback of a failed command, an OS "
    "error or Ctrl-C (other errors stay one line).",
)
def main(debug: bool) -> None:
    """Bake VM images that run a Python pipeline, boot them as fleet nodes, and
    serve the core services the nodes report to."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
