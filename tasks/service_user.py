"""The user the Prefect server, its workers and so every flow run run as (``prefect.user``).

Anyone who can deploy pipeline code runs code as this user (Prefect OSS has no RBAC), so it is
not the login user: it has no password, no SSH keys and no sudo but one rule, a root-owned
helper that starts, stops and reads the journal of the environment's own units (the repairs'
only need for root: remount and the health check run as this user on the VM). The login user
keeps its sudo for configure, run from an operator's machine.
"""

from __future__ import annotations

import shlex

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.records import Action
from tasks.vm import MANAGED, VM, Result, StepRecord, planned
from tasks.vm_lock import VM_LOCK_DIR

#: The helper the service user may run as root, and the sudoers rule that allows only it.
UNITS_HELPER = "/usr/local/sbin/sails-units"
SUDOERS = "/etc/sudoers.d/sails-bootstrap"
#: The units the helper acts on: the server, the workers (one per pool) and the /arc mount.
UNIT_PATTERNS = ("prefect-server.service", "prefect-worker@*.service", "sails-arc.service")
VERBS = ("start", "stop", "restart", "try-restart", "reset-failed", "journal")
#: Groups that give root (or read every log): the service user is in none of them.
ADMIN_GROUPS = ("sudo", "admin", "wheel", "adm", "systemd-journal", "lxd", "docker")


def helper_text() -> str:
    units = "|".join(UNIT_PATTERNS)
    return f"""#!/bin/sh
{MANAGED}
# The service user's only root: the environment's own units ({", ".join(VERBS)}).
set -eu
verb=${{1:-}}
unit=${{2:-}}
case "$unit" in
  *[!A-Za-z0-9@._-]*|"") echo "sails-units: no unit named ${{unit:-(none)}}" >&2; exit 2 ;;
esac
case "$unit" in
  {units}) ;;
  *) echo "sails-units: $unit is not a unit of this environment" >&2; exit 2 ;;
esac
case "$verb" in
  start|stop|restart|try-restart|reset-failed) exec /usr/bin/systemctl "$verb" -- "$unit" ;;
  journal) exec /usr/bin/journalctl -u "$unit" -n 30 --no-pager -o cat ;;
  *) echo "usage: sails-units {"|".join(VERBS)} UNIT" >&2; exit 2 ;;
esac
"""


def sudoers_text(config: BootstrapConfig) -> str:
    return f"{MANAGED}\n{config.prefect.user} ALL=(root) NOPASSWD: {UNITS_HELPER}\n"


def as_service_user(config: BootstrapConfig, command: str) -> str:
    """``command`` (a shell command) as the service user: as it is on the VM, through sudo from
    the login user (only that user opens its FUSE mount of /arc and signals its processes)."""
    user = shlex.quote(config.prefect.user)
    q = shlex.quote(command)
    # (through sudo: from its own home, as the login user's is closed to it)
    there = shlex.quote(f"cd 2>/dev/null; {command}")
    return f'if [ "$(id -un)" = {user} ]; then sh -c {q}; else sudo -n -u {user} sh -c {there}; fi'


def systemctl(host: VM, verb: str, unit: str, *, check: bool = True, timeout: float = 60) -> Result:
    """``systemctl VERB UNIT`` (``journal``: its last lines) for one of the environment's
    units: with the login user's sudo, or as the service user through the helper."""
    if verb not in VERBS:
        raise ValueError(verb)
    if not host.privileged:
        cmd = f"sudo -n {UNITS_HELPER} {verb} {shlex.quote(unit)}"
        return host.run(cmd, check=check, timeout=timeout)
    q = shlex.quote(unit)
    cmd = f"systemctl {verb} {q}"
    if verb == "journal":
        cmd = f"journalctl -u {q} -n 30 --no-pager -o cat"
    return host.run(cmd, sudo=True, check=check, timeout=timeout)


def service_home(config: BootstrapConfig) -> str:
    return f"/home/{config.prefect.user}"


