"""The VM's lock: one flock on the VM that every run changing the VM holds, taken over SSH
from the operator's machine or on the VM itself (its deployments)."""

from __future__ import annotations

import os
import shlex
import socket
import time
from typing import Any, Protocol

from core.config import BootstrapConfig
from core.errors import BootstrapError, LockHeldOnVM
from core.log import Progress

#: Where the VM's lock lives: one file for the login user (the operator's runs) and the
#: service user (the VM's deployments) alike; made by root, writable by both.
VM_LOCK_DIR = "/var/lib/sails-bootstrap"

#: The VM's own lock: every run that changes the VM holds it, from the operator's machine (over
#: SSH) or on the VM (its deployments). A flock held by a process that lives as long as the
#: holder's channel: a closed channel, a dropped connection or a killed run frees it.
VM_LOCK = r"""
d={dir}
if ! { [ -w "$d/vm.lock" ] && [ -w "$d/vm.holder" ]; }; then
  { [ -w "$d" ] && touch "$d/vm.lock" "$d/vm.holder" && chmod 0666 "$d/vm.lock" "$d/vm.holder"; } \
    2>/dev/null || sudo -n sh -c "install -d -m 0755 $d && touch $d/vm.lock $d/vm.holder \
    && chmod 0666 $d/vm.lock $d/vm.holder" 2>/dev/null \
    || { echo "error: no $d/vm.lock to lock the VM with (configure makes it)"; exit 4; }
fi
exec 9>>"$d/vm.lock"
i=0
while ! flock -n 9; do
  if [ "$i" -ge {wait} ]; then echo "held $(cat "$d/vm.holder" 2>/dev/null)"; exit 3; fi
  echo "waiting $(cat "$d/vm.holder" 2>/dev/null)"
  sleep 1; i=$((i + 1))
done
printf '%s\n' {holder} > "$d/vm.holder"
echo locked
cat >/dev/null
"""


class Lockable(Protocol):
    """A host whose lock can be held (``tasks.vm.VM`` over SSH, ``LocalHost`` on the VM)."""

    def exclusive(self, environment: str, holder: str, wait: float) -> Any: ...


def vm_exclusive(host: Lockable, config: BootstrapConfig, command: str) -> Any:
    """The VM's lock for a run of ``command`` (the same bound as the local lock's)."""
    wait = float(os.environ.get("SAILS_BOOTSTRAP_LOCK_WAIT", 3600))
    holder = f"`{command}` from {socket.gethostname()}, pid {os.getpid()}, since {time.ctime()}"
    return host.exclusive(config.environment, holder, wait)


def lock_script(holder: str, wait: float, directory: str = VM_LOCK_DIR) -> str:
    script = VM_LOCK.replace("{wait}", str(max(0, round(wait))))
    script = script.replace("{dir}", shlex.quote(directory))
    return script.replace("{holder}", shlex.quote(holder))


def hold_vm_lock(lines: Any, environment: str, wait: float) -> None:
    """Read the lock script's lines until it holds the lock; waiting is said every 30 s, a
    holder past ``wait`` is a LockHeldOnVM naming it."""
    progress = Progress(f"another run on the VM of {environment!r} to end", every=30)
    for raw in lines:
        line = raw.strip()
        if line == "locked":
            return
        if line.startswith("waiting"):
            progress.tick(line.removeprefix("waiting").strip() or "a run that wrote nothing yet")
        elif line.startswith("error:"):
            why = line.removeprefix("error:").strip()
            raise BootstrapError(f"the VM of {environment!r}: {why}")
        elif line.startswith("held"):
            raise LockHeldOnVM(
                f"the VM of {environment!r} is in use by another run "
                f"({line.removeprefix('held').strip() or 'unknown'}); wait for it to end or stop "
                f"it ({wait:.0f} s of waiting were spent; SAILS_BOOTSTRAP_LOCK_WAIT sets the bound)"
            )
    raise BootstrapError("the VM's lock could not be taken (the lock command ended); try again")
