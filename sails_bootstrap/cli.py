"""The ``sails-bootstrap`` command.

Start-up stays light: Prefect, openstacksdk and fabric are imported inside the commands that
need them, so ``--help`` and ``config validate`` answer at once.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from core.config import dump_config
from sails_bootstrap.down_guards import copy_before_delete, typed_volume_id
from sails_bootstrap.local_api import ensure_api
from sails_bootstrap.options import (
    ConfigOption,
    ScienceOption,
    TrustOption,
    read_config,
    with_trusted,
)
from sails_bootstrap.output import _NoTracebackForNamedErrors, _print_records, fail
from sails_bootstrap.running import apply_flow, run_flow

app = typer.Typer(
    help="Build, check and repair the ALMA-SAILS orchestration VM on an OpenStack cloud.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check and show a configuration file.", no_args_is_help=True)
blocks_app = typer.Typer(help="Prefect blocks of this package.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(blocks_app, name="blocks")


# -- config ------------------------------------------------------------------------------------
@config_app.command("validate")
def config_validate(file: Annotated[Path, typer.Argument(help="Configuration file.")]) -> None:
    """Check FILE; exit non-zero with the fields to fix."""
    config = read_config(file)
    typer.echo(f"{file}: valid (environment {config.environment!r})")


@config_app.command("show")
def config_show(file: Annotated[Path, typer.Argument(help="Configuration file.")]) -> None:
    """Print FILE with every default filled in, and the resource names it derives."""
    config = read_config(file)
    typer.echo(dump_config(config), nl=False)
    typer.echo("# derived names")
    typer.echo(f"#   keypair: {config.keypair_name}")
    typer.echo(f"#   server:  {config.server_name}")
    typer.echo(f"#   volume:  {config.volume_name}")
    typer.echo(f"#   tag:     {config.tag}")
    typer.echo("# secrets live in the named Prefect blocks, never in this file")


# -- blocks ------------------------------------------------------------------------------------
@blocks_app.command("register")
def blocks_register() -> None:
    """Register this package's block types with the Prefect API in use."""
    from blocks import register_block_types

    ensure_api()
    for slug in register_block_types():
        typer.echo(f"registered block type {slug}")


# -- flows -------------------------------------------------------------------------------------
@app.command("plan")
def plan_cmd(config: ConfigOption) -> None:
    """Say what `up` would change in the cloud and on the VM, changing nothing."""
    cfg = read_config(config)
    from flows.plan import plan

    result = run_flow(lambda: plan(cfg))
    typer.echo(f"plan for {cfg.environment}:")
    _print_records([*result.cloud, *result.vm, *result.server])
    if result.vm_note:
        typer.echo(f"  vm: {result.vm_note}")
    if result.server_note:
        typer.echo(f"  server: {result.server_note}")
    for note in result.notes:
        typer.echo(f"  note: {note}")


@app.command("provision")
def provision_cmd(config: ConfigOption, trust_host_key: TrustOption = None) -> None:
    """Create or fix the keypair, rules, server, floating IP, volume and the local ssh alias."""
    cfg = with_trusted(read_config(config), trust_host_key)
    from flows.provision import provision

    result = apply_flow(cfg, "provision", provision)
    typer.echo(f"ready: ssh {cfg.ssh.alias}  ({cfg.server.user}@{result.address})")


@app.command("configure")
def configure_cmd(config: ConfigOption, trust_host_key: TrustOption = None) -> None:
    """Configure the VM over SSH: volume, /arc, CANFAR auth, Prefect server, operator keys."""
    cfg = with_trusted(read_config(config), trust_host_key)
    from flows.configure import configure

    result = apply_flow(cfg, "configure", configure)
    typer.echo(f"Prefect UI: {result.ui_url} (run `ssh -N {cfg.ssh.alias}` to reach it)")


@app.command("register")
def register_cmd(
    config: ConfigOption,
    science_codebase: ScienceOption = None,
) -> None:
    """Register the VM's server: profile, blocks, work pools, workers, deployments."""
    cfg = read_config(config)
    from flows.register import register

    result = apply_flow(cfg, "register", lambda c: register(c, science_codebase=science_codebase))
    typer.echo(
        f"profile {cfg.environment} -> {result.api_url} (run `ssh -N {cfg.ssh.alias}` to reach it)"
    )


@app.command("up")
def up_cmd(
    config: ConfigOption,
    science_codebase: ScienceOption = None,
    trust_host_key: TrustOption = None,
) -> None:
    """The whole bootstrap: provision, configure, register, CANFAR smoke test."""
    cfg = with_trusted(read_config(config), trust_host_key)
    from flows.bootstrap import bootstrap

    out = run_flow(lambda: bootstrap(cfg, science_codebase=science_codebase), cfg, "up")
    typer.echo(f"\n{cfg.environment} is up")
    typer.echo(f"  Prefect UI:  {out['ui_url']} while `ssh -N {cfg.ssh.alias}` runs")
    typer.echo(f"  ssh:         ssh {cfg.ssh.alias}")
    typer.echo(f"  profile:     prefect profile use {cfg.environment}")
    typer.echo(f"  smoke test:  {out['smoke']}")
    typer.echo(f"  next:        sails-bootstrap health --config {config}")


