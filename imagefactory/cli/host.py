"""`imagefactory targets`, `imagefactory doctor` and `imagefactory cache`: the host side."""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict
from typing import Any

import click

from imagefactory.targets import TARGETS


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def target_rows() -> list[dict[str, Any]]:
    from imagefactory.host.accel import pick_accelerator
    from imagefactory.host.doctor import BUILD_TOOLS, problems, target_checks, tool_check

    tools_ok = not problems([tool_check(p, pkg) for p, pkg in BUILD_TOOLS])
    rows = []
    for t in TARGETS:
        checks = {c.name: c for c in target_checks(t)}
        boot = checks[t.qemu_binary].ok and checks[f"uefi {t.arch}"].ok
        build = boot and tools_ok and checks[f"binfmt {t.arch}"].ok
        rows.append(
            {
                "name": t.name,
                "arch": t.arch,
                "debian_arch": t.debian_arch,
                "machine": t.machine,
                "firmware": t.firmware,
                "console": t.console,
                "can_build": build,
                "can_boot": boot,
                "accelerator": pick_accelerator(t),
            }
        )
    return rows


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def targets_command(as_json: bool) -> None:
    """List the build targets, and whether this host can build and boot each (and with
    which accelerator: KVM only if a test guest really boots with it, else TCG)."""
    rows = target_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    yes = {True: "yes", False: "no"}
    header = [
        "TARGET",
        "ARCH",
        "DEBIAN",
        "MACHINE",
        "FIRMWARE",
        "CONSOLE",
        "BUILD",
        "BOOT",
        "ACCEL",
    ]
    body = [
        [
            r["name"],
            r["arch"],
            r["debian_arch"],
            r["machine"],
            r["firmware"],
            r["console"],
            yes[r["can_build"]],
            yes[r["can_boot"]],
            r["accelerator"],
        ]
        for r in rows
    ]
    click.echo(_table([header, *body]))


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor_command(as_json: bool) -> None:
    """Check the host: Packer, QEMU per target, qemu-img, UEFI firmware (from QEMU's
    firmware descriptors), mmdebstrap, binfmt_misc for foreign architectures, xorriso,
    disk tools, and whether KVM really works. Names the package to install for each
    problem; exits 1 if anything required is missing."""
    from imagefactory.host.doctor import checks, problems

    found = checks()
    if as_json:
        click.echo(json.dumps([asdict(c) for c in found], indent=2))
    else:
        rows = [["CHECK", "STATUS", "DETAIL"]]
        for c in found:
            status = "ok" if c.ok else ("MISSING" if c.required else "no")
            detail = c.detail if c.ok or not c.package else f"{c.detail}; apt install {c.package}"
            rows.append([c.name, status, detail])
        click.echo(_table(rows))
    missing = problems(found)
    if missing:
        packages = sorted({c.package for c in missing if c.package})
        click.echo(
            f"\n{len(missing)} problem(s); fix with: apt install {' '.join(packages)}", err=True
        )
        raise SystemExit(1)


@click.group("cache")
def cache_group() -> None:
    """Manage the cache of base images (content-addressed by their inputs)."""


def _caches() -> list[tuple[str, Any]]:
    """(kind, cache): the VM bases and the container bases (bake/ocibase.py)."""
    from imagefactory.bake.cache import BaseCache
    from imagefactory.bake.ocibase import oci_cache

    return [("vm", BaseCache()), ("oci", oci_cache(None))]


@cache_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def cache_list(as_json: bool) -> None:
    """List cached base images (VM and container), most recently used first."""
    caches = _caches()
    entries = sorted(
        ((kind, e) for kind, cache in caches for e in cache.entries()),
        key=lambda pair: pair[1].mtime,
        reverse=True,
    )
    if as_json:
        click.echo(json.dumps([_entry_json(e) | {"kind": k} for k, e in entries], indent=2))
        return
    if not entries:
        click.echo(f"no cached base images in {caches[0][1].dir.parent}")
        return
    rows = [["KEY", "ARCH", "SUITE", "SIZE", "LAST USED", "KIND"]]
    for kind, e in entries:
        used = datetime.datetime.fromtimestamp(e.mtime).strftime("%Y-%m-%d %H:%M")
        rows.append(
            [
                e.key[:12],
                str(e.inputs.get("arch", "?")),
                str(e.inputs.get("suite", "?")),
                f"{e.size / 1e6:.0f} MB",
                used,
                kind,
            ]
        )
    click.echo(_table(rows))


def _entry_json(e: Any) -> dict[str, Any]:
    return {
        "key": e.key,
        "path": str(e.path),
        "arch": e.inputs.get("arch"),
        "suite": e.inputs.get("suite"),
        "size": e.size,
        "last_used": e.mtime,
    }


@cache_group.command("prune")
@click.option("--keep", type=click.IntRange(min=0), help="Keep this many most recently used.")
@click.option(
    "--older-than",
    "older_than_days",
    type=click.FloatRange(min=0),
    help="Remove entries unused for more than this many days.",
)
def cache_prune(keep: int | None, older_than_days: float | None) -> None:
    """Remove cached base images (all of them unless --keep or --older-than is given);
    --keep counts the VM and the container bases separately."""
    older = older_than_days * 86400 if older_than_days is not None else None
    removed = [e for _, cache in _caches() for e in cache.prune(keep=keep, older_than_s=older)]
    for e in removed:
        click.echo(f"removed {e.key[:12]} ({e.size / 1e6:.0f} MB)")
    click.echo(f"{len(removed)} entr{'y' if len(removed) == 1 else 'ies'} removed")
