"""Loading the saved blocks a step needs, with an error that names how to make a missing one."""

from __future__ import annotations

from typing import TypeVar, cast

from prefect.blocks.core import Block

from core.errors import BootstrapError

B = TypeVar("B", bound=Block)


def load_block(block_type: type[B], name: str, fix: str) -> B:
    """The block saved as ``name`` on the Prefect API in use; a missing one is a BootstrapError
    saying ``fix``."""
    try:
        return cast(B, block_type.load(name))
    except ValueError:
        raise BootstrapError(
            f"no {block_type.__name__} block named {name!r} on the Prefect API in use: {fix}"
        ) from None