@app.command("health")
def health_cmd(config: ConfigOption) -> None:
    """Run every health probe now (from this machine) and print the table."""
    cfg = read_config(config)
    from prefect.states import State

    from flows.operate import health_check

    state = run_flow(lambda: health_check(cfg, return_state=True))
    report = state.result(raise_on_failure=False) if isinstance(state, State) else state
    if isinstance(report, BaseException):
        typer.secho(str(report), err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    for row in report.results:
        typer.echo(f"  {row['probe']:<20} {row['status']:<5} {row['detail']} ({row['duration']})")


@app.command("remount")
def remount_cmd(config: ConfigOption) -> None:
    """Remount /arc on the VM if it is stale or dead (no-op when live)."""
    cfg = read_config(config)
    from flows.operate import remount_arc

    record = run_flow(lambda: remount_arc(cfg), cfg, "remount")
    typer.echo(f"/arc: {record.reason}")


@app.command("reauth")
def reauth_cmd(config: ConfigOption) -> None:
    """Renew the CANFAR certificate on the VM from the CanfarCredentials block."""
    cfg = read_config(config)
    from flows.operate import reauth_canfar

    record = run_flow(lambda: reauth_canfar(cfg), cfg, "reauth")
    typer.echo(f"CANFAR: {record.reason}")


NO_DATABASE = "the VM has no Prefect database yet: nothing to copy"


@app.command("backup")
def backup_cmd(config: ConfigOption) -> None:
    """Copy the VM's Prefect database to this machine (backup.dir); the server keeps running."""
    cfg = read_config(config)
    from flows.backup import backup

    record = run_flow(lambda: backup(cfg), cfg, "backup")
    if record is None:
        typer.echo(f"backup: {NO_DATABASE}")
        return
    typer.echo(f"backup: {record.summary()}")
    if record.pruned:
        typer.echo(f"  removed older copies: {', '.join(record.pruned)}")
    if record.snapshot:
        typer.echo(f"  snapshot of the volume: {record.snapshot}")
    if record.snapshots_pruned:
        typer.echo(f"  removed older snapshots: {', '.join(record.snapshots_pruned)}")


@app.command("restore")
def restore_cmd(
    config: ConfigOption,
    source: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="A backup: a .db.gz or .pgdump file on this machine, a backup's name, or 'latest' "
            "(the default) in backup.destination.",
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Put a backup in place of the VM's Prefect database (the one it replaces is kept)."""
    cfg = read_config(config)
    from core.errors import BootstrapError
    from tasks.backup_store import read_backup

    what = f"backup {source or 'latest'} in {cfg.backup_destination}"
    if source and Path(source).expanduser().is_file():
        try:
            what = read_backup(Path(source).expanduser(), cfg).summary()
        except BootstrapError as exc:
            raise fail(f"error: {exc}", code=1) from None
    question = (
        f"Replace the Prefect database of {cfg.environment} with {what}? Runs recorded since "
        "that copy leave the server's view (the database it replaces is kept on the VM)"
    )
    if not yes and not typer.confirm(question, default=False):
        raise fail("nothing restored", code=1)
    from flows.backup import restore

    done = run_flow(lambda: restore(cfg, source=source), cfg, "restore")
    typer.echo(f"restored from {done.file}; the database before is kept on the VM: {done.kept}")
    if done.drain:
        typer.echo(f"  runs in flight: {done.drain}")


@app.command("ui")
def ui_cmd(
    config: ConfigOption,
    out: Annotated[Path, typer.Option("--out", help="Folder for the screenshots.")] = Path(
        "ui-screenshots"
    ),
    run_health: Annotated[
        bool,
        typer.Option(
            "--run-health/--no-run-health",
            help="Run the VM's health-check deployment first, so its artifact is current.",
        ),
    ] = True,
) -> None:
    """Open the VM server's UI in headless Chromium, log in, and save screenshots."""
    cfg = read_config(config)
    from flows.register import ui_check

    record = run_flow(lambda: ui_check(cfg, str(out), run_health))
    for page in record.pages:
        typer.echo(f"  {page.name:<16} {page.screenshot}  ({page.url})")


@app.command("down")
def down_cmd(
    config: ConfigOption,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    delete_volume: Annotated[
        bool,
        typer.Option(
            "--delete-volume", help="Also delete the volume and its data (its id must be typed)."
        ),
    ] = False,
    volume_id: Annotated[
        str | None,
        typer.Option(
            "--volume-id", help="With --delete-volume --yes: the id of the volume to delete."
        ),
    ] = None,
    backup_first: Annotated[
        bool,
        typer.Option(
            "--backup/--no-backup",
            help="With --delete-volume: copy the Prefect database to backup.dir first "
            "(a failed copy deletes nothing).",
        ),
    ] = True,
) -> None:
    """Delete the server and release its floating IP (the volume is kept unless asked)."""
    cfg = read_config(config)
    from flows.teardown import teardown

    what = f"server {cfg.server_name}, its security group and its floating IP"
    if delete_volume:
        volume_id = typed_volume_id(cfg, volume_id, yes)
        what += f", and volume {volume_id} WITH ITS DATA"
    if not yes and not typer.confirm(f"Delete {what}?", default=False):
        raise fail("nothing deleted", code=1)
    if delete_volume and backup_first:
        record = copy_before_delete(cfg)
        typer.echo(f"backup: {record.summary() if record else NO_DATABASE}")
    records = run_flow(
        lambda: teardown(cfg, delete_data_volume=delete_volume, volume_id=volume_id), cfg, "down"
    )
    _print_records(records)
    typer.echo("nothing to remove" if not records else "removed")


def main() -> None:
    # With no Prefect profile, a command runs on an ephemeral server it starts itself; that
    # server's telemetry heartbeat races the run's own writes to its SQLite file and logs a
    # "database is locked" traceback. Off unless the operator has set it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    quiet = _NoTracebackForNamedErrors()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(quiet)
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
