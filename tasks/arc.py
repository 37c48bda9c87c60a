"""CANFAR's /arc on the VM: its key, the sshfs mount as a systemd unit, a probe that never hangs.

A frozen sshfs server makes any access to the mount block in the kernel, where no timeout or
signal can reach the caller. So the probe runs the access in a detached process on the VM and
only polls for its result with a deadline; the SSH command itself always returns.
"""

from __future__ import annotations

import shlex

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from core.records import Action
from tasks.blocks import load_block
from tasks.service_user import as_service_user, service_dirs, service_home, systemctl
from tasks.units import enable_unit, install_unit, unit_active
from tasks.vm import MANAGED, VM, StepRecord, planned

UNIT = "sails-arc.service"
#: The unit gives up after this many starts within this many seconds (until reset-failed).
START_LIMIT_BURST = 5
START_LIMIT_INTERVAL = 1800
#: The pinned /arc host keys (config arc.host_keys): root's file, read by the unit's ssh.
ARC_KNOWN_HOSTS = "/etc/sails-bootstrap/arc_known_hosts"


def home(config: BootstrapConfig) -> str:
    """The service user's home (``~`` in the arc paths): the mount and key are that user's."""
    return service_home(config)


def vm_path(config: BootstrapConfig, path: str) -> str:
    return path.replace("~", home(config), 1) if path.startswith("~") else path


def arc_user(config: BootstrapConfig, canfar_username: str | None) -> str:
    user = config.arc.user or canfar_username
    if not user:
        raise BootstrapError("no /arc user: set arc.user or the CanfarCredentials username")
    return user


class ArcKeyRecord(StepRecord):
    """The key the VM's /arc mount logs in with: its public line (for CANFAR to trust) and path."""

    public_key: str = ""
    path: str = ""


def ensure_canfar_key(vm: VM, config: BootstrapConfig, apply: bool = True) -> ArcKeyRecord:
    """The VM's key for /arc: from the key block CANFAR trusts, else generated once (RSA 4096,
    as CANFAR documents). An existing key is never replaced."""
    key = vm_path(config, config.arc.key_path)
    q = shlex.quote(key)
    user = config.prefect.user
    exists = vm.run(as_service_user(config, f"test -f {q} && test -f {q}.pub"), check=False).ok
    reason = "present (kept)"
    if not exists and not apply:
        source = (
            f"install it from block {config.arc.key_block!r}"
            if config.arc.key_block
            else "generate one (RSA 4096) for CANFAR to trust"
        )
        return ArcKeyRecord(
            name="canfar key",
            action=Action.CREATE,
            applied=False,
            reason=f"pending: no {key}; {source}",
            path=key,
        )
    if not exists and config.arc.key_block:
        from blocks.ssh import SSHKeyPair

        block = load_block(
            SSHKeyPair,
            config.arc.key_block,
            "(arc.key_block) save the key CANFAR already trusts under that name (its public "
            "line is in ~/.ssh/authorized_keys of your CANFAR home), or remove arc.key_block to "
            "have a key generated on the VM",
        )
        service_dirs(vm, config, key)
        vm.write_file(
            key,
            block.private_key.get_secret_value(),
            mode="0600",
            owner=f"{user}:{user}",
            sudo=vm.privileged,
        )
        vm.write_file(
            f"{key}.pub",
            block.public_key + "\n",
            mode="0644",
            owner=f"{user}:{user}",
            sudo=vm.privileged,
        )
        reason = f"installed from block {config.arc.key_block!r} ({block.fingerprint})"
    elif not exists:
        vm.run(
            as_service_user(
                config,
                f"mkdir -p -m 700 $(dirname {q}) && ssh-keygen -q -t rsa -b 4096 -N '' "
                f"-C {shlex.quote(config.environment + '-arc')} -f {q}",
            )
        )
        reason = f"generated {key}"
    public = vm.run(as_service_user(config, f"cat {q}.pub")).stdout.strip()
    return ArcKeyRecord(
        name="canfar key",
        action=Action.KEEP if exists else Action.CREATE,
        reason=reason,
        public_key=public,
        path=key,
    )


def last_lines(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])


