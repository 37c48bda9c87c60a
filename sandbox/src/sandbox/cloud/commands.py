"""One-shot setup commands of the sandbox cloud (database init, schema syncs, host discovery):
where the services venv keeps its console scripts, and running a command to completion with
its output appended to STATE_DIR/logs/setup-<name>.log."""

from __future__ import annotations

import subprocess

from sandbox.cloud import common as c
from sandbox.cloud import procs


def venv_bin(name: str) -> str:
    return str(c.VENV_BIN / name)


def run_setup(argv: list[str], name: str) -> None:
    if name != "keystone":
        # keystone's chain is the one everything waits for: let it have the CPU first.
        argv = ["nice", "-n", "10", *argv]
    c.LOGS.mkdir(parents=True, exist_ok=True)
    with procs.log_file(f"setup-{name}").open("ab") as log:
        log.write(f"\n=== {' '.join(argv)}\n".encode())
        log.flush()
        rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed (rc={rc.returncode}); see {procs.log_file('setup-' + name)}"
        )
