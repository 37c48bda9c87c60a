"""Each guest's own cgroup subtree, as each VM has its own kernel.

``systemd-nspawn --keep-unit --register=no`` puts the guest in a ``payload`` cgroup below the one
it was started from. With no host systemd to give each guest a scope, every guest would land in
the same ``/payload``, and their systemds would share one tree: ``system.slice/ssh.service`` would
hold every guest's sshd, so a unit one guest stops or restarts (its sshd at power-off, a unit a
configure step restarts) kills the processes of the same unit in every other guest, and a guest
booting beside others can lose its sshd or cloud-init's stages mid-way.

So each supervisor moves itself, before it starts nspawn, into a cgroup of its own guest in
every hierarchy systemd manages: the named v1 ``name=systemd`` one and the unified (v2) one.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = "sails-sandbox"


def hierarchies() -> list[Path]:
    """Mount points of the hierarchies a guest's systemd manages (v2, and v1 ``name=systemd``)."""
    found: list[Path] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if " - " not in line:
            continue
        post = line.split(" - ", 1)[1].split()
        fstype, options = post[0], post[2] if len(post) > 2 else ""
        if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options.split(",")):
            found.append(Path(fields[4]))
    return found


def path(hierarchy: Path, tag: str, name: str) -> Path:
    return hierarchy / ROOT / tag / name


def enter(tag: str, name: str) -> list[str]:
    """Move the calling process into the guest's cgroups (created as needed); return the
    problems met (a host that does not let us: the guest still boots, sharing its parent's)."""
    problems = []
    for hierarchy in hierarchies():
        target = path(hierarchy, tag, name)
        try:
            target.mkdir(parents=True, exist_ok=True)
            (target / "cgroup.procs").write_text(f"{os.getpid()}\n")
        except OSError as exc:
            problems.append(f"{target}: {exc}")
    return problems


def _remove_tree(top: Path) -> None:
    """rmdir every cgroup below and at ``top``, deepest first (a cgroup with processes stays)."""
    if not top.is_dir():
        return
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -w[0].count(os.sep)):
        try:
            os.rmdir(dirpath)
        except OSError:
            continue


def remove(tag: str, name: str) -> None:
    """Remove the guest's cgroups (once its processes are gone)."""
    for hierarchy in hierarchies():
        _remove_tree(path(hierarchy, tag, name))


def remove_all(tag: str) -> None:
    """Remove every empty guest cgroup of one guests directory (leftovers of a crashed run)."""
    for hierarchy in hierarchies():
        _remove_tree(hierarchy / ROOT / tag)
