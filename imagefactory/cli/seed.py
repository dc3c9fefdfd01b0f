"""`imagefactory seed`: write one node's NoCloud seed ISO."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from imagefactory.boot import seed
from imagefactory.cli.node_options import collect, node_options


@click.command("seed")
@node_options("EXECUTOR_MASTER_URL exactly as the GUEST must use it.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the seed ISO.",
)
def seed_command(output: Path, **kwargs: Any) -> None:
    """Write a cloud-init NoCloud seed ISO (label `cidata`) for one node.

    The seed writes /etc/executor/node.env (mode 0600) with the EXECUTOR_* variables,
    sets the host name and a fresh instance-id, and authorizes --ssh-key for `ops`.
    Attach it as a CD-ROM to any hypervisor. `imagefactory boot` makes its own seeds.
    """
    node = collect(kwargs)
    made = seed.render_seed(node.node_vars(node.node_id, node.run_id, node.master))
    seed.write_iso(made, output)
    click.echo(f"{output}: node {node.node_id}, instance-id {made.instance_id}")
