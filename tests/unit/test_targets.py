from __future__ import annotations

import click
import pytest

from imagefactory.targets import TARGETS, get_target, target_names


def test_names_are_unique_and_follow_arch_os() -> None:
    names = target_names()
    assert len(names) == len(set(names))
    for t in TARGETS:
        assert t.name == f"{t.arch}-linux"


def test_lookup_returns_the_row() -> None:
    t = get_target("aarch64-linux")
    assert (t.debian_arch, t.qemu_binary, t.firmware) == ("arm64", "qemu-system-aarch64", "uefi")


def test_unknown_target_lists_valid_ones() -> None:
    with pytest.raises(click.ClickException) as info:
        get_target("sparc-linux")
    message = info.value.format_message()
    assert "sparc-linux" in message
    for name in target_names():
        assert name in message
