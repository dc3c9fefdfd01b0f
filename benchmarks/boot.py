"""Time to a working node: QEMU start -> first heartbeat the master receives -> stored report.

One run boots the same baked image two ways, one VM at a time, alternating:

    project  the image as baked
    stock    a copy of it with cloud-init's default module lists restored (the lists of the
             image's own /etc/cloud/cloud.cfg, in a cloud.cfg.d file that sorts last) and a
             drop-in that orders executor.service after cloud-final.service

Everything else is shared, on purpose: the base (its initramfs, drop-ins and cloud.cfg
settings) and the seed (`dsmode: local`, so the stock copy's init modules also run in
cloud-init-local and its network stage is skipped too). The comparison is the agent's
place in the boot and the module lists, nothing else; the stock figures of runs before
the seed said `dsmode: local` are therefore not comparable with later ones.

The stock copy is made here, from the image, with no loop mount: the qcow2 is converted to
raw, the two files are written into its root filesystem with `debugfs -w`, read back, and
the raw disk converted to qcow2 again.

Every node reports to a real `imagefactory serve` on loopback. The first heartbeat is the
`last_seen` of the node's first appearance in GET /v1/nodes (polled every 0.2 s, well
below the heartbeat interval); the report is the run's `received_at`. QEMU's start is
read from /proc/PID/stat. After the report the benchmark logs in over SSH and reads the
guest's own timeline: `systemd-analyze`, the units' monotonic timestamps (`systemctl
show`) and the kernel's "Run /init" line (dmesg). Guest times are put on the host's
axis through /proc/uptime, sampled over the open SSH connection (the sample with the
shortest round trip wins; its half round trip is the error bound, printed). The
console's cloud-init banners ("Up N seconds") are kept in the --json output.

    .venv/bin/python benchmarks/boot.py --image OUT/x86_64-linux           # 3 boots each
    .venv/bin/python benchmarks/boot.py --image OUT/x86_64-linux --boots 5 --json out.json
    .venv/bin/python benchmarks/boot.py --target aarch64-linux --image OUT/aarch64-linux

Without --image it bakes examples/etl for the target first. Run it alone (inside
`flock /tmp/fleetbake-heavy.lock`): other load on the host moves TCG boot times a lot.

Goal (issue 18): the project's first heartbeat at most 0.4x the stock configuration's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import click
import httpx
import yaml

from imagefactory.bake.artifacts import GUEST_UNIT
from imagefactory.boot import ssh
from imagefactory.boot.nodestate import NodeRecord
from imagefactory.targets import target_names

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("project", "stock")
MODULE_LISTS = ("cloud_init_modules", "cloud_config_modules", "cloud_final_modules")
STOCK_CFG = "/etc/cloud/cloud.cfg.d/99-benchmark-stock.cfg"
STOCK_DROPIN_DIR = GUEST_UNIT + ".d"
STOCK_DROPIN = """\
[Unit]
Wants=cloud-final.service
After=cloud-final.service
"""
UNITS = (
    "basic.target",
    "cloud-init-local.service",
    "cloud-init.service",
    "cloud-config.service",
    "cloud-final.service",
    "executor.service",
)
POLL_S = 0.2
CLOUD_INIT_BANNER = re.compile(
    r"Cloud-init v\. \S+ (?:running '(?P<stage>[\w:-]+)'|(?P<finished>finished)) at .*"
    r"Up (?P<up>[\d.]+) seconds"
)
RUN_INIT = re.compile(r"\[\s*(?P<t>[\d.]+)\] Run /\S+ as init process")
GUEST_SCRIPT = (
    "systemd-analyze || true; systemd-analyze critical-chain executor.service || true; "
    "systemd-analyze blame | head -n 25 || true; echo @@; "
    "systemctl show -p UserspaceTimestampMonotonic -p FinishTimestampMonotonic; echo; "
    "systemctl show -p Id -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic "
    "-p ExecMainStartTimestampMonotonic " + " ".join(UNITS) + "; echo @@; "
    "sudo -n dmesg | grep -m1 -E 'Run /[^ ]+ as init process' || true"
)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the stock copy of the image -------------------------------------------------------


def root_offset(raw: Path) -> int:
    """Byte offset of the root filesystem: the partition named `root`, else the last one."""
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(raw)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    parts = table["partitions"]
    root = next((p for p in parts if p.get("name") == "root"), parts[-1])
    return int(root["start"]) * int(table.get("sectorsize", 512))


def debugfs(fs: str, request: str, write: bool = False) -> str:
    argv = ["debugfs", *(["-w"] if write else []), "-R", request, fs]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def stock_module_lists(cloud_cfg: str) -> dict[str, list[str]]:
    cfg = yaml.safe_load(cloud_cfg)
    lists = {k: cfg.get(k) for k in MODULE_LISTS}
    if not all(isinstance(v, list) for v in lists.values()):
        sys.exit(f"Error: the image's /etc/cloud/cloud.cfg lacks one of {', '.join(MODULE_LISTS)}")
    return lists


def make_stock_image(image: Path, work: Path) -> Path:
    """A copy of `image` with cloud-init's default module lists and the agent after cloud-final.

    cloud-final.service runs after multi-user.target, so an agent wanted by multi-user.target
    and ordered after cloud-final would be a cycle: the copy wants it from cloud-init.target
    (which comes after multi-user.target), the way a stock cloud image orders such a unit."""
    raw = work / "stock.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    fs = f"{raw}?offset={root_offset(raw)}"
    lists = stock_module_lists(debugfs(fs, "cat /etc/cloud/cloud.cfg"))
    files = {
        STOCK_CFG: "# benchmarks/boot.py: cloud-init's default modules\n" + yaml.safe_dump(lists),
        f"{STOCK_DROPIN_DIR}/50-benchmark-stock.conf": STOCK_DROPIN,
    }
    unit = PurePosixPath(GUEST_UNIT)
    wants = unit.parent / "cloud-init.target.wants"
    # mkdir of an existing directory fails harmlessly; the checks below catch real failures.
    debugfs(fs, f"mkdir {STOCK_DROPIN_DIR}", write=True)
    debugfs(fs, f"mkdir {wants}", write=True)
    debugfs(fs, f"rm {unit.parent / 'multi-user.target.wants' / unit.name}", write=True)
    debugfs(fs, f"symlink {wants / unit.name} {unit}", write=True)
    for guest_path, text in files.items():
        local = work / Path(guest_path).name
        local.write_text(text)
        local.chmod(0o644)
        debugfs(fs, f"write {local} {guest_path}", write=True)
        if debugfs(fs, f"cat {guest_path}") != text:  # debugfs exits 0 on a failed request
            sys.exit(f"Error: could not write {guest_path} into the stock image copy")
    enabled = debugfs(fs, f"ls {unit.parent / 'multi-user.target.wants'}")
    if unit.name in enabled or unit.name not in debugfs(fs, f"ls {wants}"):
        sys.exit("Error: could not move the agent to cloud-init.target in the stock image copy")
    stock = work / "stock.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(stock)], check=True)
    raw.unlink()
    return stock


# --- the master ------------------------------------------------------------------------


@dataclass(frozen=True)
class Master:
    url: str
    secret_file: Path
    admin_token_file: Path

    def get(self, path: str) -> Any:
        token = self.admin_token_file.read_text().strip()
        response = httpx.get(self.url + path, headers={"Authorization": f"Bearer {token}"})
        response.raise_for_status()
        return response.json()


@contextmanager
def serve(tmp: Path) -> Iterator[Master]:
    secret, admin = tmp / "secret", tmp / "admin-token"
    proc = subprocess.Popen(
        [str(BIN / "imagefactory"), "serve", "--port", "0", "--db", str(tmp / "db.sqlite")]
        + ["--secret-file", str(secret), "--admin-token-file", str(admin)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if match := re.search(r"listening on (http://127\.0\.0\.1:\d+)", line):
                break
        else:
            sys.exit("Error: imagefactory serve exited without listening")
        # Keep reading its log so that a full pipe never blocks the server.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield Master(match[1], secret, admin)
    finally:
        proc.terminate()
        proc.wait(30)


# --- one boot --------------------------------------------------------------------------


@dataclass
class Boot:
    config: str
    node_id: str
    heartbeat_s: float | None = None
    """QEMU start -> first heartbeat stored by the master."""
    report_s: float | None = None
    """QEMU start -> report stored by the master."""
    timeline: dict[str, float] = field(default_factory=dict)
    """Seconds since QEMU start of each boot milestone."""
    kernel_offset_error_s: float | None = None
    console: dict[str, float] = field(default_factory=dict)
    """cloud-init's console banners: stage -> guest uptime it printed."""
    systemd_analyze: str = ""
    systemctl_show: str = ""
    error: str | None = None


