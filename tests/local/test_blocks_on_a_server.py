"""The blocks on a real Prefect server: saved, read back, never logged; copied to a VM's server only
where they differ."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
from pydantic import SecretStr

from blocks import CanfarCredentials, OpenStackCredentials, SSHKeyPair, register_block_types

PASSWORD = "pw-7f3a9c1e-do-not-log"


CADC_PASSWORD = "cadc-1e2d-do-not-log"


def test_blocks_round_trip_through_a_real_server(prefect_server, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    assert register_block_types() == ["openstack-credentials", "ssh-key-pair", "canfar-credentials"]
    register_block_types()  # idempotent

    key = SSHKeyPair.generate()
    key.save("test-vm-key", overwrite=True)
    OpenStackCredentials(
        auth_url="http://127.0.0.1:5000/v3",
        auth_type="password",
        username="sails",
        password=SecretStr(PASSWORD),
        project_name="alma-sails",
    ).save("test-cloud", overwrite=True)
    CanfarCredentials(username="sailsuser", password=SecretStr(CADC_PASSWORD)).save(
        "test-canfar", overwrite=True
    )

    loaded_key = SSHKeyPair.load("test-vm-key")
    assert loaded_key.private_key.get_secret_value() == key.private_key.get_secret_value()
    assert loaded_key.fingerprint == key.fingerprint
    cloud = OpenStackCredentials.load("test-cloud")
    assert cloud.password is not None and cloud.password.get_secret_value() == PASSWORD
    canfar = CanfarCredentials.load("test-canfar")
    assert canfar.password is not None and canfar.password.get_secret_value() == CADC_PASSWORD

    # Through the API, as the UI and `prefect block inspect` read them: masked.
    docs = httpx.post(f"{prefect_server.url}/block_documents/filter", json={}).json()
    by_name = {d["name"]: d["data"] for d in docs}
    assert by_name["test-cloud"]["password"] == "********"
    assert by_name["test-vm-key"]["private_key"] == "********"
    assert by_name["test-canfar"]["password"] == "********"
    wire = str(docs)
    for secret in (PASSWORD, CADC_PASSWORD, key.private_key.get_secret_value()):
        assert secret not in wire

    # No secret in any log line: this process's and the server's.
    logged = caplog.text + prefect_server.log.read_text()
    for secret in (PASSWORD, CADC_PASSWORD, "PRIVATE KEY"):
        assert secret not in logged


def test_private_keys_are_removed_from_a_server_whether_or_not_it_knows_the_type(
    tmp_path: Path,
) -> None:
    from sandbox.prefect_server import start_prefect_server, stop_prefect_server
    from tasks.vm_server import remove_private_keys, save_remote

    server = start_prefect_server(tmp_path / "vm-server")  # as on a new VM: no block types yet
    try:
        assert remove_private_keys(server.url, None) == []
        save_remote([(SSHKeyPair.generate(), "old-vm-key")], server.url, None)
        assert remove_private_keys(server.url, None) == ["old-vm-key"]
        assert remove_private_keys(server.url, None) == []
        kept = httpx.post(f"{server.url}/block_documents/filter", json={}).json()
        assert "old-vm-key" not in {d["name"] for d in kept}
    finally:
        stop_prefect_server(server)


def test_blocks_already_on_a_server_as_they_should_be_are_not_written_again(
    prefect_server,  # type: ignore[no-untyped-def]
) -> None:
    """What `register` copies to the VM's server: only what differs is saved, so a second
    register writes no block; a changed secret is written."""
    from prefect.blocks.system import Secret

    from tasks.vm_server import save_remote

    creds = CanfarCredentials(
        username="alice", password=SecretStr("first"), url="https://ws-uv.example/skaha"
    )
    # As register has them: loaded from this machine's blocks (a loaded block carries its
    # document's id and name, which are not the VM's).
    creds.save("local-canfar", overwrite=True)
    Secret(value="auth-1").save("local-auth", overwrite=True)
    creds = CanfarCredentials.load("local-canfar")
    blocks = [(creds, "nochange-canfar"), (Secret.load("local-auth"), "nochange-auth")]

    def documents() -> dict[str, str]:
        found = httpx.post(f"{prefect_server.url}/block_documents/filter", json={}).json()
        return {d["name"]: d["updated"] for d in found if d["name"].startswith("nochange-")}

    assert save_remote(blocks, prefect_server.url, None) == ["nochange-canfar", "nochange-auth"]
    before = documents()
    assert save_remote(blocks, prefect_server.url, None) == []
    assert documents() == before, "a block as it should be was written again"
    changed = creds.model_copy(update={"password": SecretStr("second")})
    again = [(changed, "nochange-canfar"), blocks[1]]
    assert save_remote(again, prefect_server.url, None) == ["nochange-canfar"]
    assert CanfarCredentials.load("nochange-canfar").password.get_secret_value() == "second"
