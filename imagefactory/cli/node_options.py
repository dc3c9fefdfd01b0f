"""The options that describe a node, shared by `imagefactory seed` and `imagefactory boot`.

They arrive in a command as keyword arguments; `collect` turns them into one frozen
`NodeOptions`, checked, and `NodeOptions.node_vars` into each node's variables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from imagefactory import pki
from imagefactory.boot import nodeenv, seed
from imagefactory.errors import die
from imagefactory.tokens import node_token, read_secret

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class NodeOptions:
    """The node options as given on the command line, before per-node expansion."""

    node_id: str
    run_id: str | None
    master: str | None
    token: str | None
    secret_file: Path | None
    env: tuple[tuple[str, str], ...]
    ssh_keys: tuple[str, ...]
    on_complete: str
    master_ca_file: Path | None
    """--master-ca: the fleet CA's bundle.crt, for the node and for the host-side checks."""
    master_ca: str | None
    """Its certificates, checked, as the node gets them."""

    def token_for(self, node_id: str) -> str | None:
        """The node's token: given as is, or derived from the secret file (HMAC)."""
        if self.secret_file is None:
            return self.token
        return node_token(read_secret(self.secret_file), node_id)

    def node_vars(
        self, node_id: str, run_id: str | None, master_url: str | None, local_link: bool = False
    ) -> seed.NodeVars:
        """The frozen variables of one node. `local_link`: the node reaches `master_url`
        through a forward that stays on this host, so plain http:// is no exposure."""
        return seed.NodeVars(
            node_id=seed.check_node_id(node_id),
            run_id=run_id,
            master_url=master_url,
            token=self.token_for(node_id),
            on_complete=self.on_complete,
            extra_env=self.env,
            ssh_keys=self.ssh_keys,
            master_ca=self.master_ca,
            insecure=local_link and (master_url or "").startswith("http://"),
        )


def node_options(master_help: str) -> Callable[[F], F]:
    """The options shared by `seed` and `boot`; they arrive as one `node` argument."""

    def decorate(func: F) -> F:
        options = [
            click.option("--node-id", required=True, help="The node's ID (EXECUTOR_NODE_ID)."),
            click.option("--run-id", help="EXECUTOR_RUN_ID; default: generated per node."),
            click.option("--master", metavar="URL", help=master_help),
            click.option(
                "--master-ca",
                "master_ca_file",
                type=click.Path(dir_okay=False, path_type=Path),
                help="The fleet CA's bundle.crt (`imagefactory ca init`): the node verifies "
                "the https:// master against it (EXECUTOR_MASTER_CA).",
            ),
            click.option("--token", help="The node's bearer token (EXECUTOR_TOKEN)."),
            click.option(
                "--secret-file",
                type=click.Path(dir_okay=False, path_type=Path),
                help="Derive each node's token from this secret (as the server does).",
            ),
            click.option(
                "--env",
                "env_pairs",
                multiple=True,
                metavar="K=V",
                help="Extra node.env variable; repeatable. Newlines are refused.",
            ),
            click.option(
                "--ssh-key",
                "ssh_key_files",
                multiple=True,
                type=click.Path(dir_okay=False, path_type=Path),
                help="Public key file authorized for the `ops` user; repeatable.",
            ),
            click.option(
                "--on-complete",
                type=click.Choice(seed.ON_COMPLETE),
                default="poweroff",
                show_default=True,
                help="What the agent does once its report is delivered.",
            ),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def collect(kwargs: dict[str, Any]) -> NodeOptions:
    """Pop the shared node options out of a command's keyword arguments, validated."""
    token, secret_file = kwargs.pop("token"), kwargs.pop("secret_file")
    if token is not None and secret_file is not None:
        raise die("give either --token or --secret-file, not both")
    keys = tuple(seed.read_ssh_key(p) for p in kwargs.pop("ssh_key_files"))
    master_ca_file = kwargs.pop("master_ca_file")
    return NodeOptions(
        node_id=seed.check_node_id(kwargs.pop("node_id")),
        run_id=kwargs.pop("run_id"),
        master=kwargs.pop("master"),
        token=token,
        secret_file=secret_file,
        env=tuple(nodeenv.parse_assignment(p) for p in kwargs.pop("env_pairs")),
        ssh_keys=keys,
        on_complete=kwargs.pop("on_complete"),
        master_ca_file=master_ca_file,
        master_ca=None if master_ca_file is None else _read_ca(master_ca_file),
    )


def _read_ca(path: Path) -> str:
    try:
        return pki.check_bundle(path.read_bytes(), str(path)).decode("ascii")
    except OSError as exc:
        raise die(f"cannot read --master-ca {path}: {exc.strerror}") from None
    except (pki.PkiError, UnicodeDecodeError) as exc:
        raise die(f"--master-ca: {exc}") from None
