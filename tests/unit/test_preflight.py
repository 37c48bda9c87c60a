"""Preflight: the image hint (names like the one asked for, not the first ones alphabetically),
and what a run would add, which decides the quota it reads."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from core.config import BootstrapConfig, parse_config
from tasks.cloud.preflight import similar_image_names, would_add


def image(name: str, distro: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(id=f"id-{name}", name=name, os_distro=distro)


# A project's image list much like Arbutus's: many distributions, alphabetically first not Ubuntu.
IMAGES = [
    image("AlmaLinux-8.10-x64-2024-06", "almalinux"),
    image("AlmaLinux-9.4-x64-2024-06", "almalinux"),
    image("CentOS-7-x64-2020-11", "centos"),
    image("Debian-11-Bullseye-x64-2023-10", "debian"),
    image("Debian-12-Bookworm-x64-2024-06", "debian"),
    image("Fedora-39-x64-2023-11", "fedora"),
    image("Rocky-9.4-x64-2024-06", "rocky"),
    image("Ubuntu-20.04-Focal-x64-2023-10", "ubuntu"),
    image("Ubuntu-22.04-Jammy-x64-2024-06", "ubuntu"),
    image("Ubuntu-24.04-Noble-x64-2024-10", "ubuntu"),
    image("noble-minimal-2024", "ubuntu"),  # another name, the same distribution
    image("my-snapshot", None),
]


def test_missing_image_hint_lists_same_prefix_and_distro() -> None:
    hint = similar_image_names("Ubuntu-24.04-Noble-x64-2024-06", IMAGES)
    assert hint[0] == "Ubuntu-24.04-Noble-x64-2024-10"  # the closest first
    assert set(hint) == {
        "Ubuntu-20.04-Focal-x64-2023-10",
        "Ubuntu-22.04-Jammy-x64-2024-06",
        "Ubuntu-24.04-Noble-x64-2024-10",
        "noble-minimal-2024",
    }


def test_hint_by_distro_word_and_by_spelling() -> None:
    # The distribution's name alone, lowercase: its images by os_distro.
    assert set(similar_image_names("debian", IMAGES)) == {
        "Debian-11-Bullseye-x64-2023-10",
        "Debian-12-Bookworm-x64-2024-06",
    }
    # A typo of a whole name still finds it.
    assert similar_image_names("Rocky-9.4-x64-2024-6", IMAGES) == ["Rocky-9.4-x64-2024-06"]
    assert similar_image_names("Windows-2022", IMAGES) == []


def test_long_hints_are_cut() -> None:
    many = [image(f"Ubuntu-24.04-build-{n:03d}", "ubuntu") for n in range(30)]
    hint = similar_image_names("Ubuntu-24.04", many, limit=5)
    assert len(hint) == 6 and hint[-1] == "and 25 more"


def _server(*floating: str) -> SimpleNamespace:
    fixed = [{"addr": "10.0.0.5", "OS-EXT-IPS:type": "fixed"}]
    addrs = fixed + [{"addr": a, "OS-EXT-IPS:type": "floating"} for a in floating]
    return SimpleNamespace(addresses={"private": addrs})


def _group(cfg: BootstrapConfig) -> SimpleNamespace:
    rules = [
        {
            "direction": "ingress",
            "ethertype": "IPv4",
            "protocol": r.protocol,
            "port_range_min": r.port,
            "port_range_max": r.port,
            "remote_ip_prefix": r.cidr,
        }
        for r in cfg.server.ingress
    ]
    return SimpleNamespace(security_group_rules=rules)


BOUND = SimpleNamespace(port_id="port-1")
FREE = SimpleNamespace(port_id=None)


@pytest.mark.parametrize(
    ("server", "fips", "port", "floatingip"),
    [
        (None, [], 1, 1),  # nothing yet: a port and an address
        (None, [FREE], 1, 1),  # a free one of ours counts in the quota check, not here
        (_server(), [], 0, 1),  # a server without an address
        (_server("203.0.113.7"), [BOUND], 0, 0),  # Nova lists it
        (_server(), [BOUND], 0, 0),  # bound in Neutron, not yet in Nova's list of the server
        (_server(), [FREE], 0, 1),  # ours, but not on any port
    ],
)
def test_would_add_counts_what_a_run_creates(
    server: Any, fips: list[Any], port: int, floatingip: int
) -> None:
    cfg = parse_config({"environment": "t-adds"})
    adds = would_add(cfg, server, _group(cfg), fips)
    assert adds == {
        "port": port,
        "floatingip": floatingip,
        "security_group": 0,
        "security_group_rule": 0,
    }


def test_a_missing_group_adds_it_its_rules_and_neutrons_two_egress_rules() -> None:
    cfg = parse_config({"environment": "t-adds"})
    adds = would_add(cfg, None, None, [])
    assert adds["security_group"] == 1
    assert adds["security_group_rule"] == len(cfg.server.ingress) + 2
