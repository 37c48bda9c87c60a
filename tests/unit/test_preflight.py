"""Preflight's image hint: names like the one asked for, not the first ones alphabetically."""

from __future__ import annotations

from types import SimpleNamespace

from tasks.cloud.preflight import similar_image_names


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