def process_start(pid: int) -> float:
    """Wall-clock start of a process (from /proc/PID/stat, in clock ticks since boot)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def wall(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def imagefactory(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        [str(BIN / "imagefactory"), *args], env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"imagefactory {args[0]} failed:\n{proc.stderr}")
    return proc.stdout


def read_banners(console_log: Path) -> dict[str, float]:
    banners: dict[str, float] = {}
    for line in console_log.read_text(errors="replace").splitlines():
        if m := CLOUD_INIT_BANNER.search(line):
            stage = m["stage"] or "finished"
            banners.setdefault(f"{stage} (banner)" if m["stage"] else stage, float(m["up"]))
    return banners


def wait_for_master(master: Master, boot: Boot, started: float, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while boot.report_s is None:
        if boot.heartbeat_s is None:
            for node in master.get("/v1/nodes"):
                if node["node_id"] == boot.node_id:
                    boot.heartbeat_s = wall(node["last_seen"]) - started
        for run in master.get(f"/v1/runs?node={boot.node_id}"):
            boot.report_s = wall(run["received_at"]) - started
        if not Path(f"/proc/{pid}").exists():
            raise RuntimeError("QEMU ended before the report")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no report after {timeout:.0f} s")
        time.sleep(POLL_S)


def kernel_start(client: Any, samples: int = 7) -> tuple[float, float]:
    """Wall-clock time of the guest kernel's start, and its error bound."""
    best: tuple[float, float] | None = None
    for _ in range(samples):
        before = time.time()
        result = ssh.execute(client, "cat /proc/uptime", timeout=60)
        after = time.time()
        uptime = float(result.stdout.split()[0])
        half = (after - before) / 2
        if best is None or half < best[1]:
            best = (before + half - uptime, half)
    assert best is not None
    return best


