"""systemd units on the VM: written, loaded and enabled in one way; when what runs restarts
(at once, or once the runs in flight ended) is each step's own decision."""

from __future__ import annotations

import shlex

from tasks.vm import VM


def install_unit(vm: VM, path: str, text: str, apply: bool = True) -> bool:
    """The unit file (or drop-in) at ``path`` holds ``text``; systemd reloaded when it changed.
    Whether it changed (or would)."""
    written = vm.write_file(path, text, apply=apply)
    if written and apply:
        vm.run("systemctl daemon-reload", sudo=True)
    return written


def unit_enabled(vm: VM, unit: str) -> bool:
    return vm.run(f"systemctl is-enabled --quiet {shlex.quote(unit)}", check=False).ok


def enable_unit(vm: VM, unit: str, apply: bool = True) -> bool:
    """``unit`` starts at boot. Whether it did not (and now does, when applying)."""
    if unit_enabled(vm, unit):
        return False
    if apply:
        vm.run(f"systemctl enable {shlex.quote(unit)}", sudo=True)
    return True


def unit_active(vm: VM, unit: str) -> bool:
    return vm.run(f"systemctl is-active --quiet {shlex.quote(unit)}", check=False).ok
