"""What preflight observed of the cloud, once: the ids the steps use, and what exists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CloudFacts:
    """What preflight found: the ids later steps use instead of looking them up again, and
    what exists of the environment, read once, concurrently (each ``ensure_*`` step decides on
    this on its first attempt, so a run that changes nothing reads each resource once)."""

    project_id: str
    image_id: str
    flavor_id: str
    flavor_vcpus: int
    flavor_ram: int
    network_id: str
    floating_network_id: str
    security_group_id: str
    problems: list[str] = field(default_factory=list)
    #: The keypair under the environment's name, if any.
    keypair: Any | None = None
    #: Ours, oldest first: servers; the environment's own groups (with their rules); volumes
    #: (attached first); floating IPs.
    servers: list[Any] = field(default_factory=list)
    access_groups: list[Any] = field(default_factory=list)
    volumes: list[Any] = field(default_factory=list)
    floating_ips: list[Any] = field(default_factory=list)
    #: The project's shared group (server.security_group), with its rules.
    shared_group: Any | None = None