def parse_show(text: str) -> dict[str, dict[str, float]]:
    """`systemctl show` blocks -> unit (or `manager`) -> property -> seconds."""
    units: dict[str, dict[str, float]] = {}
    for block in text.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        name = props.pop("Id", "manager")
        units[name] = {k: int(v) / 1e6 for k, v in props.items() if v.isdigit() and int(v)}
    return units


def guest_timeline(boot: Boot, record: NodeRecord, started: float) -> None:
    client = ssh.connect(record, wait_s=300)
    try:
        kernel_wall, boot.kernel_offset_error_s = kernel_start(client)
        result = ssh.execute(client, GUEST_SCRIPT, timeout=120)
    finally:
        client.close()
    analyze, show, dmesg = result.stdout.decode(errors="replace").split("@@\n")
    boot.systemd_analyze, boot.systemctl_show = analyze.strip(), show.strip()
    offset = kernel_wall - started
    units = parse_show(show)
    at = boot.timeline
    at["kernel start"] = offset
    if m := RUN_INIT.search(dmesg):
        at["initramfs /init"] = offset + float(m["t"])
    manager = units.get("manager", {})
    if "UserspaceTimestampMonotonic" in manager:
        at["systemd start"] = offset + manager["UserspaceTimestampMonotonic"]
    for unit in UNITS:
        props = units.get(unit, {})
        name = unit.removesuffix(".service")
        if "InactiveExitTimestampMonotonic" in props:
            at[f"{name} start"] = offset + props["InactiveExitTimestampMonotonic"]
        if unit == "executor.service" and "ExecMainStartTimestampMonotonic" in props:
            at["agent exec"] = offset + props["ExecMainStartTimestampMonotonic"]
        elif "ActiveEnterTimestampMonotonic" in props:
            at[f"{name} done"] = offset + props["ActiveEnterTimestampMonotonic"]
    if boot.heartbeat_s is not None:
        at["first heartbeat"] = boot.heartbeat_s
    if boot.report_s is not None:
        at["report stored"] = boot.report_s


