"""What an operator does with the sandbox's CANFAR account: save it as the blocks a bootstrap
config names (``sails-sandbox blocks``), as they would save their real CADC account.

This is the sandbox's one bridge to the product: it saves the product's own block types
(``blocks``) under the names its config model (``core.config``) reads, on the Prefect API the
product's commands use (with none set, the same local server, ``sails_bootstrap.local_api``,
whose block key is kept outside its database), all imported when called. The stand-ins
themselves know nothing of the product.
"""

from __future__ import annotations

import os
from typing import Any

from sandbox import canfar


def canfar_credentials() -> Any:
    """The CanfarCredentials an operator would save for the sandbox's CANFAR stand-ins."""
    from pydantic import SecretStr

    from blocks import CanfarCredentials

    info = canfar.info()
    return CanfarCredentials(
        username=info["username"],
        password=SecretStr(canfar.password()),
        url=info["canfar_url"],
        registry_url=info["registry_url"],
        ca_bundle=info["ca_bundle"],
    )


def save_blocks(config: Any, fresh_arc_key: bool = False) -> list[str]:
    """Save the config's CanfarCredentials block and, if it names one, the /arc key (loaded, or
    generated when missing or ``fresh_arc_key``), and have the /arc stand-in trust that key.
    Returns what was done, one line each."""
    from typing import cast

    from blocks import SSHKeyPair

    canfar_credentials().save(config.canfar.credentials_block, overwrite=True)
    done = [f"saved CanfarCredentials block {config.canfar.credentials_block!r}"]
    if config.arc.key_block:
        key = None
        if not fresh_arc_key:
            try:
                key = cast(SSHKeyPair, SSHKeyPair.load(config.arc.key_block))
            except ValueError:
                key = None
        if key is None:
            key = SSHKeyPair.generate("rsa", comment=f"{config.environment}-arc")
            key.save(config.arc.key_block, overwrite=True)
        canfar.add_arc_key(key.public_key)
        done.append(f"/arc trusts the key of block {config.arc.key_block!r} ({key.fingerprint})")
    return done


def save_blocks_from_file(path: str) -> list[str]:
    """``save_blocks`` for a config file, on the Prefect API in use. With none set, on the
    local server the product's commands start: a Prefect server started here on its own would
    keep another block key in the database, and the product could not read what it saved."""
    from core.config import ConfigError, load_config
    from sails_bootstrap.local_api import ensure_api

    try:
        config = load_config(path)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    os.umask(0o077)
    ensure_api()
    return save_blocks(config)
