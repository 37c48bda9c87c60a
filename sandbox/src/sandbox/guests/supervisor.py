"""One guest's supervisor: runs systemd-nspawn and boots the guest again after a reboot.

systemd-nspawn exits with 133 when the guest reboots (``sudo reboot`` inside, or the host's
soft reboot); a VM comes back, so the supervisor launches it again, after plugging the
guest's disks again (each boot has a fresh /dev). Any other exit is a power-off: the supervisor
records ``off`` in the guest's ``power`` file and ends. The host asks for a power-off by writing
``off`` there before signalling nspawn, or by sending SIGTERM to the supervisor.

Run as ``python -m sandbox.guests.supervisor GUEST_DIR`` in its own session: it outlives its
caller (the Nova compute process, a test).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sandbox import guests
from sandbox.guests import cgroups

#: More reboots than this within REBOOT_WINDOW seconds: the guest is failing, leave it off.
MAX_QUICK_REBOOTS = 5
REBOOT_WINDOW = 30.0


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} [{os.getpid()}] {message}", flush=True)


def nspawn_argv(guest_dir: Path, spec: dict, names: dict) -> list[str]:
    return [
        "systemd-nspawn",
        "--quiet",
        f"--directory={guest_dir / 'root'}",
        "--boot",
        "--register=no",
        "--keep-unit",
        f"--machine={names['machine']}",
        f"--hostname={spec['hostname']}",
        f"--network-namespace-path=/run/netns/{names['netns']}",
        "--capability=CAP_SYS_ADMIN,CAP_MKNOD",
        "--console=read-only",
        "--resolv-conf=off",
        "--timezone=off",
        "--link-journal=no",
        "--setenv=SYSTEMD_COLORS=0",
        # arguments of the guest's systemd: its boot progress on the console, as a VM shows it
        "--",
        "--show-status=yes",
    ]


def main(guest_dir: str) -> int:
    if os.sep in guest_dir:
        d = Path(guest_dir).resolve()
        guests.GUESTS_DIR = d.parent  # the guests directory its caller used
    else:  # a bare guest name: under the state directory's guests
        d = guests.GUESTS_DIR / guest_dir
    name = d.name
    data = guests._load(name)
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        guests._set_power(name, "off")
        guests._kill(guests._nspawn_pid(name), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # its own cgroups, which nspawn (and the guest's systemd below it) inherits
    for problem in cgroups.enter(guests._tag(), name):
        _log(f"no cgroup of its own: {problem}")
    reboots: list[float] = []
    code = 0
    while not stopping and guests._power_request(name) != "off":
        try:
            guests._plug_all(name)
        except Exception as exc:  # boot anyway: a missing volume file must not keep it off
            _log(f"plugging disks: {exc}")
        with open(d / "console.log", "ab") as console:
            proc = subprocess.Popen(
                nspawn_argv(d, data["spec"], data["names"]),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                cwd="/",
            )
        (d / "nspawn.pid").write_text(f"{proc.pid}\n")
        _log(f"nspawn {proc.pid} started")
        if stopping:  # asked to stop while launching
            proc.terminate()
        code = proc.wait()
        request = guests._power_request(name)
        _log(f"nspawn {proc.pid} exited {code}; host request {request!r}")
        if stopping or request == "off":
            break
        if code == guests.REBOOT_EXIT or request == "reboot":
            now = time.monotonic()
            reboots = [t for t in reboots if now - t < REBOOT_WINDOW] + [now]
            if len(reboots) > MAX_QUICK_REBOOTS:
                _log("rebooting in a loop: leaving the guest off")
                break
            guests._set_power(name, "on")
            continue
        break  # powered off from inside (or crashed): it stays off, as a VM would
    guests._set_power(name, "off")
    (d / "nspawn.pid").unlink(missing_ok=True)
    _log("guest off")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
