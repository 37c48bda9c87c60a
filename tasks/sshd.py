"""SSH access to the VM: the team's keys in the login user's authorized_keys, and sshd's
keepalive for silent sessions."""

from __future__ import annotations

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.records import Action
from tasks.vm import VM, StepRecord, planned


# -- operator keys -----------------------------------------------------------------------------
def ensure_operator_keys(vm: VM, config: BootstrapConfig, apply: bool = True) -> StepRecord:
    """Add listed team keys; remove only keys this tool added earlier and no longer lists."""
    home = f"/home/{config.server.user}"
    auth_file, ledger = f"{home}/.ssh/authorized_keys", f"{home}/.ssh/sails-bootstrap-keys"
    current = vm.run(f"cat {auth_file} 2>/dev/null || true").stdout.splitlines()
    added_before = vm.run(f"cat {ledger} 2>/dev/null || true").stdout.splitlines()
    wanted = list(dict.fromkeys(k.strip() for k in config.ssh.operator_keys))

    def ident(line: str) -> tuple[str, ...]:
        return tuple(line.split()[:2])

    protected = {ident(vm.login_key)} if vm.login_key else set()
    wanted_ids = {ident(k) for k in wanted}
    removable = {ident(k) for k in added_before} - wanted_ids - protected
    kept = [line for line in current if ident(line) not in removable]
    have = {ident(line) for line in kept}
    new = [k for k in wanted if ident(k) not in have]
    removed = len(current) - len(kept)
    ours_before = {ident(k) for k in added_before}
    ledger_lines = [k for k in wanted if ident(k) in ours_before or k in new]
    if new or removed:
        vm.write_file(
            auth_file,
            "\n".join([*kept, *new]) + "\n",
            mode="0600",
            owner=f"{config.server.user}:{config.server.user}",
            sudo=False,
            apply=apply,
        )
    if sorted(ledger_lines) != sorted(added_before):
        vm.write_file(
            ledger,
            "\n".join(ledger_lines) + ("\n" if ledger_lines else ""),
            mode="0600",
            owner=f"{config.server.user}:{config.server.user}",
            sudo=False,
            apply=apply,
        )
    changed = bool(new or removed)
    return StepRecord(
        name="operator keys",
        action=Action.CHANGE if changed else Action.KEEP,
        applied=apply,
        reason=(
            planned([f"added {len(new)}, removed {removed}"], apply)
            if changed
            else f"{len(wanted)} team key(s) present"
        ),
    )


# -- sshd keepalive ------------------------------------------------------------------------------
#: Where the VM's sshd takes our settings from (Ubuntu's sshd_config includes the folder first).
SSHD_DROP_IN = "/etc/ssh/sshd_config.d/60-sails-bootstrap.conf"
#: A session whose client went silent (a laptop closed, a network gone) ends after 15 s x 4
#: unanswered keepalives (150 s measured on the sandbox's guests, not TCP's two hours): the VM's
#: lock, held by an SSH session of the run that holds it, does not outlive its run.
SSHD_KEEPALIVE = "ClientAliveInterval 15\nClientAliveCountMax 4\n"


def ensure_sshd_keepalive(vm: VM, apply: bool = True) -> StepRecord:
    """sshd ends sessions whose client stopped answering; the file is checked with ``sshd -t``
    before sshd reloads it (a bad file is removed again, so the next restart still lets us in)."""
    changed = vm.write_file(SSHD_DROP_IN, SSHD_KEEPALIVE, mode="0644", apply=apply)
    if changed and apply:
        check = vm.run("sshd -t", sudo=True, check=False)
        if not check.ok:
            vm.run(f"rm -f {SSHD_DROP_IN}", sudo=True)
            raise BootstrapError(f"sshd refused {SSHD_DROP_IN}: {check.stderr.strip()}")
        vm.run("systemctl try-reload-or-restart ssh.service", sudo=True)
    return StepRecord(
        name="sshd keepalive",
        action=Action.CHANGE if changed else Action.KEEP,
        applied=apply,
        reason=planned([f"wrote {SSHD_DROP_IN}, reloaded sshd"], apply)
        if changed
        else "silent sessions end after 4 unanswered keepalives",
    )
