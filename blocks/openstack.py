"""OpenStack credentials: the auth section of a clouds.yaml entry, kept as a Prefect block."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, SecretStr

if TYPE_CHECKING:
    from openstack.connection import Connection


class OpenStackCredentials(CredentialsBlock):
    """Credentials for one OpenStack project (password or application credential).

    Load stored credentials and open a connection::

        creds = OpenStackCredentials.load("arbutus")
        conn = creds.get_connection()

    Build one from a clouds.yaml entry (``OS_CLOUD`` when no name is given)::

        OpenStackCredentials.from_clouds_yaml("arbutus").save("arbutus")
    """

    _block_type_name = "OpenStack Credentials"
    _block_type_slug = "openstack-credentials"
    _description = "Credentials for an OpenStack project, as in a clouds.yaml auth section."
    _logo_url = None

    auth_url: str = Field(
        description="Keystone URL, e.g. https://arbutus.cloud.computecanada.ca:5000/v3"
    )
    auth_type: Literal["password", "v3applicationcredential"] = Field(
        default="v3applicationcredential", description="How to authenticate."
    )
    username: str | None = Field(default=None, description="User name (password auth).")
    password: SecretStr | None = Field(default=None, description="Password (password auth).")
    project_name: str | None = Field(default=None, description="Project (password auth).")
    project_id: str | None = Field(default=None, title="Project ID")
    user_domain_name: str = Field(default="Default", title="User domain")
    project_domain_name: str = Field(default="Default", title="Project domain")
    application_credential_id: str | None = Field(default=None, title="Application credential ID")
    application_credential_secret: SecretStr | None = Field(
        default=None, title="Application credential secret"
    )
    region_name: str | None = Field(default=None, title="Region")
    interface: Literal["public", "internal", "admin"] = Field(default="public")
    cacert: str | None = Field(default=None, title="CA bundle path", description="PEM file.")
    api_timeout: float = Field(default=60, description="Seconds per API request.")
    status_code_retries: int = Field(
        default=3, description="Retries of 429/503 answers by keystoneauth (honours Retry-After)."
    )
    connect_retries: int = Field(default=3, description="Retries of failed connections.")

    @classmethod
    def from_clouds_yaml(cls, cloud: str | None = None) -> OpenStackCredentials:
        """Read an entry of clouds.yaml (``OS_CLIENT_CONFIG_FILE`` and the usual places)."""
        import openstack.config

        region = openstack.config.OpenStackConfig().get_one(cloud=cloud)
        cfg = region.config
        auth = dict(cfg.get("auth", {}))
        secret = auth.get("application_credential_secret")
        password = auth.get("password")
        return cls(
            auth_url=auth["auth_url"],
            auth_type=cfg.get("auth_type") or "password",
            username=auth.get("username"),
            password=SecretStr(password) if password else None,
            project_name=auth.get("project_name"),
            project_id=auth.get("project_id"),
            user_domain_name=auth.get("user_domain_name") or "Default",
            project_domain_name=auth.get("project_domain_name") or "Default",
            application_credential_id=auth.get("application_credential_id"),
            application_credential_secret=SecretStr(secret) if secret else None,
            region_name=cfg.get("region_name") or None,
            interface=cfg.get("interface") or "public",
            cacert=cfg.get("cacert"),
        )

    def _auth(self) -> dict[str, Any]:
        if self.auth_type == "v3applicationcredential":
            if not (self.application_credential_id and self.application_credential_secret):
                raise ValueError(
                    "application credential auth needs application_credential_id and "
                    "application_credential_secret"
                )
            return {
                "auth_url": self.auth_url,
                "application_credential_id": self.application_credential_id,
                "application_credential_secret": (
                    self.application_credential_secret.get_secret_value()
                ),
            }
        if not (self.username and self.password and (self.project_name or self.project_id)):
            raise ValueError("password auth needs username, password and project_name/project_id")
        auth: dict[str, str] = {
            "auth_url": self.auth_url,
            "username": self.username,
            "password": self.password.get_secret_value(),
            "user_domain_name": self.user_domain_name,
            "project_domain_name": self.project_domain_name,
        }
        if self.project_name:
            auth["project_name"] = self.project_name
        elif self.project_id:
            auth["project_id"] = self.project_id
        return auth

    def get_connection(self) -> Connection:
        """An openstacksdk Connection (lazy: nothing is sent until the first call)."""
        import openstack

        kwargs: dict[str, Any] = {
            "auth_type": self.auth_type,
            "auth": self._auth(),
            "interface": self.interface,
            "identity_api_version": "3",
            "api_timeout": self.api_timeout,
            "status_code_retries": self.status_code_retries,
            "connect_retries": self.connect_retries,
            "load_yaml_config": False,
            "load_envvars": False,
            "app_name": "sails-bootstrap",
        }
        if self.region_name:
            kwargs["region_name"] = self.region_name
        if self.cacert:
            kwargs["cacert"] = self.cacert
        return openstack.connect(**kwargs)

    def get_client(self, *args: Any, **kwargs: Any) -> Connection:
        return self.get_connection()
