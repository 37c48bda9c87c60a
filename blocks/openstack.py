"""OpenStack credentials: the auth section of a clouds.yaml entry, kept as a Prefect block."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, SecretStr

if TYPE_CHECKING:
    from openstack.connection import Connection


AuthType = Literal["password", "v3applicationcredential"]

#: clouds.yaml ``auth_type`` spellings and the plugin this block uses for each.
_AUTH_TYPES: dict[str, AuthType] = {
    "password": "password",
    "v3password": "password",
    "v3applicationcredential": "v3applicationcredential",
}


class CredentialsError(ValueError):
    """Credentials that cannot be used as given; the message says how to fix them."""


def missing_password(cloud: str | None) -> str:
    where = f"clouds.yaml entry {cloud!r}" if cloud else "the OpenStackCredentials block"
    return (
        f"{where} uses password auth but holds no password (the dashboard's clouds.yaml "
        "leaves it out). Either export OS_PASSWORD, put it in secure.yaml, or better, create an "
        "application credential (on Arbutus: the arbutus-canfar dashboard you sign in to with "
        "your CADC account, Identity > Application Credentials) and use the clouds.yaml it "
        "offers (auth_type: v3applicationcredential)"
    )


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
    auth_type: AuthType = Field(
        default="v3applicationcredential", description="How to authenticate."
    )
    username: str | None = Field(default=None, description="User name (password auth).")
    password: SecretStr | None = Field(default=None, description="Password (password auth).")
    project_name: str | None = Field(default=None, description="Project (password auth).")
    project_id: str | None = Field(
        default=None,
        title="Project ID",
        description="Project to scope to (password auth); preferred over the name when given.",
    )
    user_domain_name: str = Field(default="Default", title="User domain")
    user_domain_id: str | None = Field(
        default=None, title="User domain ID", description="Used instead of the name when given."
    )
    project_domain_name: str = Field(default="Default", title="Project domain")
    project_domain_id: str | None = Field(
        default=None, title="Project domain ID", description="Used instead of the name when given."
    )
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
        """Read an entry of clouds.yaml (``OS_CLIENT_CONFIG_FILE`` and the usual places; a
        secure.yaml beside it may hold the secret). A password entry without a password takes
        ``OS_PASSWORD``, as the openstack client does; with neither, a CredentialsError says how
        to give one. Project and domain ids are kept: scoping is by id when the entry has one."""
        import openstack.config

        region = openstack.config.OpenStackConfig().get_one(cloud=cloud, validate=False)
        cfg = region.config
        name = cloud or region.name
        auth = dict(cfg.get("auth", {}))
        auth_type = _AUTH_TYPES.get(str(cfg.get("auth_type") or "password"))
        if auth_type is None:
            raise CredentialsError(
                f"clouds.yaml entry {name!r} uses auth_type {cfg.get('auth_type')!r}; "
                "sails-bootstrap supports v3applicationcredential (recommended: create one in "
                "the dashboard under Identity > Application Credentials) and password"
            )
        if not auth.get("auth_url"):
            raise CredentialsError(f"clouds.yaml entry {name!r} has no auth.auth_url")
        secret = auth.get("application_credential_secret")
        password = auth.get("password")
        if auth_type == "password" and not password:
            password = os.environ.get("OS_PASSWORD") or None
            if not password:
                raise CredentialsError(missing_password(name))
        if auth_type == "v3applicationcredential" and not (
            auth.get("application_credential_id") and secret
        ):
            raise CredentialsError(
                f"clouds.yaml entry {name!r} needs auth.application_credential_id and "
                "auth.application_credential_secret (the clouds.yaml the dashboard offers when "
                "the application credential is created holds both)"
            )
        return cls(
            auth_url=auth["auth_url"],
            auth_type=auth_type,
            username=auth.get("username"),
            password=SecretStr(password) if password else None,
            project_name=auth.get("project_name"),
            project_id=auth.get("project_id"),
            user_domain_name=auth.get("user_domain_name") or "Default",
            user_domain_id=auth.get("user_domain_id"),
            project_domain_name=auth.get("project_domain_name") or "Default",
            project_domain_id=auth.get("project_domain_id"),
            application_credential_id=auth.get("application_credential_id"),
            application_credential_secret=SecretStr(secret) if secret else None,
            region_name=cfg.get("region_name") or None,
            interface=cfg.get("interface") or "public",
            cacert=cfg.get("cacert"),
        )

    def _auth(self) -> dict[str, Any]:
        if self.auth_type == "v3applicationcredential":
            # Project-scoped by Keystone itself: no project or domain is sent with it.
            if not (self.application_credential_id and self.application_credential_secret):
                raise CredentialsError(
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
        if not self.password:
            raise CredentialsError(missing_password(None))
        if not (self.username and (self.project_name or self.project_id)):
            raise CredentialsError(
                "password auth needs username, password and project_id (or project_name)"
            )
        auth: dict[str, str] = {
            "auth_url": self.auth_url,
            "username": self.username,
            "password": self.password.get_secret_value(),
        }
        if self.user_domain_id:
            auth["user_domain_id"] = self.user_domain_id
        else:
            auth["user_domain_name"] = self.user_domain_name
        if self.project_id:  # an id names one project whatever its domain
            auth["project_id"] = self.project_id
        else:
            auth["project_name"] = str(self.project_name)
            if self.project_domain_id:
                auth["project_domain_id"] = self.project_domain_id
            else:
                auth["project_domain_name"] = self.project_domain_name
        return auth

    def get_connection(self, environment: str | None = None) -> Connection:
        """An openstacksdk Connection (lazy: nothing is sent until the first call).

        ``environment`` goes into the User-Agent (``sails-bootstrap/ENV``), so the cloud's
        request logs tell one environment's runs from another's."""
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
            "app_version": environment,
        }
        if self.region_name:
            kwargs["region_name"] = self.region_name
        if self.cacert:
            kwargs["cacert"] = self.cacert
        return openstack.connect(**kwargs)

    def delegated(
        self, name: str, kept: OpenStackCredentials | None = None, environment: str | None = None
    ) -> tuple[OpenStackCredentials, bool]:
        """Credentials for another machine (the VM), never holding a password.

        An application credential is handed on as it is. With a password, the user's Keystone
        application credential ``name`` stands in: reused when ``kept`` (what an earlier call
        returned) still names it, otherwise made anew (Keystone shows a secret only once, so one
        whose secret is lost is replaced). Restricted: it cannot make further credentials.
        Returns the credentials and whether Keystone was changed."""
        if self.auth_type == "v3applicationcredential":
            return self, False
        if kept is not None and self.delegated_is_current(name, kept, environment):
            return kept, False
        conn = self.get_connection(environment)
        identity: Any = conn.identity  # v3: the only identity API this block speaks
        try:
            user = str(conn.current_user_id)
            existing = find_or_none(identity.find_application_credential, user, name)
            if existing is not None:
                identity.delete_application_credential(user, existing)
            made = identity.create_application_credential(
                user,
                name,
                description="sails-bootstrap: the orchestration VM's own credential",
                unrestricted=False,
            )
        finally:
            conn.close()
        return (
            self.model_copy(
                update={
                    "auth_type": "v3applicationcredential",
                    "username": None,
                    "password": None,
                    "project_name": None,
                    "project_id": None,
                    "application_credential_id": made.id,
                    "application_credential_secret": SecretStr(str(made.secret)),
                }
            ),
            True,
        )

    def delegated_is_current(
        self, name: str, kept: OpenStackCredentials | None, environment: str | None = None
    ) -> bool:
        """Whether :meth:`delegated` would hand on ``kept`` as it is (read only): an application
        credential always; for a password, ``kept`` still names Keystone's credential ``name``."""
        if self.auth_type == "v3applicationcredential":
            return True
        if kept is None or kept.auth_type != "v3applicationcredential":
            return False
        conn = self.get_connection(environment)
        identity: Any = conn.identity
        try:
            user = str(conn.current_user_id)
            existing = find_or_none(identity.find_application_credential, user, name)
        finally:
            conn.close()
        return existing is not None and existing.id == kept.application_credential_id

    def revoke_delegated(self, name: str, environment: str | None = None) -> bool:
        """Delete the application credential ``name`` that :meth:`delegated` made (password
        credentials only; an application credential cannot see or manage others)."""
        if self.auth_type == "v3applicationcredential":
            return False
        conn = self.get_connection(environment)
        identity: Any = conn.identity  # v3: the only identity API this block speaks
        try:
            user = str(conn.current_user_id)
            existing = find_or_none(identity.find_application_credential, user, name)
            if existing is None:
                return False
            identity.delete_application_credential(user, existing)
            return True
        finally:
            conn.close()

    def get_client(self, *args: Any, **kwargs: Any) -> Connection:
        return self.get_connection()


def find_or_none(find: Callable[..., Any], *args: Any) -> Any | None:
    """``find(*args)`` (an openstacksdk ``find_*`` proxy method), or None when nothing has that
    name or id. (``ignore_missing=True``, the ``find_*`` default, is deprecated in openstacksdk.)"""
    from openstack import exceptions as os_exc

    try:
        return find(*args, ignore_missing=False)
    except os_exc.NotFoundException:
        return None
