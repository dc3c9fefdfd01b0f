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
    "seed": "imagefactory.cmd_seed:seed_command",
    "boot": "imagefactory.cmd_boot:boot_command",
    "stop": "imagefactory.cmd_boot:stop_command",
    "ssh": "imagefactory.cmd_ssh:ssh_command",
    "serve": "imagefactory.cmd_services:serve",
    "token": "imagefactory.cmd_services:token",
    "nodes": "imagefactory.cmd_services:nodes",
    "runs": "imagefactory.cmd_services:runs",
    "report": "imagefactory.cmd_services:report",
    "logs": "imagefactory.cmd_services:logs",
    "publish": "imagefactory.cmd_services:publish",
    "bake": "imagefactory.cmd_bake:bake_command",
    "render": "imagefactory.cmd_bake:render_command",
    "targets": "imagefactory.cmd_host:targets_command",
    "doctor": "imagefactory.cmd_host:doctor_command",
    "cache": "imagefactory.cmd_host:cache_group",
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
