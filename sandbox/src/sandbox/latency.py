"""Realistic slowness for benchmarks: how long a server build or a volume creation takes.

A JSON file under the state directory, read by the guests library (``boot``, seconds added
before a guest is created, as a cloud's build time; ``sshd_delay``, seconds the sshd of a guest
created from then on starts late at each boot, after cloud-init made its host keys: a cloud's
30-90 s from ACTIVE to SSH) and by the sandbox's Cinder driver (``volume_create``,
``volume_delete``). API latency itself is the fault proxy's business (``sandbox.faults``).
"""

from __future__ import annotations

import json

from sandbox import layout

PATH = layout.STATE_DIR / "latency.json"


def get(name: str) -> float:
    try:
        return float(json.loads(PATH.read_text()).get(name, 0.0))
    except (OSError, ValueError):
        return 0.0


def set_latency(**values: float) -> None:
    """``set_latency(boot=30, sshd_delay=60, volume_create=10)``; ``set_latency()`` removes
    every delay."""
    PATH.parent.mkdir(parents=True, exist_ok=True)
    if values:
        PATH.write_text(json.dumps(values))
    else:
        PATH.unlink(missing_ok=True)
