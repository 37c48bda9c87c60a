"""The Prefect server's PostgreSQL role: its password, kept in a Secret block, and the role and
database made or corrected through psql as the superuser.

The password reaches the VM's database only as its SCRAM verifier, in a file fed to psql on
standard input: never on a command line, in the server's log or in this tool's.
"""

from __future__ import annotations

import secrets
import shlex

from pydantic import SecretStr

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from tasks.database import (
    POSTGRES_UNIT,
    SOCKETS,
    password_in_env,
    scram_verifier,
    verifier_matches,
)
from tasks.server_runs import SERVER_ENV
from tasks.vm import VM


def database_password(
    config: BootstrapConfig, apply: bool = True, host: VM | None = None
) -> SecretStr:
    """The Prefect server's database password, kept in a Secret block; with the block missing,
    the one the VM's server runs with is read back from ``host``, else a new one is made (the
    step sets the role's password to it either way)."""
    from prefect.blocks.system import Secret

    name = config.prefect.database.password_block
    try:
        block = Secret.load(name)
    except ValueError:  # no such block
        block = None
    if block is not None:
        # (the value as stored: Secret.get() would read a password of digits as a number)
        return stored_password(name, block.value.get_secret_value())  # type: ignore[union-attr]
    recovered = None
    if host is not None:
        env = host.run(f"cat {SERVER_ENV}", sudo=host.privileged, check=False)
        recovered = password_in_env(env.stdout) if env.ok else None
    value = recovered or secrets.token_urlsafe(32)
    if apply:
        Secret(value=SecretStr(value)).save(name, overwrite=True)
        logger().info(
            "%s the VM's database password, kept as Secret block %r",
            "recovered from the VM's server" if recovered else "created",
            name,
        )
    return SecretStr(value)


def stored_password(name: str, stored: object) -> SecretStr:
    """The password a Secret block ``name`` holds; a block holding anything but a non-empty
    string is refused, naming it (a new password saved over it would lose what it held)."""
    if isinstance(stored, str) and stored:
        return SecretStr(stored)
    raise BootstrapError(
        f"Secret block {name!r} (prefect.database.password_block) holds "
        + ("an empty string" if stored == "" else f"a value of type {type(stored).__name__}")
        + ", not the database password: put the password there as a string, or name "
        "another block (nothing was changed)"
    )


def psql(config: BootstrapConfig, version: str, port: int | None = None) -> str:
    """psql as the superuser, through the local socket of ``port`` (the configured one unless
    given), from the login user's sudo."""
    port = port or config.prefect.database.port
    return (
        f"cd / && sudo -n -u postgres /usr/lib/postgresql/{version}/bin/psql -X -q "
        f"-v ON_ERROR_STOP=1 -h {SOCKETS} -p {port} -d postgres"
    )


def role_state(
    vm: VM, config: BootstrapConfig, version: str, port: int | None = None
) -> tuple[str | None, bool]:
    """The role's stored verifier (None: no role; "": no password) and whether its database
    exists."""
    db = config.prefect.database
    query = (
        f"SELECT 'role=' || coalesce(rolpassword, '') FROM pg_authid WHERE rolname = '{db.user}'"
        f" UNION ALL SELECT 'database=1' FROM pg_database WHERE datname = '{db.name}'"
    )
    out = vm.run(f"{psql(config, version, port)} -At -c {shlex.quote(query)}").stdout
    lines = out.splitlines()
    stored = next((line[5:] for line in lines if line.startswith("role=")), None)
    return stored, "database=1" in lines


def role_sql(config: BootstrapConfig, verifier: str | None, database: bool) -> str:
    """The role (its password set to ``verifier`` unless None) and its database, each only
    when missing or different."""
    db = config.prefect.database
    lines = [
        f"SELECT 'CREATE ROLE {db.user} LOGIN' "
        f"WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{db.user}')\\gexec"
    ]
    if verifier is not None:
        lines.append(f"ALTER ROLE {db.user} WITH LOGIN PASSWORD '{verifier}';")
    if not database:
        lines += [
            f"CREATE DATABASE {db.name} OWNER {db.user};",
            f"\\connect {db.name}",
            # Prefect's migrations need it; made here, whatever the role may make
            "CREATE EXTENSION IF NOT EXISTS pg_trgm;",
        ]
    return "\n".join(lines) + "\n"


def fed_from(command: str, path: str) -> str:
    """``command`` reading the uploaded ``path`` on standard input (the login user's shell
    opens it); the file's private folder goes when that shell ends, whatever ends it."""
    return (
        f'f={shlex.quote(path)}; trap \'rm -rf "$(dirname "$f")"\' EXIT; '
        "trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM; "
        f'{command} < "$f"'
    )


def converge_role(
    vm: VM,
    config: BootstrapConfig,
    version: str,
    password: SecretStr,
    apply: bool,
    port: int | None = None,
) -> list[str]:
    """The server's role with ``password`` and its database, in the cluster on ``port`` (the
    configured one unless given: a cluster whose restart onto it is still to come)."""
    stored, database = role_state(vm, config, version, port)
    value = password.get_secret_value()
    fresh = stored is None or not verifier_matches(stored, value)
    changes = []
    if stored is None:
        changes.append(f"role {config.prefect.database.user}")
    elif fresh:
        changes.append("the role's password")
    if not database:
        changes.append(f"database {config.prefect.database.name}")
    if not changes or not apply:
        return changes
    verifier = scram_verifier(value, secrets.token_bytes(16)) if fresh else None
    path = vm.upload(role_sql(config, verifier, database).encode())
    # psql's errors are not repeated: they may quote the verifier
    r = vm.run(fed_from(psql(config, version, port), path), check=False)
    if not r.ok:
        raise BootstrapError(
            f"PostgreSQL on {vm.host} did not take the role and database of the Prefect server "
            f"(psql exited {r.code}); see `journalctl -u {POSTGRES_UNIT}` there"
        )
    return changes
