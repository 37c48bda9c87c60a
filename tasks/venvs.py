"""The two venvs on the VM's volume, each with its own packages.

- The pipeline's (``prefect.venv``, the operators' /mnt/pspace/prefect-env): Prefect at the
  server's version, the canfar client its headless sessions use, and the operators' own
  requirements. Its workers run the science deployments.
- This package's (``code_venv``): Prefect at the same version, and the libraries this package's
  own deployments use (openstacksdk, fabric, and the canfar client its blocks open). The
  worker of the ``sails-bootstrap`` pool runs from it, so nothing of this package is installed
  into the pipeline's venv or put on its path.

A venv is rebuilt (``--clear``) only when it is broken, i.e. its python cannot run pip; the
packages are compared by version and installed only when one differs.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import Progress, logger
from core.records import Action
from tasks.vm import VM, StepRecord

#: The libraries the VM's flows use beside Prefect, at the versions this package pins:
#: the pipeline's (headless sessions) and this package's own (its deployments).
PIPELINE_LIBRARIES = ("canfar",)
OWN_LIBRARIES = ("openstacksdk", "fabric", "canfar")
VM_LIBRARIES = tuple(dict.fromkeys(PIPELINE_LIBRARIES + OWN_LIBRARIES))


def code_venv(config: BootstrapConfig) -> str:
    """This package's venv on the volume (beside the code, which is replaced whole on update)."""
    return f"{config.volume.mount_point}/sails-bootstrap-env"


