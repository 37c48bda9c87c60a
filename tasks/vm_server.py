"""The VM's Prefect server as a client reaches it (through the SSH forward): a client, blocks
saved only where they differ, a deployment run and its artifact read."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from core.errors import BootstrapError
from core.log import logger
from core.poll import poll


@contextmanager
def remote_api(url: str, auth_string: str | None) -> Iterator[None]:
    """This process's Prefect client pointed at the VM's server for the duration."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates: dict[Any, Any] = {PREFECT_API_URL: url}
    if auth_string:
        updates[PREFECT_API_AUTH_STRING] = auth_string
    with temporary_settings(updates):
        yield


def remote_client(url: str, auth_string: str | None) -> Any:
    """A client of the VM's server. Explicit: inside a flow run, settings changed on the fly
    do not redirect ``get_client()``, which keeps talking to the run's own API."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(url, auth_string=auth_string)


def _plain(block: Any) -> Any:
    """A block's fields as JSON, secrets revealed: what its document on a server holds."""
    # Only the fields: a loaded block's dump also carries its document's id and name.
    fields = set(type(block).model_fields)
    return block.model_dump(mode="json", include=fields, context={"include_secrets": True})


def block_is_current(doc: Any | None, block: Any) -> bool:
    """Whether a server's block document (None: none under the name) holds ``block`` as it is:
    saved with this version of the block's schema, every field equal, secrets included."""
    cls = type(block)
    return (
        doc is not None
        and doc.block_schema is not None
        and doc.block_schema.checksum == cls._calculate_schema_checksum()
        and _plain(cls.model_validate(doc.data)) == _plain(block)
    )


def save_remote(
    blocks: list[tuple[Any, str]], url: str, auth_string: str | None, apply: bool = True
) -> list[str]:
    """Save on the VM's server the blocks whose document there differs (or is missing, or was
    saved with another version of the block's schema); the names saved (with ``apply=False``,
    that would be). A block already as it should be is not written (the async client:
    ``Block.save`` ignores a client)."""
    import asyncio

    from prefect.client.orchestration import PrefectClient
    from prefect.exceptions import ObjectNotFound

    async def save_changed() -> list[str]:
        saved = []
        async with PrefectClient(url, auth_string=auth_string) as client:
            for block, name in blocks:
                cls = type(block)
                try:
                    doc = await client.read_block_document_by_name(
                        name, cls.get_block_type_slug(), include_secrets=True
                    )
                except ObjectNotFound:
                    doc = None
                if block_is_current(doc, block):
                    continue
                if apply:
                    # A fresh instance: a loaded block remembers its local document id.
                    fresh = cls(**{f: getattr(block, f) for f in cls.model_fields})
                    await fresh.asave(name, overwrite=True, client=client)
                saved.append(name)
        return saved

    return asyncio.run(save_changed())


def remove_private_keys(url: str, auth_string: str | None, apply: bool = True) -> list[str]:
    """Delete every SSHKeyPair block on the VM's server (``apply=False``: name them): the key
    that opens the VM stays with the operator (the VM's deployments act on the VM itself)."""
    from prefect.exceptions import ObjectNotFound

    with remote_client(url, auth_string) as client:
        try:
            # The listing answers a bare 404 for an unknown type; the type read names it.
            client.read_block_type_by_slug("ssh-key-pair")
        except ObjectNotFound:  # the type was never registered there: no such block either
            return []
        found = client.read_block_documents_by_type("ssh-key-pair", include_secrets=False)
        for document in found if apply else []:
            client.delete_block_document(document.id)
            logger().info("removed SSHKeyPair block %s from the VM's server", document.name)
    return sorted(str(d.name) for d in found)


def run_on_server(
    url: str, auth_string: str | None, name: str, timeout: float = 300
) -> dict[str, Any]:
    """Start a run of deployment ``name`` ("flow/deployment") on the VM's server and wait for
    its final state (the VM's worker runs it). Returns id, state name and message."""
    # Not Prefect's run_deployment: from synchronous code it talks to the run's own API
    # (get_client), and it would link the run as a subflow of a run on another server.
    client = remote_client(url, auth_string)
    with client:
        deployment = client.read_deployment_by_name(name)
        created = client.create_flow_run_from_deployment(deployment.id)
        logger().info("started %s on the VM's server (run %s)", name, created.id)
        run = poll(
            lambda: client.read_flow_run(created.id),
            lambda r: r.state is not None and r.state.is_final(),
            f"{name} on the VM",
            timeout,
            state=lambda r: r.state.name if r.state else "scheduled",
            timed_out=lambda r: BootstrapError(
                f"{name} did not finish within {timeout:.0f} s on the VM "
                f"(state {r.state.name if r.state else 'none'}): is its worker running? "
                "`systemctl status 'prefect-worker@*'` on the VM"
            ),
        )
    assert run.state is not None
    return {"id": str(run.id), "state": run.state.name, "message": run.state.message or ""}


def latest_artifact_id(url: str, auth_string: str | None, key: str) -> str | None:
    """The id of the newest artifact under ``key`` on the VM's server."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with remote_client(url, auth_string) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    return str(found[0].id) if found else None