def boot_once(
    config: str, image: Path, node_id: str, master: Master, args: argparse.Namespace,
    env: dict[str, str],
) -> Boot:  # fmt: skip
    boot = Boot(config, node_id)
    try:
        out = imagefactory(
            env, "boot", str(image), "--node-id", node_id, "--target", args.target,
            "--accel", args.accel, "--master", master.url,
            "--secret-file", str(master.secret_file),
            "--admin-token-file", str(master.admin_token_file), "--on-complete", "none",
            "--wait", "none", "--keep", "--json",
        )  # fmt: skip
    except RuntimeError as exc:  # the VM never started: nothing to stop
        boot.error = str(exc)
        say(f"  {node_id}: {exc}")
        return boot
    summary = json.loads(out)[0]
    record = NodeRecord(**{k: summary[k] for k in NodeRecord.__dataclass_fields__})
    try:
        assert record.pid is not None
        started = process_start(record.pid)
        wait_for_master(master, boot, started, record.pid, args.timeout)
        guest_timeline(boot, record, started)
        boot.console = read_banners(Path(record.console_log))
    except (RuntimeError, click.ClickException, OSError, ValueError, httpx.HTTPError) as exc:
        boot.error = str(exc)
        tail = Path(record.console_log).read_text(errors="replace").splitlines()[-15:]
        say(f"  {node_id}: {exc}\n  last console lines:\n" + "\n".join("  | " + x for x in tail))
    finally:
        imagefactory(env, "stop", node_id)
    return boot


# --- report ----------------------------------------------------------------------------

MILESTONES = (
    "kernel start",
    "initramfs /init",
    "systemd start",
    "basic.target done",
    "cloud-init-local start",
    "cloud-init-local done",
    "cloud-init start",
    "cloud-init done",
    "cloud-config start",
    "cloud-config done",
    "cloud-final start",
    "cloud-final done",
    "executor start",
    "agent exec",
    "first heartbeat",
    "report stored",
)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def node_env_written(boot: Boot) -> float | None:
    """When the last cloud-init stage that can run the init modules (write-files) ended."""
    done = [boot.timeline[k] for k in ("cloud-init-local done", "cloud-init done")
            if k in boot.timeline]  # fmt: skip
    return max(done) if done else None


def table(boots: list[Boot]) -> str:
    ok = {c: [b for b in boots if b.config == c and b.error is None] for c in CONFIGS}
    head = f"{'seconds since QEMU start (median)':36}" + "".join(
        f"{c + f' (n={len(ok[c])})':>16}" for c in CONFIGS
    )
    lines = [head, "-" * len(head)]

    def cell(value: float | None) -> str:
        return f"{value:16.1f}" if value is not None else f"{'-':>16}"

    for name in MILESTONES:
        meds = [median([b.timeline[name] for b in ok[c] if name in b.timeline]) for c in CONFIGS]
        if any(m is not None for m in meds):
            lines.append(f"{name:36}" + "".join(cell(m) for m in meds))
    lines.append("")
    for key, label in (("heartbeat_s", "first heartbeat"), ("report_s", "report stored")):
        meds = [median([getattr(b, key) for b in ok[c]]) for c in CONFIGS]
        if None not in meds:
            project, stock = meds
            assert project is not None and stock is not None
            lines.append(
                f"{label}: project/stock = {project:.1f}/{stock:.1f} = {project / stock:.2f}x"
            )
    agent = [
        b.timeline["first heartbeat"] - b.timeline["agent exec"]
        for b in ok["project"]
        if {"first heartbeat", "agent exec"} <= b.timeline.keys()
    ]
    if agent:
        lines.append(f"agent exec -> first heartbeat (project): median {median(agent):.2f} s")
    seeded = median([t for b in ok["project"] if (t := node_env_written(b)) is not None])
    stock_beat = median([b.heartbeat_s for b in ok["stock"] if b.heartbeat_s is not None])
    if seeded is not None and stock_beat:
        lines.append(
            f"floor: node.env written (project) {seeded:.1f} s = {seeded / stock_beat:.2f}x "
            "the stock first heartbeat; no ordering of the agent gets below it"
        )
    errors = [b.kernel_offset_error_s for b in boots if b.kernel_offset_error_s is not None]
    if errors:
        lines.append(f"guest->host clock alignment: within +-{max(errors):.2f} s")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------


