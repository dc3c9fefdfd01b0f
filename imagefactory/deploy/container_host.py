"""A container host runs an environment: it pulls the image by digest from the registry
the builders push to, and starts one container as the node.

    reference "[http://]HOST[:PORT]/fleetbake/REPO[:TAG]@sha256:HEX" + container host
      local + runc:   skopeo copy (by digest) ─► cache_root()/oci-pulled/HEX (once)
                      ─► boot/container.py: unpack once, network namespace with the
                         master forwarded in, `runc run`, kept (node.json for stop)
      local + docker|podman:  ENGINE pull REF@DIGEST ─► boot/container.py as above
      ssh://... + docker|podman:  ENGINE -H/--url ssh://... pull + run -d (the host's
                      default network, the master as that host reaches it)
      ─► details for the deployment record ─► remove_container(details)

The digest pins the content: the pull verifies every byte against it, so a plain-HTTP
registry can change nothing (it can only be read by others on the way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefactory.boot import container, engines, launch, netns, nodestate, runc, seed
from imagefactory.builder.push import registry_destination
from imagefactory.deploy.pull import locked
from imagefactory.errors import UserError, die
from imagefactory.host.doctor import require_runtime
from imagefactory.paths import cache_root
from imagefactory.run import CommandError, run
from imagefactory.targets import Target, host_arch

PULL_TIMEOUT_S = 3600
REFERENCE = re.compile(
    r"(?P<scheme>https?://)?(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?)"
    r"/(?P<repo>[a-z0-9]+([._/-][a-z0-9]+)*)(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"@(?P<digest>sha256:[0-9a-f]{64})"
)
REMOTE_HOST = re.compile(
    r"ssh://([A-Za-z0-9_][A-Za-z0-9._-]*@)?[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?"
)


@dataclass(frozen=True)
class ImageRef:
    """An image in a registry, pinned by its manifest digest."""

    registry: str
    """`HOST[:PORT]`, or `http://HOST[:PORT]` for a plain-HTTP registry."""
    repository: str
    digest: str

    @property
    def pinned(self) -> str:
        """`HOST[:PORT]/REPO@sha256:...`: what an engine pulls."""
        host = self.registry.removeprefix("http://").removeprefix("https://")
        return f"{host}/{self.repository}@{self.digest}"

    def source(self) -> tuple[str, bool]:
        """skopeo's `docker://...` source and whether to verify TLS."""
        return registry_destination(
            self.registry, f"{self.repository}@{self.digest}", allow_plain=True
        )


def parse_reference(reference: str) -> ImageRef:
    """The reference of an OCI build's push (with the `http://` of a plain registry),
    which must name its digest; a tag in it is ignored."""
    found = REFERENCE.fullmatch(reference)
    if found is None:
        raise die(
            f"{reference!r} is not an image reference pinned by digest",
            hint="HOST[:PORT]/REPO@sha256:<64 hex>, with http:// for a plain-HTTP registry",
        )
    scheme = found["scheme"] if found["scheme"] == "http://" else ""
    return ImageRef(scheme + found["host"], found["repo"], found["digest"])


def check_host(host: str, runtime: str) -> str | None:
    """None for `local`, else the `ssh://...` address of a remote container host."""
    if runtime not in container.RUNTIMES:
        raise die(f"unknown container runtime {runtime!r}", hint="runc, docker or podman")
    if host == "local":
        return None
    if not REMOTE_HOST.fullmatch(host):
        raise die(f"container host {host!r} is neither `local` nor ssh://[user@]host[:port]")
    if runtime == "runc":
        raise die(f"runc runs containers on this machine only, not on {host}")
    return host


def place_container(
    host: str,
    runtime: str,
    reference: str,
    target: Target,
    node: seed.NodeVars,
    master: str | None,
    progress: Callable[[str], None],
    ca_file: Path | None = None,
) -> dict[str, Any]:
    """Start NODE on the container HOST from the image REFERENCE (pinned by digest);
    `master` is the master as that host sees it, `ca_file` what an https registry is
    verified against (default: the system's CAs). Returns the deployment's details."""
    remote = check_host(host, runtime)
    ref = parse_reference(reference)
    require_runtime(runtime)
    name = f"fleetbake-{node.node_id}"
    details = {"host": host, "runtime": runtime, "reference": ref.pinned, "container": name,
               "node_id": node.node_id}  # fmt: skip
    if remote is not None:
        _run_remote(remote, runtime, ref, node, master, progress)
        progress(f"node {node.node_id}: started on {host} ({runtime} container {name})")
        return details
    if target.arch != host_arch():
        raise die(f"a {target.name} container cannot run on this {host_arch()} machine")
    if runtime == "runc":
        layout = pull_layout(ref, ca_file, progress)
        plan = container.ContainerPlan(layout, runtime, "none", 0, keep=True, master_url=master)
        image = container.prepare_image(plan, progress)
    else:
        plan = container.ContainerPlan(Path(), runtime, "none", 0, keep=True, master_url=master)
        _pull(runtime, ref, ca_file, None, progress)
        image = container.Image(engines.image_user(runtime, ref.pinned), name=ref.pinned)
    booted = container.start_node(plan, image, node)
    progress(f"node {node.node_id}: started ({runtime}, output {booted.record.console_log})")
    return {**details, "workdir": booted.record.workdir}


