"""A guest's security groups as an nft table in its network namespace, and a dropped SSH session.

The sandbox's Neutron plugin (``sails_cloud_plugins.secgroups``) renders each Nova guest's
ruleset and hands it to ``install``: the script is kept under ``STATE_DIR/secgroups/<guest>.nft``
and, when the guest's namespace exists, loaded there at once (``nft -f``, one atomic
transaction). A guest that is not started yet gets its ruleset from ``restore`` when
``start_guest`` has made its namespace, before the guest boots. Guests with no file (the tests'
own guests, not made through Nova) stay unfiltered.

The guest's root could change the table from inside (nspawn leaves it CAP_NET_ADMIN in its own
namespace); nothing in the images does.

``drop_ssh_connections`` is a VM-side fault: it resets every established TCP connection to the
guest's port 22, as a network blip or a NAT timeout on a real cloud would, so a command in
flight sees its session end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from sandbox import layout

#: nft table (family inet) holding a guest's security-group rules.
TABLE = "sails_sg"
RULES_DIR = layout.STATE_DIR / "secgroups"


def guest_of_server(server_id: str) -> str:
    """The guest behind a Nova server (the name the sandbox's Nova driver gives it)."""
    return "os-" + server_id.replace("-", "")[:12]


def rules_file(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad guest name {name!r}")
    return RULES_DIR / f"{name}.nft"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One lock for every file and table: a writer and a starting guest never interleave."""
    RULES_DIR.mkdir(parents=True, exist_ok=True)
    with open(RULES_DIR / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def netns(name: str) -> str | None:
    """The guest's network namespace, if it exists now."""
    from sandbox import guests

    record = guests.GUESTS_DIR / name / "guest.json"
    try:
        ns = json.loads(record.read_text())["names"]["netns"]
    except (OSError, ValueError, KeyError):
        ns = guests._names(name)["netns"]
    return ns if Path(f"/run/netns/{ns}").exists() else None


def _nft(ns: str, script: str) -> None:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nft in {ns}: {proc.stderr.strip()}")


def _remove_table(ns: str) -> None:
    _nft(ns, f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")


def install(name: str, script: str | None) -> bool:
    """Keep ``script`` as the guest's ruleset and load it if the guest's namespace exists;
    ``None`` removes the ruleset (the guest becomes unfiltered). True when loaded now."""
    path = rules_file(name)
    with _locked():
        if script is None:
            path.unlink(missing_ok=True)
        else:
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(script)
            tmp.replace(path)
        ns = netns(name)
        if ns is None:
            return False
        if script is None:
            _remove_table(ns)
        else:
            _nft(ns, script)
        return True


def installed() -> list[str]:
    """Guests that have a ruleset file."""
    if not RULES_DIR.is_dir():
        return []
    return sorted(p.stem for p in RULES_DIR.glob("*.nft"))


def restore(name: str) -> bool:
    """Load the guest's kept ruleset into its namespace (start_guest calls this once the
    namespace exists). False when the guest has none."""
    with _locked():
        path = rules_file(name)
        ns = netns(name)
        if ns is None or not path.exists():
            return False
        _nft(ns, path.read_text())
        return True


def ruleset(name: str) -> str:
    """The guest's table as the kernel has it now ('' when there is none)."""
    ns = netns(name)
    if ns is None:
        return ""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "table", "inet", TABLE],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout if proc.returncode == 0 else ""


def drop_ssh_connections(name: str) -> int:
    """Reset every established TCP connection to the guest's port 22; return how many.

    The guest's end of each socket is aborted (``ss -K``), which sends the client a reset and
    ends the guest's sshd session, and with it the command it was running.
    """
    ns = netns(name)
    if ns is None:
        return 0
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "ss", "-K", "-t", "-n", "-H", "state", "established",
         "( sport = :22 )"],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"ss -K in {ns}: {proc.stderr.strip()}")
    return len([line for line in proc.stdout.splitlines() if line.strip()])
