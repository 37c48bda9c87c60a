"""This package's deployments on a real Prefect server: deployed once, then left as they are
while nothing they are made from changes; a missing trigger is made again."""

from __future__ import annotations

from pathlib import Path

from core.config import parse_config
from core.records import Action
from sandbox.prefect_server import start_prefect_server, stop_prefect_server
from tasks.deploy import bootstrap_pool, deploy, deploy_version
from tasks.vm_server import remote_client


def test_a_second_deploy_writes_nothing_and_a_lost_trigger_is_made_again(tmp_path: Path) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate

    cfg = parse_config({"environment": "deploy-test"})
    server = start_prefect_server(tmp_path / "vm-server")
    try:
        with remote_client(server.url, None) as client:
            client.create_work_pool(WorkPoolCreate(name=bootstrap_pool(cfg), type="process"))

        def automations() -> list[str]:
            with remote_client(server.url, None) as client:
                return sorted(str(a.id) for a in client.read_automations())

        first = deploy(cfg, server.url, None)
        assert first.action == Action.CHANGE
        made = automations()
        assert len(made) == 2  # the two repairs' triggers
        with remote_client(server.url, None) as client:
            versions = {d.version for d in client.read_deployments()}
        assert versions == {deploy_version(cfg)}

        again = deploy(cfg, server.url, None)
        assert again.action == Action.KEEP, again
        assert automations() == made  # a deploy would have made them anew

        planned = deploy(cfg, server.url, None, apply=False)
        assert planned.action == Action.KEEP

        with remote_client(server.url, None) as client:
            client.delete_automation(made[0])  # type: ignore[arg-type]
        pending = deploy(cfg, server.url, None, apply=False)
        assert pending.action == Action.CHANGE and not pending.applied
        assert len(automations()) == 1  # the plan made nothing
        assert deploy(cfg, server.url, None).action == Action.CHANGE
        assert len(automations()) == 2
    finally:
        stop_prefect_server(server)
