"""`imagefactory environments list|pull|prune`: the environment store of the core services."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import click

from imagefactory.cli.services import admin_client, admin_options, json_option, print_json
from imagefactory.cli.services import print_table as table
from imagefactory.client import AdminClient
from imagefactory.errors import die

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
CHUNK = 1024 * 1024


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
    OUTPUT/.DIGEST.part); the file appears under its name only once verified.
    """
    with admin_client(url, admin_token_file) as client:
        env = _find(client, digest)
        name = Path(env["name"]).name
        output.mkdir(parents=True, exist_ok=True)
        part = output / f".{digest.removeprefix('sha256:')}.part"
        actual = _download(client, digest, part)
    if actual != digest:
        part.unlink()
        raise die(f"downloaded data has digest {actual}, not {digest}; removed it")
    final = output / name
    os.replace(part, final)
    if as_json:
        print_json({"path": str(final), "digest": digest, "size": env["size"]})
    else:
        click.echo(str(final))


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


def _find(client: AdminClient, digest: str) -> dict[str, Any]:
    for env in client.get_json("/v1/environments"):
        if env["digest"] == digest:
            return dict(env)
    raise die(f"no environment {digest}", hint="see `imagefactory environments list`")


def _download(client: AdminClient, digest: str, part: Path) -> str:
    """Append to `part` from its size (Range, If-Range: the digest), or start over if the
    master sends the whole file; returns the sha256 digest of the whole part, hashed
    while it is written (a kept part is hashed first)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-", "If-Range": f'"{digest}"'} if have else {}
    with client.stream(f"/v1/environments/{digest}", headers) as response:
        if response.status_code == 416:  # the part is already whole (or longer): redo
            part.unlink()
            return _download(client, digest, part)
        client.check(response)
        resumed = response.status_code == 206
        total = int(response.headers.get("content-length", 0)) + (have if resumed else 0)
        if resumed:
            click.echo(f"resuming at {have} of {total} bytes", err=True)
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "r+b") as out:
            sha = hashlib.file_digest(out, "sha256") if resumed else hashlib.sha256()
            out.seek(have if resumed else 0)
            out.truncate()
            for chunk in response.iter_bytes(CHUNK):
                out.write(chunk)
                sha.update(chunk)
            out.flush()
            os.fsync(out.fileno())
    return "sha256:" + sha.hexdigest()
