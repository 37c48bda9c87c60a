"""The Prefect server on the VM: its venv and home on the volume, run by systemd.

The layout is the operators' own (venv at /mnt/pspace/prefect-env, PREFECT_HOME at
/mnt/pspace/prefect-data); what used to run by hand in ``screen`` becomes a unit that restarts on
failure and comes back after a reboot, with API auth and a server encryption key so block
secrets are protected at rest and in transit to callers without the auth string.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import shlex
import time
from pathlib import Path
from typing import Any

from prefect import task

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import Progress, logger
from core.records import Action
from tasks.drain import drained
from tasks.vm import MANAGED, VM, VM_TASK, StepRecord, planned

SERVER_UNIT = "prefect-server.service"
#: The libraries the VM's flows use beside Prefect, at the versions this package pins.
VM_LIBRARIES = ("canfar", "openstacksdk", "fabric")
SERVER_ENV = "/etc/sails-bootstrap/prefect-server.env"
#: The digest of the server's encryption key (not the key): what the service user may know of
#: it, to name the key a backup's blocks need.
SERVER_KEY_ID = "/etc/sails-bootstrap/prefect-server.key-id"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def vm_packages() -> list[str]:
    """``VM_LIBRARIES`` as this package's own requirements pin them (pyproject.toml, read from
    the installed package's metadata): one place for the versions."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    pins = {}
    for line in requires("alma-sails-bootstrap") or []:
        req = Requirement(line)
        if req.marker is None and req.name in VM_LIBRARIES:
            pins[req.name] = f"{req.name}{req.specifier}"
    missing = [name for name in VM_LIBRARIES if name not in pins]
    if missing:
        raise BootstrapError(
            f"alma-sails-bootstrap's metadata pins no {', '.join(missing)}: reinstall it "
            "(uv sync, or pip install the wheel)"
        )
    return [pins[name] for name in VM_LIBRARIES]


def local_prefect_version() -> str:
    import prefect

    return str(prefect.__version__)


