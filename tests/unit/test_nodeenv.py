"""node.env rendering: escaping that sh reads back exactly, and clear refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import click
import pytest

from imagefactory.boot import nodeenv

HOSTILE = [
    "plain",
    "",
    "with spaces  and  tabs\t!",
    "double \"quotes\" and 'single'",
    "a=b=c",
    "$HOME ${PATH} $(id) $1",
    "`uname -a`",
    "back\\slash \\n \\\\ trailing\\",
    "ünïcødé ✓ 日本 😀",
    " leading and trailing ",
    "#not a comment",
    "semi;colon & amp | pipe > redirect",
]


def sh_read(path: Path, key: str) -> str:
    """What `sh` sees after sourcing the file."""
    script = f'. "{path}"; printf %s "${key}"'
    return subprocess.run(
        ["sh", "-c", script], check=True, capture_output=True, text=True, encoding="utf-8"
    ).stdout


@pytest.mark.parametrize("value", HOSTILE)
def test_values_round_trip_through_sh(tmp_path: Path, value: str) -> None:
    env = tmp_path / "node.env"
    env.write_text(nodeenv.render([("V", value), ("AFTER", "still here")]), encoding="utf-8")
    assert sh_read(env, "V") == value
    assert sh_read(env, "AFTER") == "still here"


def test_one_quoted_line_per_variable() -> None:
    text = nodeenv.render([("A", "1"), ("B", 'x"$`\\')])
    assert text == 'A="1"\nB="x\\"\\$\\`\\\\"\n'


@pytest.mark.parametrize("value", ["two\nlines", "cr\rhere", "nul\0byte"])
def test_line_breaks_and_nul_are_refused(value: str) -> None:
    with pytest.raises(click.ClickException, match="the value of BAD contains"):
        nodeenv.render([("BAD", value)])


@pytest.mark.parametrize("key", ["", "1ABC", "A-B", "A B", "Ä", "A=B"])
def test_invalid_names_are_refused(key: str) -> None:
    with pytest.raises(click.ClickException, match="invalid variable name"):
        nodeenv.render([(key, "v")])


def test_assignment_splits_at_the_first_equals() -> None:
    assert nodeenv.parse_assignment("K=a=b") == ("K", "a=b")
    assert nodeenv.parse_assignment("K=") == ("K", "")


def test_assignment_without_equals_is_refused() -> None:
    with pytest.raises(click.ClickException, match="not of the form KEY=VALUE"):
        nodeenv.parse_assignment("JUSTAKEY")
