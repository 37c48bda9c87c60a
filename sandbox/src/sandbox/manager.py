"""Starts, stops and describes the whole sandbox: the OpenStack cloud, its guests and the other
sandbox parts (e.g. the CANFAR stand-ins) that hook in here.

    from sandbox import manager
    manager.up()        # idempotent: returns quickly when everything already runs
    os.environ.update(manager.env())   # OS_CLIENT_CONFIG_FILE, OS_CLOUD=sandbox, ...
    manager.down()      # stops everything; volumes and databases stay for the next up()

Other sandbox parts join by being importable modules with ``install()``, ``up()``, ``down()``,
``status()`` and ``env()`` functions, listed in ``PARTS`` (or added with ``register_part``).
A part that is not there (ImportError) is skipped, and so is one named in the comma-separated
``SAILS_SANDBOX_SKIP_PARTS`` environment variable.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import time
from types import ModuleType
from typing import Any

from sandbox import layout, net
from sandbox.cloud import common, packages, procs, seed, services

#: Optional sandbox parts, started after the cloud and stopped before it.
PARTS: list[str] = ["sandbox.canfar", "sandbox.mirror"]
FIP_TABLE = "sails_fip"


class SandboxError(RuntimeError):
    pass


def register_part(module: str) -> None:
    if module not in PARTS:
        PARTS.append(module)


def _log(msg: str) -> None:
    print(f"[sandbox] {msg}", flush=True)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise SandboxError(
            "the sandbox needs root: it installs Debian packages, creates bridges, nftables "
            "rules, loop devices and systemd-nspawn guests. Run it as root (e.g. `sudo -E`)."
        )


def _parts() -> list[tuple[str, ModuleType]]:
    found = []
    skip = set(filter(None, os.environ.get("SAILS_SANDBOX_SKIP_PARTS", "").split(",")))
    for name in PARTS:
        if name in skip:
            continue
        try:
            found.append((name, importlib.import_module(name)))
        except ImportError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # the part is not there (yet)
            raise
    return found


def _guests() -> ModuleType | None:
    try:
        return importlib.import_module("sandbox.guests")
    except ImportError as exc:
        if exc.name and "sandbox.guests".startswith(exc.name):
            return None
        raise


def cloud_running() -> bool:
    """Every process runs and the cloud was seeded."""
    if not all(procs.running(name) for name in services.ALL_PROCS):
        return False
    if not layout.clouds_yaml().exists() or not net.network_present():
        return False
    try:
        return services.http_answers(common.ENDPOINTS["identity"][1], "/v3", tls=True)
    except OSError:
        return False


def install() -> None:
    """Everything the sandbox needs on this machine (Debian packages, the services venv, the
    guest image, the guests' wheels); each part skips what is already there."""
    _require_root()
    packages.install()
    guests = _guests()
    if guests is not None and hasattr(guests, "install"):
        guests.install()
    for _name, part in _parts():
        if hasattr(part, "install"):
            part.install()


def up() -> dict[str, Any]:
    """Bring the whole sandbox up (idempotent) and return ``status()``."""
    _require_root()
    t0 = time.monotonic()
    if cloud_running() and not packages.venv_current():
        # the sandbox's plugin code (or the pinned list) changed under a running cloud
        _log("services venv out of date: reinstalling and restarting the services")
        packages.install()
        services.stop_services()
        services.start_all(seed.register_services)
        services.wait_for("cinder-scheduler to know the backend", seed.volume_backend_known, 90, 1)
    if not cloud_running():
        packages.install()
        guests = _guests()
        if guests is not None and hasattr(guests, "install"):
            guests.install()
        _log(f"installed (+{time.monotonic() - t0:.0f} s)")
        net.ensure_network()
        services.start_all(seed.register_services)
        services.wait_for("cinder-scheduler to know the backend", seed.volume_backend_known, 90, 1)
        seed.seed()
        _log(f"cloud up and seeded in {time.monotonic() - t0:.0f} s")
    for name, part in _parts():
        if hasattr(part, "up"):
            part.up()
            _log(f"{name} up (+{time.monotonic() - t0:.0f} s)")
    return status()


def down() -> None:
    """Stop every process, guest, rule and bridge of the sandbox. Volumes and databases stay."""
    _require_root()
    for name, part in reversed(_parts()):
        if hasattr(part, "down"):
            try:
                part.down()
            except Exception as exc:  # go on tearing down the rest
                _log(f"{name}.down() failed: {exc}")
    services.stop_all()
    guests = _guests()
    if guests is not None:
        guests.cleanup_all()
    subprocess.run(["nft", "delete", "table", "ip", FIP_TABLE], capture_output=True, check=False)
    net.remove_network()
    net.remove_guards()


def status() -> dict[str, Any]:
    result: dict[str, Any] = {
        "processes": {name: procs.pid_of(name) for name in services.ALL_PROCS},
        "network": net.network_present(),
        "clouds_yaml": str(layout.clouds_yaml()),
        "running": cloud_running(),
        "venv_current": packages.venv_current(),
    }
    guests = _guests()
    if guests is not None:
        try:
            result["guests"] = guests.list_guests()
        except Exception as exc:
            result["guests"] = f"error: {exc}"
    for name, part in _parts():
        if hasattr(part, "status"):
            try:
                result[name.rsplit(".", 1)[-1]] = part.status()
            except Exception as exc:
                result[name.rsplit(".", 1)[-1]] = f"error: {exc}"
    return result


def env() -> dict[str, str]:
    """Environment a client of the sandbox needs (openstacksdk, plus every part's own)."""
    result = {
        "OS_CLIENT_CONFIG_FILE": str(layout.clouds_yaml()),
        "OS_CLOUD": layout.CLOUD_NAME,
    }
    for _name, part in _parts():
        if hasattr(part, "env"):
            result.update({k: str(v) for k, v in part.env().items()})
    return result
