"""Powering a guest on: its supervisor, the waits for systemd and for SSH, start and reboot."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sandbox import latency, layout, net
from sandbox.guests import firewall
from sandbox.guests.prepare import _ensure_netns, _mount_overlay, _prepare
from sandbox.guests.state import (
    GuestError,
    GuestSpec,
    _container_pid1,
    _dir,
    _kill,
    _load,
    _run,
    _set_power,
    _supervisor_pid,
    _tail,
    _wait_gone,
    guests_dir,
    power_state,
)
from sandbox.guests.teardown import destroy_guest, stop_guest


def _launch_supervisor(name: str) -> int:
    d = _dir(name)
    log = open(d / "supervisor.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox.guests.supervisor", str(d)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # outlives its caller (the Nova compute process, a test)
            close_fds=True,
            cwd="/",
            env={
                **os.environ,
                "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                "SAILS_SANDBOX_STATE": str(layout.STATE_DIR),
                "SAILS_SANDBOX_CACHE": str(layout.CACHE_DIR),
            },
        )
    finally:
        log.close()
    (d / "supervisor.pid").write_text(f"{proc.pid}\n")
    return proc.pid


# -- life cycle --------------------------------------------------------------------------------
def _stopped_while_booting(name: str, down_since: list[float], grace: float = 3.0) -> bool:
    """Stopped for ``grace`` seconds in a row: a single look can fall between the supervisor's
    fork and nspawn's exec (more likely when several guests start at once)."""
    if power_state(name) == "running":
        down_since.clear()
        return False
    if not down_since:
        down_since.append(time.monotonic())
    return time.monotonic() - down_since[0] >= grace


def _systemd_running(pid: int) -> bool:
    """The guest's PID 1 has become systemd (not nspawn's child still setting up)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def _wait_pid1(name: str, deadline: float, previous_pid1: int | None = None) -> int:
    """Until the guest's systemd runs as its PID 1 (a hypervisor's "the domain runs")."""
    down_since: list[float] = []
    while True:
        pid1 = _container_pid1(name)
        if pid1 and pid1 != previous_pid1 and _systemd_running(pid1):
            return pid1
        if _stopped_while_booting(name, down_since):
            raise GuestError(f"guest {name} stopped while booting: {_tail(name)}")
        if time.monotonic() > deadline:
            raise GuestError(f"guest {name} did not start within its time: {_tail(name)}")
        time.sleep(0.05)


def _failed_units(pid1: int) -> str:
    """The guest's failed units, for an error message ('' when none or unreadable)."""
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        out = _run(
            "nsenter", "-t", str(pid1), "-m", "-u", "-i", "-n", "-p",
            "systemctl", "--failed", "--no-legend", "--plain",
            check=False, timeout=10,
        ).stdout  # fmt: skip
        return ", ".join(line.split()[0] for line in out.splitlines() if line.strip())
    return ""


def _wait_ready(spec: GuestSpec, timeout: float, previous_pid1: int | None = None) -> None:
    """Until sshd answers on ip:22 and ``systemctl is-system-running --wait`` has settled
    (cloud-init's stages included)."""
    name = spec.name
    deadline = time.monotonic() + timeout
    pid1 = _wait_pid1(name, deadline, previous_pid1)
    down_since: list[float] = []
    while True:
        try:
            with socket.create_connection((spec.ip, 22), timeout=2) as s:
                s.settimeout(5)
                if s.recv(64).startswith(b"SSH-"):
                    break
        except OSError:
            pass
        if _stopped_while_booting(name, down_since):
            raise GuestError(f"guest {name} stopped while booting: {_tail(name)}")
        if time.monotonic() > deadline:
            raise GuestError(
                f"guest {name} did not answer SSH on {spec.ip}:22 within {timeout:.0f} s "
                f"(failed units: {_failed_units(pid1) or 'none'}): {_tail(name)}"
            )
        time.sleep(0.1)
    left = max(5.0, deadline - time.monotonic())
    state = ""
    with contextlib.suppress(subprocess.TimeoutExpired):
        state = _run(
            "nsenter", "-t", str(pid1), "-m", "-u", "-i", "-n", "-p",
            "systemctl", "is-system-running", "--wait",
            check=False, timeout=left,
        ).stdout.strip()  # fmt: skip
    if state not in ("running", "degraded"):
        raise GuestError(f"guest {name} did not settle (is-system-running: {state or 'timeout'})")


def start_guest(
    spec: GuestSpec, timeout: float = 90, wait: bool = True, seed: Path | None = None
) -> None:
    """Create or power on the guest.

    ``wait=True`` (tests): return once its sshd answers and its boot has settled, cloud-init's
    first boot included. ``wait=False`` (the Nova driver): return once its systemd runs as PID 1,
    as a hypervisor reports a server ACTIVE while the guest's OS is still booting.
    ``seed``: a config drive tree (a directory, e.g. Nova's) for the first boot; without it the
    guest gets ``seed_files(spec)``. A guest that exists keeps what it was built with.

    Raises GuestError after cleaning up: a new guest is destroyed, an existing one is left
    powered off with its disk state.
    """
    if power_state(spec.name) == "running":
        return
    first_boot = not (_dir(spec.name) / "guest.json").exists()
    if first_boot and latency.get("boot"):
        time.sleep(latency.get("boot"))  # benchmarks: a cloud's build time
    net.ensure_network()
    guests_dir().mkdir(parents=True, exist_ok=True)
    try:
        if first_boot:
            _prepare(spec, seed)
        else:
            spec = GuestSpec(**_load(spec.name)["spec"])  # the guest keeps what it was built with
        _ensure_netns(spec.name, spec)
        firewall.restore(spec.name)  # its security groups (Nova guests), before it boots
        _mount_overlay(spec.name)
        # a supervisor still winding down after a power-off must be gone before the next one
        if not _wait_gone(lambda: _supervisor_pid(spec.name), 5):
            _kill(_supervisor_pid(spec.name), signal.SIGKILL)
        _set_power(spec.name, "on")
        _launch_supervisor(spec.name)
        if wait:
            _wait_ready(spec, timeout)
        else:
            _wait_pid1(spec.name, time.monotonic() + timeout)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            if first_boot:
                destroy_guest(spec.name)
            else:
                stop_guest(spec.name, timeout=10)
        if isinstance(exc, GuestError):
            raise
        if isinstance(exc, Exception):
            raise GuestError(f"guest {spec.name} did not start: {exc}") from exc
        raise


def reboot_guest(name: str, hard: bool = False, wait: bool = True) -> None:
    """Reboot a running guest (soft: systemd's reboot; hard: kill and boot again).

    A guest that is not running is powered on. Returns once it is ready again (``wait``), or
    once its systemd runs again (``wait=False``, as a hypervisor reports it).
    """
    data = _load(name) if (_dir(name) / "guest.json").exists() else None
    if data is None:
        raise GuestError(f"no guest {name}")
    spec = GuestSpec(**data["spec"])
    pid1 = _container_pid1(name)
    if power_state(name) != "running" or pid1 is None or not _supervisor_pid(name):
        stop_guest(name, timeout=10)
        start_guest(spec, wait=wait)
        return
    _set_power(name, "reboot")
    if hard:
        _kill(pid1, signal.SIGKILL)
    else:
        _kill(pid1, signal.SIGRTMIN + 5)  # systemd: start reboot.target
    if wait:
        _wait_ready(spec, 90, previous_pid1=pid1)
    else:
        _wait_pid1(name, time.monotonic() + 90, previous_pid1=pid1)
