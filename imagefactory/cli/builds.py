"""`imagefactory builds submit|list|show|logs|cancel`: the build queue of the core services."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from imagefactory.cli.services import admin_client, admin_options, json_option, print_json
from imagefactory.cli.services import print_table as table
from imagefactory.client import AdminClient
from imagefactory.deploy import environment

STATES = ("queued", "building", *environment.TERMINAL)


def check_build_id(_ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{32}", value):
        raise click.BadParameter(f"{value!r} is not a build id (32 hex digits)", param=param)
    return value


build_id_argument = click.argument("build_id", callback=check_build_id)


@click.group("builds")
def builds_group() -> None:
    """Queue builds on the core services, and follow them (builders bake them)."""


@builds_group.command("submit")
@click.option("--target", "-t", required=True, help="Target, e.g. x86_64-linux.")
@click.option("--format", "image_format", default="qcow2", show_default=True, help="Format.")
@click.option(
    "--pipeline", "-p", required=True, help="Gateway pipeline name, or NAME@sha256:HEX to pin it."
)
@click.option("--follow", is_flag=True, help="Show stage progress until the build ends.")
@admin_options
@json_option
def submit_command(
    target: str,
    image_format: str,
    pipeline: str,
    follow: bool,
    url: str,
    admin_token_file: Path,
    as_json: bool,
) -> None:
    """Queue a build of PIPELINE (published with `imagefactory publish`) for TARGET.

    The same target, format and pipeline content give back the build already queued,
    running or done: nothing is built twice. Prints the build id.
    """
    body = {"target": target, "format": image_format, "pipeline": pipeline}
    with admin_client(url, admin_token_file) as client:
        build = client.post_json("/v1/builds", body)
        if not as_json:
            click.echo(build["build_id"])
            click.echo(f"build {build['build_id']}: {build['state']}", err=True)
        if follow:
            build = follow_build(client, build)
    if as_json:
        print_json(build)
    if follow:
        exit_for(build)


@builds_group.command("list")
@click.option("--state", type=click.Choice(STATES), help="Only builds in this state.")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@admin_options
@json_option
def list_command(
    state: str | None, limit: int, url: str, admin_token_file: Path, as_json: bool
) -> None:
    """List builds, newest first."""
    with admin_client(url, admin_token_file) as client:
        rows = client.get_json("/v1/builds", state=state, limit=limit)
    if as_json:
        print_json(rows)
        return
    columns = ["build_id", "target", "format", "pipeline", "state", "builder_id", "attempt"]
    table([{**r, "state": _state_text(r)} for r in rows], [*columns, "created_at"])


@builds_group.command("show")
@build_id_argument
@click.option("--follow", is_flag=True, help="Show stage progress until the build ends.")
@admin_options
@json_option
def show_command(
    build_id: str, follow: bool, url: str, admin_token_file: Path, as_json: bool
) -> None:
    """Show a build: state, builder and attempt, stages and their times, artifacts.
    With --follow, exit status 1 if the build did not succeed."""
    with admin_client(url, admin_token_file) as client:
        build = client.get_json(f"/v1/builds/{build_id}")
        if follow:
            build = follow_build(client, build, quiet=as_json)
    if as_json:
        print_json(build)
    else:
        describe(build)
    if follow:
        exit_for(build)


@builds_group.command("logs")
@build_id_argument
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the build ends.")
@admin_options
def logs_command(build_id: str, follow: bool, url: str, admin_token_file: Path) -> None:
    """Print the build log (the bake's output, as its builder sent it)."""
    with admin_client(url, admin_token_file) as client:
        for line in client.stream_lines(f"/v1/builds/{build_id}/log", follow=follow):
            click.echo(line)


@builds_group.command("cancel")
@build_id_argument
@admin_options
@json_option
def cancel_command(build_id: str, url: str, admin_token_file: Path, as_json: bool) -> None:
    """Cancel a build: a queued one at once, a running one once its builder has
    interrupted the bake."""
    with admin_client(url, admin_token_file) as client:
        build = client.post_json(f"/v1/builds/{build_id}/cancel")
    if as_json:
        print_json(build)
    else:
        click.echo(f"build {build_id}: {_state_text(build)}")


def follow_build(client: AdminClient, build: dict[str, Any], quiet: bool = False) -> dict[str, Any]:
    """Poll the build until it ends, printing each stage as it starts and ends (stderr)."""
    return environment.follow_build(client, build, None if quiet else progress)


def progress(message: str) -> None:
    click.echo(message, err=True)


def describe(build: dict[str, Any]) -> None:
    click.echo(
        f"build {build['build_id']}  {build['target']}  {build['format']}  "
        f"pipeline {build['pipeline']} (sha256 {build['pipeline_sha256'][:12]})"
    )
    click.echo(f"state {_state_text(build)}  builder {build['builder_id'] or '-'}  "
               f"attempt {build['attempt']}  stage {build['stage'] or '-'}")  # fmt: skip
    click.echo(f"created {build['created_at']}  started {build['started_at'] or '-'}  "
               f"finished {build['finished_at'] or '-'}")  # fmt: skip
    if build["stages"]:
        table(
            [{"stage": k, "seconds": v} for k, v in build["stages"].items()], ["stage", "seconds"]
        )
    if build["artifacts"]:
        table(build["artifacts"], ["name", "digest", "size"])
    if build["pushed"]:
        click.echo(f"pushed {build['pushed']['reference']}@{build['pushed']['digest']}")
    if build["error"]:
        click.echo(f"error: {build['error']}")


def exit_for(build: dict[str, Any]) -> None:
    if build["state"] != "succeeded":
        raise click.exceptions.Exit(1)


def _state_text(build: dict[str, Any]) -> str:
    cancelling = build["state"] == "building" and build["cancel_requested"]
    return "cancelling" if cancelling else str(build["state"])
