"""`imagefactory builder`: a build worker for the core services' build queue."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import click

from imagefactory.cli.services import check_ident, client_tls, tls_choice, tls_options
from imagefactory.errors import die
from imagefactory.paths import state_root
from imagefactory.stages import BAKE_STOP_S
from imagefactory.tokens import read_secret


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@click.command("builder")
@click.option("--master", required=True, envvar="IMAGEFACTORY_URL", help="Core services URL.")
@tls_options
@click.option(
    "--builder-id", required=True, callback=check_ident, help="This builder's id (its token's)."
)
@click.option(
    "--token-file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the builder token (`imagefactory token --builder ID`).",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=state_root() / "builder",
    show_default=True,
    help="Where bakes run; each build's directory is removed once it is reported.",
)
@click.option(
    "--grace-seconds",
    type=click.FloatRange(min=0, max=3600),
    default=BAKE_STOP_S,
    show_default=True,
    help="After a cancel, how long the bake may clean up before it is killed: longer "
    "than the bake's own wait for Packer or mmdebstrap to stop (up to 40 s).",
)
def builder_command(
    master: str, builder_id: str, token_file: Path, work_dir: Path, grace_seconds: float
) -> None:
    """Build environments for the core services until stopped (Ctrl-C or SIGTERM).

    Registers the targets and formats this host can build (the checks of `imagefactory
    doctor`), claims queued builds it can make (long
    polling), runs each as `imagefactory bake` in a child process while renewing its
    lease, and uploads the result (resumably; the master verifies its sha256). OCI builds
    are pushed with skopeo to the registry the master names. Progress goes to stderr.
    A stopped builder's build goes back to the queue when its lease expires.
    """
    from imagefactory.builder.capabilities import buildable_formats, buildable_targets
    from imagefactory.builder.master import MasterClient, Refused
    from imagefactory.builder.worker import BuilderConfig, Worker
    from imagefactory.cli.bake import FORMATS

    token = read_secret(token_file)
    targets, formats = buildable_targets(), buildable_formats(list(FORMATS))
    if not targets or not formats:
        click.echo("warning: this host can build nothing (see `imagefactory doctor`)", err=True)
    work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_file, insecure = tls_choice()
    config = BuilderConfig(
        builder_id,
        work_dir.resolve(),
        targets,
        formats,
        grace_seconds,
        ca_file=ca_file,
        insecure=insecure,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    client = MasterClient(master, builder_id, token, client_tls(master))
    try:
        Worker(config, client).run_forever()
    except Refused as exc:
        raise die(f"the master refused this builder: {exc}", hint="check --token-file") from None
    finally:
        client.close()