def known_hosts_text(config: BootstrapConfig) -> str:
    """known_hosts lines for the pinned /arc host keys (OpenSSH's [host]:port form)."""
    arc = config.arc
    name = arc.host if arc.port == 22 else f"[{arc.host}]:{arc.port}"
    return f"{MANAGED}\n" + "".join(f"{name} {key}\n" for key in arc.host_keys)


def host_key_options(config: BootstrapConfig) -> list[str]:
    """Pinned keys: those alone, anything else refused. Otherwise the first key seen is kept
    (in the user's known_hosts) and a changed one refused."""
    if config.arc.host_keys:
        return [
            f"UserKnownHostsFile={ARC_KNOWN_HOSTS}",
            "GlobalKnownHostsFile=/dev/null",
            "StrictHostKeyChecking=yes",
        ]
    return ["StrictHostKeyChecking=accept-new"]


def ensure_arc_host_keys(vm: VM, config: BootstrapConfig, apply: bool) -> bool:
    """Write the pinned /arc host keys where they differ (a changed pin is repaired here)."""
    if not config.arc.host_keys:
        return False
    if not vm.privileged:  # the service user: root's file, read only
        current = vm.run(f"cat {ARC_KNOWN_HOSTS} 2>/dev/null || true", check=False).stdout
        if current == known_hosts_text(config):
            return False
        raise BootstrapError(
            f"the /arc host keys pinned in {ARC_KNOWN_HOSTS} are not arc.host_keys; that file "
            "is root's: run `sails-bootstrap remount` (or configure) from an operator's machine"
        )
    return vm.write_file(ARC_KNOWN_HOSTS, known_hosts_text(config), apply=apply)