def vm_packages(names: tuple[str, ...] = VM_LIBRARIES) -> list[str]:
    """``names`` as this package's own requirements pin them (pyproject.toml, read from the
    installed package's metadata): one place for the versions."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    pins = {}
    for line in requires("alma-sails-bootstrap") or []:
        req = Requirement(line)
        if req.marker is None and req.name in names:
            pins[req.name] = f"{req.name}{req.specifier}"
    missing = [name for name in names if name not in pins]
    if missing:
        raise BootstrapError(
            f"alma-sails-bootstrap's metadata pins no {', '.join(missing)}: reinstall it "
            "(uv sync, or pip install the wheel)"
        )
    return [pins[name] for name in names]


def requirements_text(path: str | None) -> str | None:
    """The operators' requirements file's text (None: no file configured)."""
    return Path(path).expanduser().read_text() if path else None


def installed_requirements(vm: VM, venv: str) -> str | None:
    """The requirements ``venv`` was last built with whole (None: none)."""
    kept = vm.run(f"cat {shlex.quote(venv)}/requirements.txt", check=False)
    return kept.stdout if kept.ok else None


def same_requirements(a: str | None, b: str | None) -> bool:
    return (a or "").strip() == (b or "").strip()


def local_prefect_version() -> str:
    import prefect

    return str(prefect.__version__)


def pip_index_args(config: BootstrapConfig) -> str:
    index = config.prefect.package_index
    if not index:
        return ""
    args = f"--index-url {shlex.quote(index)}"
    if index.startswith("http://"):  # a local mirror without TLS: pip must be told to trust it
        from urllib.parse import urlsplit

        args += f" --trusted-host {shlex.quote(urlsplit(index).hostname or '')}"
    return args


def venv_probe(venv: str, code: str) -> str:
    """One command that says what the venv is: 'missing', 'broken' (a ``python -m venv`` cut off
    without ensurepip leaves bin/python and no pip; a python upgrade leaves a dangling link), or
    the installed versions ``code`` prints."""
    py = shlex.quote(f"{venv}/bin/python")
    return (
        f"if [ ! -e {py} ] && [ ! -L {py} ]; then echo missing; "
        f"elif ! {py} -m pip --version >/dev/null 2>&1; then echo broken; "
        f"else {py} -c {shlex.quote(code)}; fi"
    )


def versions_code(names: list[str]) -> str:
    return (
        "import importlib.metadata as m\n"
        "def v(n):\n"
        "    try:\n"
        "        return m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        return 'none'\n"
        f"print(' '.join(f'{{n}}=={{v(n)}}' for n in {names!r}))"
    )


def converge_venv(
    vm: VM,
    config: BootstrapConfig,
    name: str,
    venv: str,
    packages: list[str],
    requirements: str | None = None,
    apply: bool = True,
) -> StepRecord:
    """``venv`` with ``packages`` (``name==version``) installed, and a local ``requirements``
    file (installed again when its text differs from the one last installed whole, kept as the
    venv's requirements.txt)."""
    version = packages[0].split("==")[-1]
    py = f"{venv}/bin/python"
    have = vm.run(
        venv_probe(venv, versions_code([p.split("==")[0] for p in packages])), check=False
    )
    state = have.stdout.strip() if have.stdout.strip() in ("missing", "broken") else "ok"
    current = state == "ok" and have.ok and sorted(have.stdout.split()) == sorted(packages)
    text = requirements_text(requirements)
    if current and text is not None:  # installed whole last time: kept beside the packages
        current = same_requirements(installed_requirements(vm, venv), text)
    if current:
        also = " and the requirements" if text is not None else ""
        return StepRecord(name=name, applied=apply, reason=f"{venv} has prefect {version}{also}")
    wanted = ", ".join(packages) + (" and the requirements" if requirements else "")
    action = Action.CREATE if state == "missing" else Action.CHANGE
    if not apply:
        first = {
            "missing": f"create {venv}, then ",
            "broken": f"venv broken (its python has no working pip): rebuild {venv}, then ",
        }.get(state, "")
        return StepRecord(
            name=name,
            action=action,
            applied=False,
            reason=f"pending: {first}pip install {wanted} in {venv}",
        )
    progress = Progress(f"the VM's {name} (pip install)")
    progress.tick("starting")
    user = config.server.user
    if state != "ok":
        clear = "--clear " if state == "broken" else ""
        if state == "broken":
            logger().warning("%s is broken (no working pip): rebuilding it", venv)
        made = vm.run(f"python3 -m venv {clear}{shlex.quote(venv)}", timeout=300, check=False)
        if not made.ok:
            raise BootstrapError(
                f"python3 -m venv {venv} failed on {vm.host}: "
                f"{(made.stderr or made.stdout).strip()[-300:]}. The venv needs the "
                "python3-venv package (the packages step installs it)"
            )
    vm.run(f"chown -R {user}:{user} {shlex.quote(venv)}", sudo=True, check=False)
    reqs = ""
    if text is not None:  # named requirements.txt once installed (what the next run compares)
        vm.write_file(f"{venv}/requirements.txt.new", text, owner=f"{user}:{user}", sudo=False)
        reqs = f"-r {venv}/requirements.txt.new"
    quoted = " ".join(shlex.quote(p) for p in packages)
    vm.run(
        f"{py} -m pip install -q --disable-pip-version-check {pip_index_args(config)} "
        f"{quoted} {reqs}",
        timeout=1800,
    )
    if text is not None:
        q = shlex.quote(venv)
        vm.run(f"mv -f {q}/requirements.txt.new {q}/requirements.txt")
    logger().info("installed %s in %s (%.0f s)", ", ".join(packages), venv, progress.elapsed)
    done = {"missing": "created the venv; ", "broken": "rebuilt the broken venv; "}.get(state, "")
    return StepRecord(name=name, action=action, reason=f"{done}installed {', '.join(packages)}")


def ensure_prefect_venv(vm: VM, config: BootstrapConfig, apply: bool = True) -> StepRecord:
    """The pipeline's venv: Prefect at the server's version, the canfar client for headless
    sessions, and the operators' requirements. It holds the operators' own packages too."""
    version = config.prefect.version or local_prefect_version()
    packages = [f"prefect=={version}", *vm_packages(PIPELINE_LIBRARIES)]
    return converge_venv(
        vm,
        config,
        "prefect venv",
        config.prefect.venv,
        packages,
        config.prefect.requirements,
        apply,
    )


def ensure_code_venv(vm: VM, config: BootstrapConfig, apply: bool = True) -> StepRecord:
    """This package's own venv: the same Prefect, and the libraries its deployments import."""
    version = config.prefect.version or local_prefect_version()
    packages = [f"prefect=={version}", *vm_packages(OWN_LIBRARIES)]
    return converge_venv(vm, config, "code venv", code_venv(config), packages, None, apply)
