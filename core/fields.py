"""The value types of the configuration's fields: names, ports, user and host names, paths on
the VM and sshfs options, each admitting only what its field needs."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any

from pydantic import Field, StringConstraints

# Names OpenStack, Prefect block slugs and ssh aliases all accept.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Port = Annotated[int, Field(ge=1, le=65535)]
#: Seconds of one wait in a run: more than none, at most an hour (a bound on every wait the
#: config sets; the steps' own outer bound lies past all of them).
WaitSeconds = Annotated[float, Field(gt=0, le=3600)]

# Values that reach root shells, systemd units and sshfs on the VM: each type admits only what
# its field needs, so no value can end a line, open a substitution or add an option.
#: A POSIX login name (useradd's rule), as the image and CANFAR use them.
UserName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")]
#: A DNS name or an IP address.
HostName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9]([A-Za-z0-9.:-]{0,251}[A-Za-z0-9])?$")
]
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+@%=-]+$")
#: sshfs -o options accepted in arc.options: (name, pattern of its value or None for a flag).
SSHFS_OPTIONS: dict[str, str | None] = {
    "reconnect": None,
    "delay_connect": None,
    "follow_symlinks": None,
    "transform_symlinks": None,
    "allow_other": None,
    "default_permissions": None,
    "kernel_cache": None,
    "auto_cache": None,
    "noatime": None,
    "idmap": r"none|user",
    "cache": r"yes|no",
    "dir_cache": r"yes|no",
    "compression": r"yes|no",
    "ServerAliveInterval": r"\d{1,5}",
    "ServerAliveCountMax": r"\d{1,5}",
    "ConnectTimeout": r"\d{1,5}",
    "TCPKeepAlive": r"yes|no",
    "max_conns": r"\d{1,2}",
    "umask": r"[0-7]{3,4}",
    "uid": r"\d{1,10}",
    "gid": r"\d{1,10}",
}


def checked_vm_path(value: str, *, home: bool = False) -> str:
    """A path on the VM: absolute (or ``~/…`` where ``home``), no ``..``, no whitespace, quotes
    or shell characters."""
    rest = value[2:] if home and value.startswith("~/") else value
    if not (home and value.startswith("~/")) and not value.startswith("/"):
        start = "absolute (or ~/…)" if home else "absolute"
        raise ValueError(f"{value!r} must be an {start} path, e.g. /mnt/pspace")
    if not _SAFE_PATH.match(rest) or ".." in PurePosixPath(rest).parts:
        raise ValueError(
            f"{value!r} must be a plain path: letters, digits and _ . / + @ % = - only, no '..'"
        )
    if value.rstrip("/") in ("", "~"):
        raise ValueError(f"{value!r} must be a path below / (or below ~)")
    return value


#: A cron schedule (five fields, or a @nickname), in characters a unit or YAML cannot misread.
Cron = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z*/,?#@ -]{1,100}$")]


class DerivedName:
    """A resource name derived from the environment, ``<environment>-<suffix>``: a read-only
    attribute of the config (declared ``ClassVar``, so it is no field and no parameter)."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def __get__(self, config: Any, owner: type | None = None) -> str:
        return f"{config.environment}-{self.suffix}"