def baked_image(args: argparse.Namespace, work: Path) -> Path:
    if args.image is not None:
        path = Path(args.image)
        if path.is_dir():
            found = sorted(path.glob("*.qcow2"))
            if len(found) != 1:
                sys.exit(f"Error: {path} holds {len(found)} qcow2 images, expected one")
            path = found[0]
        if not path.is_file():
            sys.exit(f"Error: {path}: no such image")
        return path
    say(f"==> baking examples/etl for {args.target}")
    out = work / "bake"
    subprocess.run(
        [str(BIN / "imagefactory"), "bake", "--pipeline", str(REPO / "examples" / "etl"),
         "--target", args.target, "--output", str(out)],
        check=True,
    )  # fmt: skip
    return Path(next((out / args.target).glob("*.qcow2")))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", help="A baked qcow2, or an `imagefactory bake` OUT/TARGET.")
    parser.add_argument(
        "--target", default="x86_64-linux", choices=target_names(), help="default: x86_64-linux"
    )
    parser.add_argument("--boots", type=int, default=3, help="boots per configuration (3)")
    parser.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    parser.add_argument("--timeout", type=float, default=900, help="seconds per boot (900)")
    parser.add_argument("--json", metavar="FILE", help="also write every boot's figures here")
    args = parser.parse_args(argv)
    if args.boots < 1:
        parser.error("--boots must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("debugfs", "sfdisk", "qemu-img"):
        if shutil.which(tool) is None:
            sys.exit(f"Error: {tool} is not installed (make setup)")
    with tempfile.TemporaryDirectory(prefix="fleetbake-bootbench-") as tmp:
        work = Path(tmp)
        image = baked_image(args, work)
        say(f"==> stock copy of {image}")
        try:
            images = {"project": image, "stock": make_stock_image(image, work)}
        except subprocess.CalledProcessError as exc:
            last = (exc.stderr or "").strip().splitlines()[-1:]
            sys.exit(f"Error: {exc.cmd[0]} failed on {image} (exit {exc.returncode})" +
                     "".join(f": {line}" for line in last))  # fmt: skip
        env = {**os.environ, "XDG_STATE_HOME": str(work / "state")}
        boots: list[Boot] = []
        with serve(work) as master:
            for i in range(args.boots):
                for config in CONFIGS:  # alternating, so drift in host load hits both
                    node_id = f"bench-{config}-{i + 1}"
                    say(f"==> boot {i + 1}/{args.boots} {config} ({node_id})")
                    boot = boot_once(config, images[config], node_id, master, args, env)
                    if boot.error is None:
                        say(f"    heartbeat {boot.heartbeat_s:.1f} s, report {boot.report_s:.1f} s")
                    boots.append(boot)
        for config in CONFIGS:
            sample = next((b for b in boots if b.config == config and b.systemd_analyze), None)
            if sample:
                print(f"{config}: {sample.systemd_analyze.splitlines()[0]}")
        print(table(boots))
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(b) for b in boots], indent=2) + "\n")
    return 1 if any(b.error for b in boots) else 0


if __name__ == "__main__":
    sys.exit(main())
