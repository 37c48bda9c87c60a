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
from typing import Any

from pydantic import SecretStr

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from core.poll import poll
from core.records import Action
from tasks.database import POSTGRES_UNIT
from tasks.drain import drained
from tasks.server_runs import (
    SERVER_ENV,
    SERVER_UNIT,
    SERVER_UNIT_FILE,
    URL_VARIABLE,
    parse_runs,
    restart_reason,
    runs_script,
    stale_files,
)
from tasks.units import enable_unit, install_unit, unit_active
from tasks.vm import MANAGED, VM, StepRecord, planned

#: The digest of the server's encryption key (not the key): what the service user may know of
#: it, to name the key a backup's blocks need.
SERVER_KEY_ID = "/etc/sails-bootstrap/prefect-server.key-id"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


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


def server_env(
    config: BootstrapConfig, secret: dict[str, str], database_url: SecretStr | None = None
) -> str:
    """The server's environment; ``database_url``: its PostgreSQL (none: SQLite in its home)."""
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
    if database_url is not None:
        lines.append(f"{URL_VARIABLE}={database_url.get_secret_value()}")
    return "\n".join(lines) + "\n"


def server_unit(config: BootstrapConfig) -> str:
    p = config.prefect
    # on PostgreSQL: started after it (which waits for the volume), stopped before it
    database = (
        f"After={POSTGRES_UNIT}\nWants={POSTGRES_UNIT}\n" if p.database.kind == "postgresql" else ""
    )
    return (
        f"{MANAGED}\n"
        "[Unit]\n"
        "Description=Prefect server (ALMA-SAILS orchestration)\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        f"{database}"
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

    def answer() -> str:
        try:
            status = httpx.get(f"{url}/health", timeout=5).status_code
            return "ok" if status == 200 else f"HTTP {status}"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"

    poll(
        answer,
        lambda last: last == "ok",
        f"Prefect server at {shown or url}",
        timeout,
        interval=1,
        state=lambda last: last.split(":")[0],
        timed_out=lambda last: BootstrapError(
            f"the Prefect server at {shown or url} did not become healthy within "
            f"{timeout:.0f} s (last answer: {last}); see `journalctl -u {SERVER_UNIT}` on the VM"
        ),
    )


def ensure_prefect_server(
    vm: VM,
    config: BootstrapConfig,
    secret: dict[str, str],
    apply: bool = True,
    venv_changed: bool = False,
    database_url: SecretStr | None = None,
    database_restart: bool = False,
) -> StepRecord:
    """The server's environment file and unit, enabled and running; restarted when either or
    its venv (``venv_changed``: rebuilt or upgraded under the running process) changed, or when
    the running process started before they were last written (a run cut off before its
    restart). ``database_url``: the PostgreSQL it runs on (none: SQLite in its home);
    ``database_restart``: that PostgreSQL restarts in the same drain, the server stopped."""
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
    # what the running process read, before this run writes anything
    stale = stale_files(parse_runs(vm.run(runs_script(config), sudo=True, check=False).stdout))
    env_changed = vm.write_file(
        SERVER_ENV,
        server_env(config, secret, database_url),
        mode="0600",
        owner="root",
        apply=apply,
    )
    if vm.write_file(
        SERVER_KEY_ID, key_digest(secret["encryption_key"]) + "\n", mode="0644", apply=apply
    ):
        changes.append("key id")
    unit_changed = install_unit(vm, SERVER_UNIT_FILE, server_unit(config), apply)
    if env_changed:
        changes.append("server environment")
    if unit_changed:
        changes.append(f"wrote {SERVER_UNIT}")
    if enable_unit(vm, SERVER_UNIT, apply):
        changes.append("enabled")
    active = unit_active(vm, SERVER_UNIT)
    wrote = [
        name
        for name, done in (
            ("environment", env_changed),
            ("unit", unit_changed),
            ("venv", venv_changed),
        )
        if done
    ]
    why = restart_reason(active, wrote, stale, database_restart)
    if why:
        changes.append(why)
    # The server listens on the VM's loopback: reached through the SSH connection (on the VM
    # itself, directly).
    url = f"http://127.0.0.1:{config.prefect.port}/api on the VM"
    if apply:
        from tasks.vm_server import remote_client

        with contextlib.ExitStack() as stack:
            base = stack.enter_context(vm.api(config.prefect.port))
            if why and active:  # the runs in flight end first; the pools wait meanwhile
                auth = secret["auth_string"] if config.prefect.api_auth else None
                client = stack.enter_context(remote_client(f"{base}/api", auth))
                pools = [p.name for p in config.prefect.work_pools]
                drain = stack.enter_context(
                    drained(client, pools, config.prefect.drain_timeout, "the Prefect server", vm)
                )
                if drain.note():
                    changes.append(drain.note())
            if database_restart:  # (Type=notify: back once it accepts connections)
                vm.run(
                    f"systemctl stop {SERVER_UNIT} && systemctl restart {POSTGRES_UNIT}",
                    sudo=True,
                    timeout=600,
                )
            if why:
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
