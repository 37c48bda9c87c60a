"""The desired state of one orchestration VM environment.

One typed model, loaded from YAML, is the single source of what the VM should be. Its defaults
reproduce the hand-written procedure the project automates (an Ubuntu 24.04 server on flavor
``c1-7.5gb-36`` on Arbutus, a 50 GB volume at /mnt/pspace, CANFAR's /arc over sshfs and a Prefect
server on port 4200). Every cloud resource name derives from ``environment``, so several
environments can share one OpenStack project.

The model is also a Prefect flow parameter: it holds no secrets, only the *names* of the blocks
that hold them.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from core.fields import DerivedName, Name
from core.prefect_settings import (
    OWN_POOL,
    BackupSettings,
    PrefectSettings,
)
from core.settings import (
    ArcSettings,
    CanfarSettings,
    CloudSettings,
    ServerSettings,
    SSHSettings,
    VolumeSettings,
    _Model,
)


class BootstrapConfig(_Model):
    """Desired state of one orchestration VM environment."""

    environment: Name = Field(
        default="alma-sails", description="Environment name; every resource name derives from it."
    )
    cloud: CloudSettings = CloudSettings()
    server: ServerSettings = ServerSettings()
    volume: VolumeSettings = VolumeSettings()
    ssh: SSHSettings = SSHSettings()
    arc: ArcSettings = ArcSettings()
    canfar: CanfarSettings = CanfarSettings()
    prefect: PrefectSettings = PrefectSettings()
    backup: BackupSettings = BackupSettings()
    ca_bundle: str | None = Field(
        default=None, description="Extra CA certificates (PEM file) for private endpoints."
    )

    @model_validator(mode="after")
    def _api_port_closed(self) -> BootstrapConfig:
        for rule in self.server.ingress:
            if rule.protocol == "tcp" and rule.port == self.prefect.port:
                raise ValueError(
                    f"server.ingress: tcp {rule.port} from {rule.cidr} opens the Prefect API "
                    "port; the API carries the auth string and every block's secrets in "
                    "cleartext (Prefect speaks no TLS), so the server listens on the VM's "
                    "loopback only and is reached through SSH (`ssh -N "
                    f"{self.ssh.alias}` forwards 127.0.0.1:{self.prefect.local_port}): "
                    "remove the rule"
                )
        return self

    @model_validator(mode="after")
    def _service_user_unprivileged(self) -> BootstrapConfig:
        if self.prefect.user in ("root", self.server.user):
            raise ValueError(
                f"prefect.user: {self.prefect.user!r} is "
                + ("root" if self.prefect.user == "root" else "the login user (server.user)")
                + ", who has sudo; every flow run runs as prefect.user, so pick a user of its "
                "own (default 'sails')"
            )
        return self

    @model_validator(mode="after")
    def _backup_to_arc_needs_arc(self) -> BootstrapConfig:
        if self.backup.destination == "arc" and not self.arc.enabled:
            raise ValueError(
                "backup.destination is arc but arc.enabled is false: enable /arc, or set "
                "backup.destination: local"
            )
        return self

    @model_validator(mode="after")
    def _database_fits(self) -> BootstrapConfig:
        db, field = self.prefect.database, "prefect.database"
        if db.switch and db.kind != "postgresql":
            raise ValueError(
                f"{field}.switch: true moves the server to PostgreSQL: set {field}.kind: "
                "postgresql too, or remove switch"
            )
        if db.password_block == self.prefect.auth_block:
            raise ValueError(
                f"{field}.password_block: {db.password_block!r} is prefect.auth_block, the "
                "block of the server's auth string and key; name a block of its own (default "
                "'sails-prefect-db')"
            )
        if db.kind != "postgresql":
            return self
        if db.port == self.prefect.port:
            raise ValueError(
                f"{field}.port: {db.port} is prefect.port, the Prefect server's; pick another "
                "(default 5432)"
            )
        data, mount = PurePosixPath(db.data_directory), PurePosixPath(self.volume.mount_point)
        if mount not in data.parents:
            raise ValueError(
                f"{field}.data_directory: {db.data_directory} is not on the volume: put it "
                f"below volume.mount_point ({mount}), e.g. {mount}/postgres, so the database "
                "outlives the VM"
            )
        # the server's home and venv, and this package's code and venv (tasks/code_on_vm.py,
        # tasks/venvs.py), which are replaced whole on update
        taken = {
            "prefect.home": self.prefect.home,
            "prefect.venv": self.prefect.venv,
            "this package's code": f"{mount}/sails-bootstrap",
            "this package's venv": f"{mount}/sails-bootstrap-env",
        }
        for what, path in taken.items():
            other = PurePosixPath(path)
            if data == other or other in data.parents or data in other.parents:
                raise ValueError(
                    f"{field}.data_directory: {db.data_directory} overlaps {what} ({path}): "
                    f"give PostgreSQL a folder of its own, e.g. {mount}/postgres"
                )
        return self

    @property
    def backup_destination(self) -> Literal["arc", "local"]:
        if self.backup.destination is not None:
            return self.backup.destination
        return "arc" if self.arc.enabled else "local"

    @model_validator(mode="after")
    def _pools_unique(self) -> BootstrapConfig:
        names = [p.name for p in self.prefect.work_pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"prefect.work_pools: {', '.join(dupes)} listed twice")
        if OWN_POOL not in names:
            raise ValueError(
                f"prefect.work_pools: add {{name: {OWN_POOL}, workers: 1}}: this package's own "
                "deployments (health check, repairs, backup) run in that pool, whose worker "
                "runs from their own venv, apart from the pipeline's"
            )
        return self

    # -- names derived from the environment -------------------------------------------------
    keypair_name: ClassVar[DerivedName] = DerivedName("key")
    server_name: ClassVar[DerivedName] = DerivedName("vm")
    volume_name: ClassVar[DerivedName] = DerivedName("pspace")
    #: The environment's own security group: exactly the ingress rules of the config.
    security_group_name: ClassVar[DerivedName] = DerivedName("access")

    @property
    def ui_url(self) -> str:
        """Where an operator's browser and CLI reach the VM's UI and API: the ssh alias's
        forward (``ssh -N ALIAS`` running) on this machine's loopback."""
        return f"http://127.0.0.1:{self.prefect.local_port}"

    @property
    def tag(self) -> str:
        """Marks (server metadata, volume metadata, floating IP description) what we created."""
        return f"sails-bootstrap:{self.environment}"

    def warnings(self) -> list[str]:
        """Things that are allowed but probably not meant."""
        out = []
        if not self.prefect.api_auth:
            out.append(
                "prefect.api_auth is off: anyone with a shell on the VM (and any flow run "
                "there) can read every block's secrets through the API without a password"
            )
        return out


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says what to fix."""


_HINTS = {
    "extra_forbidden": "unknown key: remove it or check its spelling",
    "string_pattern_mismatch": (
        "use lowercase letters, digits and dashes (start and end with a letter or digit)"
    ),
    "greater_than_equal": "value too small",
    "less_than_equal": "value too large",
    "missing": "required",
}


def format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        hint = _HINTS.get(err["type"])
        if err["type"] == "string_pattern_mismatch":
            msg = f"{err['input']!r} is not a valid name"
        if hint and hint not in msg:
            msg = f"{msg} ({hint})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config") -> BootstrapConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return BootstrapConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source} is not valid:\n{format_errors(exc)}") from None


def load_config(path: str | Path) -> BootstrapConfig:
    """Read and validate a YAML config file; errors name the field and the fix."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data, str(path))


def dump_config(config: BootstrapConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
