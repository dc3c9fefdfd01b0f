"""`imagefactory environments list|pull|prune`: the environment store of the core services."""

from __future__ import annotations

import re
from pathlib import Path

import click

from imagefactory.cli.services import admin_client, admin_options, json_option, print_json
from imagefactory.cli.services import print_table as table
from imagefactory.deploy.pull import environment, pull

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def check_digest(_ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not DIGEST.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not a digest like sha256:<64 hex>", param=param)
    return value


@click.group("environments")
def environments_group() -> None:
    """Environments the builders made: list, download (verified), prune the store."""


@environments_group.command("list")
@admin_options
@json_option
def list_command(url: str, admin_token_file: Path, as_json: bool) -> None:
    """List stored environments: target, format, pipeline, build, digest, size, time."""
    with admin_client(url, admin_token_file) as client:
        rows = client.get_json("/v1/environments")
    if as_json:
        print_json(rows)
        return
    columns = ["digest", "name", "target", "format", "pipeline", "size", "build_id"]
    table(rows, [*columns, "created_at"])


@environments_group.command("pull")
@click.argument("digest", callback=check_digest)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory the file goes to (under its name, e.g. x86_64-linux.qcow2).",
)
@admin_options
@json_option
def pull_command(
    digest: str, output: Path, url: str, admin_token_file: Path, as_json: bool
) -> None:
    """Download the environment DIGEST into OUTPUT and verify its sha256.

    An interrupted pull resumes where it stopped (the part is kept as
    OUTPUT/.DIGEST.part); the file appears under its name only once verified, and a
    verified file already there is not downloaded again. Progress goes to stderr.
    """
    with admin_client(url, admin_token_file) as client:
        env = environment(client, digest)
        final = pull(client, digest, output, progress, env)
    if as_json:
        print_json({"path": str(final), "digest": digest, "size": env["size"]})
    else:
        click.echo(str(final))


def progress(message: str) -> None:
    click.echo(message, err=True)


@environments_group.command("prune")
@admin_options
@json_option
def prune_command(url: str, admin_token_file: Path, as_json: bool) -> None:
    """Remove stored blobs nothing references (failed builds' uploads, old pipelines)."""
    with admin_client(url, admin_token_file) as client:
        done = client.post_json("/v1/environments/prune")
    if as_json:
        print_json(done)
    else:
        click.echo(f"removed {len(done['removed'])} blobs, {done['freed_bytes']} bytes freed")
