"""The options the commands share, and the configuration they read from ``--config``
(with ``--trust-host-key``'s fingerprints added)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.config import BootstrapConfig, ConfigError, load_config
from sails_bootstrap.output import fail

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Configuration file (YAML).", show_default=False)
]

TrustOption = Annotated[
    list[str] | None,
    typer.Option(
        "--trust-host-key",
        help="A host key fingerprint (SHA256:…) to trust beside the console's, for a VM whose "
        "keys were regenerated on purpose. Check it on the VM first.",
    ),
]

ScienceOption = Annotated[
    str | None,
    typer.Option(help="Folder on the VM with the science codebase's prefect.yaml to deploy."),
]


def with_trusted(config: BootstrapConfig, fingerprints: list[str] | None) -> BootstrapConfig:
    """The config with ``fingerprints`` added to ssh.trusted_host_keys (validated)."""
    if not fingerprints:
        return config
    from core.config import parse_config

    data = config.model_dump(mode="json")
    data["ssh"]["trusted_host_keys"] = [*data["ssh"]["trusted_host_keys"], *fingerprints]
    try:
        return parse_config(data, "--trust-host-key")
    except ConfigError as exc:
        raise fail(f"error: {exc}") from None


def read_config(path: Path) -> BootstrapConfig:
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    for warning in config.warnings():
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    return config
