"""One guest's supervisor: runs systemd-nspawn, and relaunches it after a reboot from inside.

systemd-nspawn exits with 133 when the guest reboots; a VM comes back, so the supervisor starts
it again. Any other exit is a power-off. The host asks for a reboot or a power-off by writing
``reboot`` or ``off`` to the guest's ``power`` file before signalling nspawn.

Run as ``python -m sandbox.guests.supervisor NAME`` in its own session (it outlives its caller).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from sandbox.guests import GUESTS_DIR, _netns, _plug_all

REBOOT_EXIT = 133


def main(name: str) -> int:
    d = GUESTS_DIR / name
    spec = json.loads((d / "guest.json").read_text())["spec"]
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True
        try:
            pid = int((d / "nspawn.pid").read_text())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            pass

    signal.signal(signal.SIGTERM, on_term)
    while True:
        _plug_all(name)
        with open(d / "console.log", "ab") as console:
            proc = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--quiet",
                    "-D",
                    str(d / "root"),
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    f"--machine={_netns(name)}",
                    f"--hostname={spec['hostname']}",
                    f"--network-namespace-path=/run/netns/{_netns(name)}",
                    "--capability=CAP_SYS_ADMIN,CAP_MKNOD",
                    "--console=pipe",
                    "--resolv-conf=off",
                    "--timezone=off",
                    "--link-journal=no",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
            )
        (d / "nspawn.pid").write_text(f"{proc.pid}\n")
        code = proc.wait()
        power = (d / "power").read_text().strip() if (d / "power").exists() else "on"
        if stop or power == "off":
            break
        if code == REBOOT_EXIT or power == "reboot":
            (d / "power").write_text("on\n")
            time.sleep(0.2)
            continue
        break  # powered off from inside (or crashed): stays off, as a VM would
    (d / "power").write_text("off\n")
    (d / "nspawn.pid").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
