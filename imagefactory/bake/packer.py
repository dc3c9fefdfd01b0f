"""Run Packer: its version, the argv and environment of `validate`/`build`, and the
stages read off its output as it streams.
"""

from __future__ import annotations

import re
from pathlib import Path

from imagefactory.errors import die
from imagefactory.run import CommandError, run
from imagefactory.stages import TAIL_LINES, Stages, follow

# Packer output line (substring) -> the stage that starts there.
STAGE_MARKERS = (
    ("Starting VM", "boot", "booting the build VM (cloud-init, then SSH)"),
    ("Connected to SSH", "provision", "installing the executor and the pipeline"),
    ("Gracefully halting", "seal", "sealing and powering off"),
)


def packer_env(build_dir: Path) -> dict[str, str]:
    """No phoning home; the detailed log and Packer's cache stay in the build directory."""
    return {
        "CHECKPOINT_DISABLE": "1",
        "PACKER_LOG": "1",
        "PACKER_LOG_PATH": str(build_dir / "packer-debug.log"),
        "PACKER_CACHE_DIR": str(build_dir / "packer_cache"),
    }


def build_argv(hcl_dir: Path) -> list[str]:
    return ["packer", "build", "-color=false", "-on-error=cleanup", str(hcl_dir)]


def validate_argv(hcl_dir: Path) -> list[str]:
    return ["packer", "validate", str(hcl_dir)]


def parse_version(text: str) -> tuple[int, ...]:
    """`Packer v1.6.6` or `1.10.0` -> (1, 6, 6)."""
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"no version in {text!r}")
    return tuple(int(part) for part in match.groups())


def packer_version() -> tuple[int, ...]:
    out = run(["packer", "version"], env={"CHECKPOINT_DISABLE": "1"}).stdout
    return parse_version(out.splitlines()[0] if out else "")


def validate(hcl_dir: Path) -> None:
    run(validate_argv(hcl_dir), env=packer_env(hcl_dir.parent), cwd=hcl_dir)


def build(hcl_dir: Path, log_path: Path, stages: Stages) -> None:
    """`packer build`, with its progress as stages; a failure is a user error that shows
    the last lines of Packer's output and where the full log is."""

    def on_line(line: str) -> None:
        for marker, name, what in STAGE_MARKERS:
            if marker in line:
                stages.begin(name, what)
        if "==> " in line or "Error" in line:
            stages.detail(line.split("==> ", 1)[-1])

    stages.begin("packer", "packer build")
    try:
        follow(build_argv(hcl_dir), log_path, on_line, env=packer_env(hcl_dir.parent), cwd=hcl_dir)
    except CommandError as exc:
        tail = "\n".join(exc.stdout.splitlines()[-TAIL_LINES:])
        raise die(
            f"packer build failed (exit code {exc.returncode}); last lines:\n{tail}\n"
            f"full log: {log_path}"
        ) from None
    finally:
        stages.end()