def unit_text(config: BootstrapConfig, user: str) -> str:
    mp = vm_path(config, config.arc.mount_point)
    key = vm_path(config, config.arc.key_path)
    options = ",".join(
        [
            f"IdentityFile={key}",
            *config.arc.options,
            *host_key_options(config),
            "BatchMode=yes",
        ]
    )
    return (
        f"{MANAGED}\n"
        "[Unit]\n"
        "Description=CANFAR /arc over sshfs\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        # While CANFAR does not trust the VM's key yet every start is a failed login: back off
        # (10 s, growing to 5 min where systemd knows RestartSteps) and give up after 5 starts
        # in 30 min, instead of ~360 failed logins an hour. configure and remount reset it.
        f"StartLimitIntervalSec={START_LIMIT_INTERVAL}\n"
        f"StartLimitBurst={START_LIMIT_BURST}\n"
        "[Service]\n"
        f"User={config.prefect.user}\n"
        "Type=simple\n"
        f"ExecStartPre=-/bin/fusermount3 -u -z {mp}\n"
        f"ExecStartPre=/bin/mkdir -p {mp}\n"
        f"ExecStart=/usr/bin/sshfs -f -p {config.arc.port} -o {options} "
        f"{user}@{config.arc.host}:{config.arc.remote_path} {mp}\n"
        f"ExecStopPost=-/bin/fusermount3 -u -z {mp}\n"
        "Restart=always\n"
        "RestartSec=10\n"
        "RestartSteps=4\n"
        "RestartMaxDelaySec=300\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


PROBE = r"""
mp={mp}; deadline={deadline}
if ! pgrep -u {user} -f "sshfs.* $mp\$" >/dev/null; then echo "dead no sshfs process"; exit 0; fi
if ! grep -qs " $mp fuse.sshfs " /proc/mounts; then echo "dead not mounted"; exit 0; fi
rc=$(mktemp)
rm -f "$rc"
# A name never asked before: no cache can answer, only the server.
probe="$mp/.sails-probe-$$-$(date +%s%N)"
check="out=\$(stat '$probe' 2>&1); case \"\$out\" in *'No such file'*) echo 0;; *) echo 1;; esac"
setsid sh -c "$check > '$rc'" </dev/null >/dev/null 2>&1 &
i=0
while [ $i -lt $((deadline * 10)) ]; do
  if [ -s "$rc" ]; then
    code=$(cat "$rc"); rm -f "$rc"
    if [ "$code" = 0 ]; then echo "live"; else echo "dead the server did not answer the lookup"; fi
    exit 0
  fi
  sleep 0.1; i=$((i + 1))
done
echo "stale no answer within {deadline} s"
"""


def probe_arc(vm: VM, config: BootstrapConfig) -> tuple[str, str]:
    """('live'|'stale'|'dead', detail). Returns within the probe timeout plus a few seconds."""
    script = PROBE.format(
        mp=shlex.quote(vm_path(config, config.arc.mount_point)),
        deadline=max(1, round(config.arc.probe_timeout)),
        user=config.prefect.user,
    )
    # as the service user: only the user who mounted a FUSE file system may enter it
    r = vm.run(as_service_user(config, script), timeout=config.arc.probe_timeout + 20, check=False)
    state, _, detail = r.stdout.strip().partition(" ")
    return (state or "dead"), (detail or r.stderr.strip())


def ensure_arc_mount(vm: VM, config: BootstrapConfig, user: str, apply: bool = True) -> StepRecord:
    """sshfs under systemd (back after a reboot, restarted if it dies); verified by listing."""
    log = logger()
    changes = []
    if apply and not vm.run("command -v sshfs", check=False).ok:
        raise BootstrapError(
            f"{vm.host} has no sshfs: the packages step installs it (package 'sshfs'); "
            "see its row for why it did not"
        )
    # A running sshfs keeps its connection: a new pin or unit applies from the next start. One
    # restart after both are written (a restart between them mounted with the old options,
    # and the verification could see that mount).
    pinned = ensure_arc_host_keys(vm, config, apply)
    if pinned:
        changes.append("pinned the /arc host keys")
    written = install_unit(vm, f"/etc/systemd/system/{UNIT}", unit_text(config, user), apply)
    enabled = enable_unit(vm, UNIT, apply)
    if written:
        if apply:
            systemctl(vm, "reset-failed", UNIT, check=False)
            systemctl(vm, "restart", UNIT)
        changes.append(f"wrote {UNIT}")
    elif pinned and apply:
        systemctl(vm, "reset-failed", UNIT, check=False)
        systemctl(vm, "try-restart", UNIT)
    if enabled and not written:
        changes.append("enabled the unit")
    if not unit_active(vm, UNIT):
        if apply:  # after a give-up (start limit hit) too: reset it, then start again
            systemctl(vm, "reset-failed", UNIT, check=False)
            systemctl(vm, "restart", UNIT)
        changes.append("started the unit")
    if changes and not apply:  # nothing was started: there is no mount to verify yet
        return StepRecord(
            name="/arc mount", action=Action.CHANGE, applied=False, reason=planned(changes, apply)
        )
    state, detail = "dead", ""
    for _ in range(20):
        state, detail = probe_arc(vm, config)
        if state == "live" or not apply:  # a plan probes once
            break
        vm.run("sleep 1", check=False)
    if state != "live":
        journal = systemctl(vm, "journal", UNIT, check=False).stdout.strip()
        if "Host key verification failed" in journal:
            return StepRecord(
                name="/arc mount",
                action=Action.BLOCKED,
                applied=apply,
                reason=(
                    f"{state}: the /arc host {config.arc.host} offered a key that is not "
                    + (
                        "one of arc.host_keys; check the host's keys with CANFAR and fix "
                        "arc.host_keys"
                        if config.arc.host_keys
                        else f"the one first seen (in {home(config)}/.ssh/known_hosts); if "
                        "CANFAR changed it, pin the new key in arc.host_keys"
                    )
                    + ", then run configure or remount again"
                ),
            )
        return StepRecord(
            name="/arc mount",
            action=Action.BLOCKED,
            applied=apply,
            reason=(
                f"{state}: {detail}. Add the VM's CANFAR public key (artifact "
                f"'canfar-key-{config.environment}') to ~/.ssh/authorized_keys on CANFAR, "
                f"then run configure again (`sails-bootstrap remount` repairs a stale mount). "
                f"Last log: {last_lines(journal, 5)[-300:]}"
            ),
        )
    if changes:
        log.info("/arc: %s", "; ".join(changes))
    return StepRecord(
        name="/arc mount",
        action=Action.CHANGE if changes else Action.KEEP,
        applied=apply,
        reason="; ".join(changes) or f"{config.arc.host} mounted at {config.arc.mount_point}",
    )
