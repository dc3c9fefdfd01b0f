"""The `imagefactory` command line.

Subcommands live in their own modules and are imported only when used, so that
`imagefactory --help` and each command start fast and stay independent. To add a
command, add a row to COMMANDS.
"""

from __future__ import annotations

import importlib
import logging

import click

from imagefactory import __version__

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
    "bake": "imagefactory.cli.bake:bake_command",
    "render": "imagefactory.cli.bake:render_command",
    "targets": "imagefactory.cli.host:targets_command",
    "doctor": "imagefactory.cli.host:doctor_command",
    "cache": "imagefactory.cli.host:cache_group",
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


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="imagefactory")
@click.option("--debug", is_flag=True, help="Log every command run and show tracebacks.")
def main(debug: bool) -> None:
    """Bake VM images that run a Python pipeline, boot them as fleet nodes, and
    serve the core services the nodes report to."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