def remove_container(details: dict[str, Any], progress: Callable[[str], None]) -> None:
    """Stop the container (SIGTERM: the run is cancelled and reported) and remove it,
    its forwarder, network namespace and node directory. What is gone already is fine.
    The image (pulled layout, unpacked root) stays for the next node of that digest."""
    host, runtime = str(details["host"]), str(details["runtime"])
    node_id = seed.check_node_id(str(details["node_id"]))  # it names paths: no ../
    name = f"fleetbake-{node_id}"
    remote = check_host(host, runtime)
    if remote is not None:
        engines.stop(runtime, name, remote)
    else:
        try:
            record = nodestate.load(node_id)
        except UserError:  # no record: clear what may be left by name
            record = None
        if record is not None and record.instance_id == name:
            launch.cleanup(record, launch.machine_of(record))
        elif runtime == "runc":
            runc.stop(name, lambda: runc.state(name) == "running")
            netns.delete(netns.netns_name(node_id))
        else:
            engines.stop(runtime, name)
        if record is not None:
            shutil.rmtree(Path(record.workdir), ignore_errors=True)
    progress(f"node {node_id}: container {name} removed from {host}")


def _run_remote(
    host: str,
    engine: str,
    ref: ImageRef,
    node: seed.NodeVars,
    master: str | None,
    progress: Callable[[str], None],
) -> None:
    _pull(engine, ref, None, host, progress)
    node = dataclasses.replace(node, master_url=master)
    user = engines.image_user(engine, ref.pinned, host)
    name = f"fleetbake-{node.node_id}"
    engines.stop(engine, name, host)  # a stale one of an earlier deployment
    with tempfile.TemporaryDirectory(prefix="fleetbake-env-") as tmp:
        env_file = Path(tmp) / "node.env"  # read by the local engine client, never sent
        engines.write_env_file(env_file, tuple(node.env()))
        argv = engines.run_argv(
            engine, name, ref.pinned, seed.hostname_for(node.node_id), env_file, None, host, user
        )
        engines.start(engine, argv, host)


def _pull(
    engine: str,
    ref: ImageRef,
    ca_file: Path | None,
    host: str | None,
    progress: Callable[[str], None],
) -> None:
    progress(f"{engine} pull {ref.pinned}" + (f" on {host}" if host else ""))
    tls_verify = not ref.registry.startswith("http://")
    with _cert_dir(ca_file if tls_verify else None) as certs:
        try:
            run(engines.pull_argv(engine, ref.pinned, tls_verify, certs, host),
                timeout=PULL_TIMEOUT_S)  # fmt: skip
        except CommandError as exc:
            raise die(f"cannot pull {ref.pinned}: {last_line(exc.stderr)}") from None


def pull_layout(ref: ImageRef, ca_file: Path | None, progress: Callable[[str], None]) -> Path:
    """The image as an OCI layout in the cache (its manifest named `latest`), copied
    from the registry by digest once; a layout already there is checked, not copied."""
    root = cache_root() / "oci-pulled"
    root.mkdir(parents=True, exist_ok=True)
    with locked(root):  # nodes placed in parallel pull an image once
        return _pull_layout(root, ref, ca_file, progress)


def _pull_layout(
    root: Path, ref: ImageRef, ca_file: Path | None, progress: Callable[[str], None]
) -> Path:
    dest = root / ref.digest.removeprefix("sha256:")
    if (dest / "index.json").is_file() and runc.manifest_digest(dest) == ref.digest:
        progress(f"{ref.pinned}: in the cache")
        return dest
    scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        source, tls_verify = ref.source()
        progress(f"pulling {ref.pinned}")
        with _cert_dir(ca_file if tls_verify else None) as certs:
            argv = skopeo_pull_argv(source, scratch / "layout", tls_verify, certs)
            try:
                run(argv, timeout=PULL_TIMEOUT_S, die_with_parent=True)
            except CommandError as exc:
                raise die(f"cannot pull {ref.pinned}: {last_line(exc.stderr)}") from None
        got = runc.manifest_digest(scratch / "layout")
        if got != ref.digest:
            raise die(f"the registry gave {got} for {ref.pinned}")
        shutil.rmtree(dest, ignore_errors=True)  # one that is not this digest's (changed by hand)
        (scratch / "layout").rename(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


def skopeo_pull_argv(
    source: str, layout: Path, tls_verify: bool, cert_dir: Path | None
) -> list[str]:
    """Copy `source` (docker://..., by digest) to the OCI layout `layout` as `latest`,
    keeping the manifest's bytes (and so its digest)."""
    trust = [] if cert_dir is None else ["--src-cert-dir", str(cert_dir)]
    return [
        "skopeo", "copy", "--quiet", "--preserve-digests",
        f"--src-tls-verify={'true' if tls_verify else 'false'}", *trust,
        source, f"oci:{layout}:{runc.REF}",
    ]  # fmt: skip


@contextlib.contextmanager
def _cert_dir(ca_file: Path | None) -> Iterator[Path | None]:
    """A directory holding only `ca_file` (skopeo and podman trust every *.crt of a
    certificate directory), or None."""
    if ca_file is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="fleetbake-certs-") as tmp:
        shutil.copyfile(ca_file, Path(tmp) / "fleet-ca.crt")
        yield Path(tmp)


def last_line(stderr: str) -> str:
    """A tool's last stderr line: its own one-line reason."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