def server_secrets(
    config: BootstrapConfig,
    apply: bool = True,
    must_exist: bool = False,
    host: VM | None = None,
) -> dict[str, str]:
    """The API auth string and encryption key, kept in a Prefect Secret block; with
    ``must_exist``, a missing block is an error.

    Never rotated silently: with the block missing (another machine, a wiped Prefect home), the
    values the VM's server runs with are read back from ``host``; new ones are made only for a
    server that has none and no database they would fail to decrypt."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(config.prefect.auth_block).get()  # type: ignore[union-attr]
        if isinstance(value, dict) and {"auth_string", "encryption_key"} <= value.keys():
            return {k: str(v) for k, v in value.items()}
    except ValueError:
        pass
    if must_exist:
        raise BootstrapError(
            f"no Secret block {config.prefect.auth_block!r} with the VM server's auth string on "
            "the Prefect API in use: run `sails-bootstrap configure` (it makes one), or point "
            "at the API where it was saved"
        )
    recovered = recover_server_secrets(host, config) if host is not None else None
    if recovered is not None:
        value = recovered
        made = "recovered from the VM's server"
    else:
        from cryptography.fernet import Fernet

        value = {
            "auth_string": f"admin:{secrets.token_urlsafe(24)}",
            "encryption_key": Fernet.generate_key().decode(),
        }
        made = "created"
    if apply:
        block: Secret[Any] = Secret(value=value)
        block.save(config.prefect.auth_block, overwrite=True)
        logger().info(
            "%s the VM server's auth and encryption key, kept as Secret block %r",
            made,
            config.prefect.auth_block,
        )
    return value


def recover_server_secrets(host: VM, config: BootstrapConfig) -> dict[str, str] | None:
    """The auth string and encryption key in the VM server's environment file; None when the
    server has never been set up. A database on the volume without its key is an error: a new
    key would leave every block in it unreadable."""
    env = host.run(f"cat {SERVER_ENV}", sudo=host.privileged, check=False)
    values = dict(line.split("=", 1) for line in env.stdout.splitlines() if env.ok and "=" in line)
    key = values.get("PREFECT_SERVER_ENCRYPTION_KEY")
    if key:
        auth = values.get("PREFECT_SERVER_API_AUTH_STRING") or f"admin:{secrets.token_urlsafe(24)}"
        return {"auth_string": auth, "encryption_key": key}
    database = f"{config.prefect.home}/prefect.db"
    if host.run(f"test -s {shlex.quote(database)}", sudo=host.privileged, check=False).ok:
        raise BootstrapError(
            f"the VM's Prefect database {database} exists but neither Secret block "
            f"{config.prefect.auth_block!r} nor the VM's {SERVER_ENV} holds the key that "
            "encrypts its blocks; a new key would make them unreadable. Save the old values as "
            f"that Secret block ({{'auth_string': …, 'encryption_key': …}}), or move the "
            "database aside to start the server afresh"
        )
    return None


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


@task(name="ensure-prefect-venv", **VM_TASK)
def ensure_prefect_venv(
    vm: VM, config: BootstrapConfig, extra: list[str] | None = None, apply: bool = True
) -> StepRecord:
    """A venv on the volume with the wanted Prefect (and the canfar client) installed.

    The venv holds the operators' own packages too: it is rebuilt (``--clear``) only when it is
    broken, i.e. its python cannot run pip."""
    version = config.prefect.version or local_prefect_version()
    venv = config.prefect.venv
    py = f"{venv}/bin/python"
    # The canfar client for headless sessions; openstacksdk and fabric for this package's own
    # deployments (health check, repairs), which run on the VM's workers.
    packages = [f"prefect=={version}", *vm_packages(), *(extra or [])]
    names = [p.split("==")[0] for p in packages]
    code = (
        "import importlib.metadata as m\n"
        "def v(n):\n"
        "    try:\n"
        "        return m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        return 'none'\n"
        f"print(' '.join(f'{{n}}=={{v(n)}}' for n in {names!r}))"
    )
    have = vm.run(venv_probe(venv, code), check=False)
    state = have.stdout.strip() if have.stdout.strip() in ("missing", "broken") else "ok"
    if (
        state == "ok"
        and have.ok
        and sorted(have.stdout.split()) == sorted(packages)
        and not config.prefect.requirements
    ):
        return StepRecord(
            name="prefect venv", applied=apply, reason=f"{venv} has prefect {version}"
        )
    wanted = ", ".join(packages) + (" and the requirements" if config.prefect.requirements else "")
    action = Action.CREATE if state == "missing" else Action.CHANGE
    if not apply:
        first = {
            "missing": f"create {venv}, then ",
            "broken": f"venv broken (its python has no working pip): rebuild {venv}, then ",
        }.get(state, "")
        return StepRecord(
            name="prefect venv",
            action=action,
            applied=False,
            reason=f"pending: {first}pip install {wanted} in {venv}",
        )
    progress = Progress("the VM's Prefect venv (pip install)")
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
    if config.prefect.requirements:
        text = Path(config.prefect.requirements).expanduser().read_text()
        vm.write_file(f"{venv}/requirements.txt", text, owner=f"{user}:{user}", sudo=False)
        reqs = f"-r {venv}/requirements.txt"
    quoted = " ".join(shlex.quote(p) for p in packages)
    vm.run(
        f"{py} -m pip install -q --disable-pip-version-check {pip_index_args(config)} "
        f"{quoted} {reqs}",
        timeout=1800,
    )
    logger().info("installed %s in %s (%.0f s)", ", ".join(packages), venv, progress.elapsed)
    done = {"missing": "created the venv; ", "broken": "rebuilt the broken venv; "}.get(state, "")
    return StepRecord(
        name="prefect venv",
        action=action,
        reason=f"{done}installed {', '.join(packages)}",
    )


def server_env(config: BootstrapConfig, secret: dict[str, str]) -> str:
    p = config.prefect
    lines = [
        f"PREFECT_HOME={p.home}",
        # loopback only: operators and this package come through SSH (`ssh -N ALIAS`)
        "PREFECT_SERVER_API_HOST=127.0.0.1",
        f"PREFECT_SERVER_API_PORT={p.port}",
        # relative: the UI calls the API wherever the browser reached it (any forwarded port)
        "PREFECT_UI_API_URL=/api",
        # the UI's files, rewritten at start: in the server's own home (the venv is the login
        # user's, read-only to the server)
        f"PREFECT_UI_STATIC_DIRECTORY={p.home}/ui-build",
        "PREFECT_SERVER_ANALYTICS_ENABLED=false",
        "DO_NOT_TRACK=1",
        "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED=events,flow_runs",
        f"PREFECT_SERVER_ENCRYPTION_KEY={secret['encryption_key']}",
    ]
    if p.api_auth:
        lines.append(f"PREFECT_SERVER_API_AUTH_STRING={secret['auth_string']}")
    return "\n".join(lines) + "\n"


def server_unit(config: BootstrapConfig) -> str:
    p = config.prefect
    return (
        f"{MANAGED}\n"
        "[Unit]\n"
        "Description=Prefect server (ALMA-SAILS orchestration)\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        f"RequiresMountsFor={p.home} {p.venv}\n"
        "[Service]\n"
        f"User={config.prefect.user}\n"
        f"EnvironmentFile={SERVER_ENV}\n"
        f"ExecStartPre=/bin/mkdir -p {p.home}\n"
        f"ExecStart={p.venv}/bin/prefect server start\n"
        "KillSignal=SIGINT\n"
        "TimeoutStopSec=30\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def wait_for_health(url: str, timeout: float, shown: str | None = None) -> None:
    """Until the server's /health answers 200; a refused connection and any other answer alike
    are waited out only within ``timeout``. ``shown``: how to name the server (``url`` may be
    a forwarded port of this machine)."""
    import httpx

    progress = Progress(f"Prefect server at {shown or url}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = httpx.get(f"{url}/health", timeout=5).status_code
            if status == 200:
                return
            last = f"HTTP {status}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise BootstrapError(
                f"the Prefect server at {shown or url} did not become healthy within "
                f"{timeout:.0f} s (last answer: {last}); "
                f"see `journalctl -u {SERVER_UNIT}` on the VM"
            )
        progress.tick(last.split(":")[0])
        time.sleep(1)


@task(name="ensure-prefect-server", **VM_TASK)
def ensure_prefect_server(
    vm: VM,
    config: BootstrapConfig,
    secret: dict[str, str],
    apply: bool = True,
    venv_changed: bool = False,
) -> StepRecord:
    """The server's environment file and unit, enabled and running; restarted when either or
    its venv (``venv_changed``: rebuilt or upgraded under the running process) changed."""
    changes: list[str] = []
    user = config.prefect.user
    home = shlex.quote(config.prefect.home)
    # PREFECT_HOME (the database, with every block) is the service user's alone; one made by
    # an earlier version for the login user is handed over whole.
    owner = vm.run(f"stat -c '%U %a' {home} 2>/dev/null || echo missing", check=False)
    if owner.stdout.strip() != f"{user} 700":
        if apply:
            vm.run(
                f"mkdir -p {home} && chown -R {user}:{user} {home} && chmod 0700 {home}",
                sudo=True,
            )
        changes.append(f"PREFECT_HOME {user}'s (0700)")
    env_changed = vm.write_file(
        SERVER_ENV, server_env(config, secret), mode="0600", owner="root", apply=apply
    )
    if vm.write_file(
        SERVER_KEY_ID, key_digest(secret["encryption_key"]) + "\n", mode="0644", apply=apply
    ):
        changes.append("key id")
    unit_changed = vm.write_file(
        f"/etc/systemd/system/{SERVER_UNIT}", server_unit(config), apply=apply
    )
    if env_changed:
        changes.append("server environment")
    if unit_changed:
        changes.append(f"wrote {SERVER_UNIT}")
        if apply:
            vm.run("systemctl daemon-reload", sudo=True)
    if not vm.run(f"systemctl is-enabled --quiet {SERVER_UNIT}", check=False).ok:
        if apply:
            vm.run(f"systemctl enable {SERVER_UNIT}", sudo=True)
        changes.append("enabled")
    active = vm.run(f"systemctl is-active --quiet {SERVER_UNIT}", check=False).ok
    restart = not active or env_changed or unit_changed or venv_changed
    if restart:
        changes.append(
            ("restarted for the new venv" if venv_changed else "restarted") if active else "started"
        )
    # The server listens on the VM's loopback: reached through the SSH connection (on the VM
    # itself, directly).
    url = f"http://127.0.0.1:{config.prefect.port}/api on the VM"
    if apply:
        from tasks.vm_server import remote_client

        with contextlib.ExitStack() as stack:
            base = stack.enter_context(vm.api(config.prefect.port))
            if restart and active:  # the runs in flight end first; the pools wait meanwhile
                auth = secret["auth_string"] if config.prefect.api_auth else None
                client = stack.enter_context(remote_client(f"{base}/api", auth))
                pools = [p.name for p in config.prefect.work_pools]
                drain = stack.enter_context(
                    drained(client, pools, config.prefect.drain_timeout, "the Prefect server", vm)
                )
                if drain.note():
                    changes.append(drain.note())
            if restart:
                vm.run(f"systemctl restart {SERVER_UNIT}", sudo=True)
            wait_for_health(f"{base}/api", timeout=300, shown=url)
    return StepRecord(
        name="prefect server",
        action=Action.CHANGE if changes else Action.KEEP,
        applied=apply,
        reason=planned(changes, apply) or (f"healthy at {url}" if apply else f"running at {url}"),
    )


def api_check(url: str, auth_string: str | None) -> int:
    """Status code of an API call that needs auth (for verification and tests)."""
    import httpx

    auth: Any = tuple(auth_string.split(":", 1)) if auth_string else None
    return httpx.post(f"{url}/flows/filter", json={}, auth=auth, timeout=10).status_code
