"""The sections of the configuration (cloud, server, volume, ssh, arc, canfar) and their
defaults; the Prefect server's and the backups' are in ``core.prefect_settings``."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from core.fields import (
    SSHFS_OPTIONS,
    HostName,
    Name,
    NonEmpty,
    Port,
    UserName,
    WaitSeconds,
    checked_vm_path,
)

SEED_IMAGE = "Ubuntu-24.04-Noble-x64-2024-06"
SEED_FLAVOR = "c1-7.5gb-36"
CANFAR_SESSION_URL = "https://ws-uv.canfar.net/skaha/v1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngressRule(_Model):
    """One ingress rule of the security group (IPv4 or IPv6 follows the CIDR)."""

    protocol: Literal["icmp", "tcp", "udp"] = Field(description="IP protocol.")
    port: Port | None = Field(
        default=None, description="Port (tcp/udp); empty for ICMP, which allows any type."
    )
    cidr: str = Field(default="0.0.0.0/0", description="Remote IP prefix allowed in.")
    description: str = ""

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_network(value.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(
                f"{value!r} is not a network in CIDR notation ({exc}); "
                "write it as address/prefix with no host bits set, e.g. 203.0.113.0/24"
            ) from None

    @model_validator(mode="after")
    def _port_matches_protocol(self) -> IngressRule:
        if self.protocol == "icmp" and self.port is not None:
            raise ValueError("an ICMP rule has no port: remove 'port' from it")
        if self.protocol != "icmp" and self.port is None:
            raise ValueError(f"a {self.protocol} rule needs a 'port' between 1 and 65535")
        return self

    @property
    def ethertype(self) -> str:
        return "IPv6" if ipaddress.ip_network(self.cidr).version == 6 else "IPv4"

    @property
    def world_open(self) -> bool:
        return ipaddress.ip_network(self.cidr).prefixlen == 0

    def key(self) -> tuple[str, str, int | None, int | None, str]:
        """How the rule is compared with what the cloud has (direction is always ingress)."""
        return (self.ethertype, self.protocol, self.port, self.port, self.cidr)


def _seed_rules() -> list[IngressRule]:
    return [
        IngressRule(protocol="icmp", description="ping"),
        IngressRule(protocol="tcp", port=22, description="ssh"),
        # The seed's README also opens TCP 4200; the server listens on the VM's loopback only
        # and is reached through SSH (the API carries secrets, and Prefect speaks no TLS).
    ]


class CloudSettings(_Model):
    """How to reach the OpenStack project."""

    credentials_block: Name | None = Field(
        default=None,
        description="Name of an OpenStackCredentials block. Empty: use the clouds.yaml entry.",
    )
    cloud: str | None = Field(
        default=None,
        description="clouds.yaml entry to use when no block is named; empty means $OS_CLOUD.",
    )
    api_timeout: float = Field(default=60, gt=0, description="Seconds per API request.")


class ServerSettings(_Model):
    image: NonEmpty = Field(default=SEED_IMAGE, description="Glance image name or id.")
    flavor: NonEmpty = Field(default=SEED_FLAVOR, description="Nova flavor name or id.")
    network: str | None = Field(
        default=None, description="Project network; empty when the project has exactly one."
    )
    floating_network: str | None = Field(
        default=None, description="External network for the floating IP; empty when only one."
    )
    security_group: NonEmpty = Field(
        default="default",
        description="The project's security group the server also joins (left as it is); the "
        "ingress rules go into the environment's own group, ENV-access.",
    )
    ingress: list[IngressRule] = Field(default_factory=_seed_rules)
    user: UserName = Field(default="ubuntu", description="Login user of the image.")
    build_timeout: WaitSeconds = Field(default=900, description="Seconds to wait for ACTIVE.")
    boot_timeout: WaitSeconds = Field(
        default=600,
        description="Seconds for the guest's own boot after ACTIVE: sshd listening, the console's "
        "host key fingerprints, cloud-init's first boot.",
    )
    apt_timeout: WaitSeconds = Field(
        default=900,
        description="Seconds the packages step may take, waiting for the dpkg lock included "
        "(unattended-upgrades holds it for minutes on a first boot).",
    )


class VolumeSettings(_Model):
    size_gb: int = Field(default=50, ge=1, description="Size of the persistent volume in GB.")
    mount_point: str = Field(default="/mnt/pspace", description="Where the volume is mounted.")
    owner: UserName = Field(default="ubuntu", description="Owner of the mounted volume.")
    label: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,16}$")] = Field(
        default="pspace", description="ext4 label given when the volume is first formatted."
    )
    device_hint: Annotated[str, StringConstraints(pattern=r"^/dev/[a-z]{2,4}[a-z]$")] = Field(
        default="/dev/vdc",
        description="Device name asked of Nova; a hint only (the guest path is found by id).",
    )
    timeout: WaitSeconds = Field(default=300, description="Seconds to wait for the volume.")

    @field_validator("mount_point")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return checked_vm_path(value)


class SSHSettings(_Model):
    key_block: Name = Field(
        default="sails-vm-key", description="Name of the SSHKeyPair block for the VM's keypair."
    )
    alias: Name = Field(default="prefect-vm", description="Host alias written for `ssh ALIAS`.")
    config_dir: str = Field(default="~/.ssh", description="Where the ssh config and keys live.")
    connect_timeout: WaitSeconds = Field(default=300, description="Seconds to wait for SSH.")
    operator_keys: list[str] = Field(
        default_factory=list,
        description="Extra public keys allowed to log in as the VM user (the team's keys).",
    )
    trusted_host_keys: list[
        Annotated[str, StringConstraints(pattern=r"^SHA256:[A-Za-z0-9+/]{43}$")]
    ] = Field(
        default_factory=list,
        description="Host key fingerprints (SHA256:…) trusted beside the console's, for a VM "
        "whose keys were regenerated on purpose (`--trust-host-key`).",
    )

    @field_validator("operator_keys")
    @classmethod
    def _public_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not re.fullmatch(
                r"(ssh-(ed25519|rsa)|ecdsa-sha2-nistp\d+) [A-Za-z0-9+/]+={0,2}( [ -~]*)?", key
            ):
                raise ValueError(
                    f"{key[:30]!r}… is not an OpenSSH public key line ('ssh-ed25519 AAAA… comment')"
                )
        return keys


class ArcSettings(_Model):
    """CANFAR's /arc, mounted on the VM with sshfs."""

    enabled: bool = True
    host: HostName = Field(default="ws-uv.canfar.net", description="SFTP host serving /arc.")
    port: Port = 64022
    user: UserName | None = Field(
        default=None, description="CANFAR user name on the /arc host (default: the CANFAR block's)."
    )
    remote_path: str = "/"
    mount_point: str = Field(
        default="~/canfar_arc", description="Mount point on the VM (~: prefect.user's home)."
    )
    key_path: str = Field(
        default="~/.ssh/canfar_key", description="Key on the VM for /arc (prefect.user's)."
    )
    key_block: Name | None = Field(
        default=None,
        description="SSHKeyPair block whose key CANFAR already trusts, installed on the VM when "
        "it has no key yet (a re-created VM then needs no new key on CANFAR). Empty: generate.",
    )
    options: list[str] = Field(
        default_factory=lambda: ["reconnect", "ServerAliveInterval=15", "ServerAliveCountMax=10"],
        description="sshfs -o options.",
    )
    probe_timeout: float = Field(default=8, gt=0, le=60, description="Seconds before 'stale'.")
    host_keys: list[
        Annotated[
            str,
            StringConstraints(
                pattern=r"^(ssh-(ed25519|rsa)|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,2}$"
            ),
        ]
    ] = Field(
        default_factory=list,
        description="The /arc host's public keys ('ssh-ed25519 AAAA…'), pinned: sshfs accepts "
        "only these. Empty: the first key seen is kept (accept-new).",
    )

    @field_validator("remote_path")
    @classmethod
    def _remote(cls, value: str) -> str:
        return value if value == "/" else checked_vm_path(value)

    @field_validator("mount_point", "key_path")
    @classmethod
    def _vm_paths(cls, value: str) -> str:
        return checked_vm_path(value, home=True)

    @field_validator("options")
    @classmethod
    def _sshfs_options(cls, options: list[str]) -> list[str]:
        for option in options:
            name, eq, value = option.partition("=")
            if name not in SSHFS_OPTIONS:
                raise ValueError(
                    f"sshfs option {name!r} is not one this tool passes on; allowed: "
                    + ", ".join(SSHFS_OPTIONS)
                )
            pattern = SSHFS_OPTIONS[name]
            if (pattern is None and eq) or (
                pattern is not None and not re.fullmatch(pattern, value)
            ):
                form = name if pattern is None else f"{name}={pattern}"
                raise ValueError(f"{option!r}: write it as {form}")
        return options


class SmokeTest(_Model):
    """The CANFAR headless session launched to prove the VM can run the pipeline."""

    enabled: bool = True
    image: NonEmpty = "images.canfar.net/skaha/astroml:latest"
    cmd: NonEmpty = "echo"
    args: str = "alma-sails smoke test"
    cores: int = Field(default=1, ge=1)
    ram: int = Field(default=1, ge=1, description="GB")
    timeout: WaitSeconds = 600


class CanfarSettings(_Model):
    credentials_block: Name = Field(
        default="canfar", description="Name of the CanfarCredentials block."
    )
    smoke_test: SmokeTest = SmokeTest()
    renew_days_before: int = Field(default=7, ge=0, description="Warn when fewer days remain.")