def service_dirs(vm: VM, config: BootstrapConfig, *files: str) -> None:
    """The folders of ``files`` made by the service user itself (0700): a folder root made
    would keep that user from replacing its own files later (reauth on the VM)."""
    dirs = " ".join(shlex.quote(f.rsplit("/", 1)[0]) for f in files)
    vm.run(as_service_user(config, f"mkdir -p -m 700 {dirs}"), check=False)


def ensure_service_user(vm: VM, config: BootstrapConfig, apply: bool = True) -> StepRecord:
    """The service user with its fixed uid, in no admin group; the units helper, its one sudo
    rule (checked by ``visudo`` before it is installed) and the VM's lock files."""
    p = config.prefect
    user, uid, home = p.user, p.uid, service_home(config)
    q = shlex.quote(user)
    changes: list[str] = []
    entry = vm.run(f"getent passwd {q} || true").stdout.strip()
    if entry:
        fields = entry.split(":")
        if fields[2] != str(uid) or fields[5] != home:
            raise BootstrapError(
                f"prefect.user {user!r} exists on the VM with uid {fields[2]} and home "
                f"{fields[5]}, not uid {uid} and {home}: set prefect.uid to {fields[2]} if it is "
                "the user this environment made, or pick another prefect.user"
            )
    else:
        if apply:
            # (its group may be there already: a run killed between the two commands)
            group = vm.run(f"getent group {q} || true").stdout.strip()
            taken = vm.run(f"getent passwd {uid} || true").stdout.strip()
            if not group:
                taken = taken or vm.run(f"getent group {uid} || true").stdout.strip()
            elif group.split(":")[2] != str(uid):
                taken = f"group {user} with gid {group.split(':')[2]}"
            if taken:
                raise BootstrapError(
                    f"uid/gid {uid} is taken on the VM ({taken.split(':')[0]}): set prefect.uid "
                    "to a free one"
                )
            add_group = "" if group else f"groupadd --gid {uid} {q} && "
            vm.run(
                f"{add_group}useradd --uid {uid} --gid {uid} --create-home "
                f"--home-dir {shlex.quote(home)} --shell /bin/bash "
                f"--comment 'Prefect server and workers (sails-bootstrap)' {q} && "
                f"chmod 0750 {shlex.quote(home)}",
                sudo=True,
            )
        changes.append(f"created user {user} (uid {uid})")
    if entry or apply:
        groups = set(vm.run(f"id -nG {q}", check=False).stdout.split())
        admin = sorted(groups & set(ADMIN_GROUPS))
        if admin:
            if apply:
                for group in admin:
                    vm.run(f"gpasswd -d {q} {shlex.quote(group)}", sudo=True)
            changes.append(f"removed {user} from {', '.join(admin)}")
    if vm.write_file(UNITS_HELPER, helper_text(), mode="0755", apply=apply):
        changes.append(f"wrote {UNITS_HELPER}")
    # installed only once `visudo -c` accepts it: a broken file in sudoers.d would lock the
    # login user out of sudo (sudoers.d is root's alone: read through sudo)
    sudoers = sudoers_text(config)
    if vm.write_file(SUDOERS, sudoers, mode="0440", apply=apply, verify="visudo -cq -f"):
        changes.append(f"wrote {SUDOERS}")
    lock = f"{VM_LOCK_DIR}/vm.lock {VM_LOCK_DIR}/vm.holder"
    modes = vm.run(f"stat -c %a {lock} 2>/dev/null || true").stdout.split()
    if modes != ["666", "666"]:
        if apply:
            vm.run(
                f"install -d -m 0755 {VM_LOCK_DIR} && touch {lock} && chmod 0666 {lock}",
                sudo=True,
            )
        changes.append("the VM's lock files")
    return StepRecord(
        name="service user",
        action=Action.CHANGE if changes else Action.KEEP,
        applied=apply,
        reason=planned(changes, apply) or f"{user} (uid {uid}); sudo: {UNITS_HELPER} only",
    )
