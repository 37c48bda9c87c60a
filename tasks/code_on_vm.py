"""This package's code on the VM: where it comes from (a checkout or an installed wheel), its
digest, and the copy on the volume the VM's workers run from (never on the pipeline's venv path)."""

from __future__ import annotations

import io
import shlex
import tarfile
from pathlib import Path

from core.config import BootstrapConfig, dump_config
from core.errors import BootstrapError
from core.records import Action
from tasks.canfar import VM_CA_BUNDLE
from tasks.drain import drained
from tasks.vm import VM, StepRecord
from tasks.vm_server import remote_client

PACKAGES = ("core", "blocks", "tasks", "flows", "deployments")


def code_root() -> Path:
    """The folder holding this package's top-level packages (a checkout or site-packages)."""
    import core

    return Path(core.__file__).resolve().parent.parent


def prefect_yaml() -> Path:
    """This package's prefect.yaml: inside the ``deployments`` package when installed from a
    wheel (the build puts it there), at the top of a checkout otherwise."""
    packaged = code_root() / "deployments" / "prefect.yaml"
    for candidate in (packaged, code_root() / "prefect.yaml"):
        if candidate.exists():
            return candidate
    raise BootstrapError(
        f"prefect.yaml not found ({packaged} or {code_root() / 'prefect.yaml'}): reinstall "
        "alma-sails-bootstrap from a wheel or run it from a checkout"
    )


#: The path file earlier versions put into the VM's venv (removed by ``install_code``).
OLD_PTH = "sails-bootstrap.pth"


def code_dir(config: BootstrapConfig) -> str:
    return f"{config.volume.mount_point}/sails-bootstrap"


def vm_config(config: BootstrapConfig) -> BootstrapConfig:
    """The config as the VM's flows use it: blocks named as registered on the VM's server."""
    cloud = config.cloud.model_copy(
        update={
            "credentials_block": config.cloud.credentials_block or f"{config.environment}-cloud",
            "cloud": None,
        }
    )
    return config.model_copy(update={"cloud": cloud, "ca_bundle": VM_CA_BUNDLE})


def code_digest() -> str:
    """A hash of the files' names and contents (a tarball's own bytes vary with time)."""
    import hashlib

    h = hashlib.sha256()
    root = code_root()
    sources = (f for pkg in PACKAGES for f in (root / pkg).rglob("*.py"))
    files = [prefect_yaml(), *sorted(f for f in sources if "__pycache__" not in f.parts)]
    for f in files:
        h.update(str(f.relative_to(root) if f.is_relative_to(root) else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _tarball() -> bytes:
    buf = io.BytesIO()
    root = code_root()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for pkg in PACKAGES:
            tar.add(
                root / pkg, arcname=pkg, filter=lambda t: None if "__pycache__" in t.name else t
            )
        tar.add(prefect_yaml(), arcname="prefect.yaml")
    return buf.getvalue()


def install_code(
    vm: VM, config: BootstrapConfig, url: str, auth_string: str | None, apply: bool = True
) -> StepRecord:
    """Copy this package to the VM's volume (never onto the venv's path), write its config. The
    workers run from that directory: they restart in the new one once their runs in flight
    ended (``prefect.drain_timeout``)."""
    digest = code_digest()
    target = code_dir(config)
    q = shlex.quote(target)
    user = config.server.user
    current = vm.run(f"cat {q}/.version 2>/dev/null || true").stdout.strip()
    changed = current != digest
    drain_note = ""
    if changed and apply:
        archive = shlex.quote(vm.upload(_tarball()))
        vm.run(
            f"rm -rf {q}.new && mkdir -p {q}.new && tar -xzf {archive} -C {q}.new"
            f" && echo {digest} > {q}.new/.version"
            f'; rc=$?; rm -rf "$(dirname {archive})"; exit $rc',
            sudo=True,
            timeout=120,
        )
        pools = [p.name for p in config.prefect.work_pools if p.workers > 0]
        with (
            remote_client(url, auth_string) as client,
            drained(client, pools, config.prefect.drain_timeout, "the workers", vm) as drain,
        ):
            vm.run(
                f"rm -rf {q}.old && (test ! -d {q} || mv {q} {q}.old) && mv {q}.new {q}"
                f" && rm -rf {q}.old && chown -R {user}:{user} {q}"
                " && (systemctl try-restart 'prefect-worker@*' || true)",
                sudo=True,
                timeout=120,
            )
        drain_note = drain.note()
    # Nothing of this package goes on the venv's path: the science pipeline's runs share the
    # venv, and its codebase has top-level packages of the same names (``flows``). Our own
    # deployments import it from their working directory (the pull step sets the code
    # directory, and Prefect puts it on the run's path, as for any project). Earlier versions
    # wrote a .pth file into the venv: it goes.
    site = (
        f"site=$({shlex.quote(config.prefect.venv)}/bin/python -c "
        "'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"
    )
    remove = "rm -fv" if apply else "ls -d 2>/dev/null"
    pth = bool(vm.run(f'{site} && {remove} "$site/{OLD_PTH}" || true').stdout.strip())
    cfg = vm.write_file(
        f"{target}/config.yaml",
        dump_config(vm_config(config)),
        owner=f"{user}:{user}",
        sudo=False,
        apply=apply,
    )
    return StepRecord(
        name="code on the VM",
        action=Action.CHANGE if (changed or pth or cfg) else Action.KEEP,
        applied=apply,
        reason=("" if apply or not (changed or pth or cfg) else "pending: ")
        + f"{target} at {digest}"
        + ((" (updated)" if apply else f" (now {current or 'none'})") if changed else "")
        + (f"; {OLD_PTH} removed from the venv" if pth else "")
        + (f"; {drain_note}" if drain_note else ""),
    )
