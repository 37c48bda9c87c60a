"""CANFAR credentials: what the canfar client needs to authenticate with no prompt."""

from __future__ import annotations

from typing import Any

from canfar.idp import get_idp
from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, SecretStr, model_validator

#: The IVOA registry the canfar client itself asks for CADC's services (its built-in "cadc"
#: identity provider), so a login here finds the credential service where ``canfar`` does.
CADC_REGISTRY_URL = str(get_idp("cadc").registry_url)
CANFAR_SESSION_URL = "https://ws-uv.canfar.net/skaha/v1"


class CanfarCredentials(CredentialsBlock):
    """A CADC account (for 30-day X.509 proxy certificates) or a ready certificate/token.

    Load and read the certificate protocol's settings::

        creds = CanfarCredentials.load("canfar")

    The password is only ever sent to the CADC credential service (found through the IVOA
    registry at ``registry_url``) to obtain a proxy certificate; it never reaches the VM.
    """

    _block_type_name = "CANFAR Credentials"
    _block_type_slug = "canfar-credentials"
    _description = "CADC credentials for CANFAR: username + password, a certificate, or a token."
    _logo_url = None

    username: str = Field(description="CADC user name (also the /arc user).")
    password: SecretStr | None = Field(
        default=None, description="CADC password, used only to obtain proxy certificates."
    )
    certificate: SecretStr | None = Field(
        default=None, description="An existing proxy certificate (PEM, certificate + key)."
    )
    token: SecretStr | None = Field(default=None, description="A bearer token instead.")
    url: str = Field(default=CANFAR_SESSION_URL, title="Session API URL")
    registry_url: str = Field(default=CADC_REGISTRY_URL, title="IVOA registry URL")
    days_valid: int = Field(default=30, ge=1, le=30, description="Certificate lifetime asked for.")
    ca_bundle: str | None = Field(
        default=None, description="PEM CA certificates that sign the services (private sites)."
    )

    @model_validator(mode="after")
    def _one_way_in(self) -> CanfarCredentials:
        if not (self.password or self.certificate or self.token):
            raise ValueError("give a password, a certificate or a token")
        return self

    def get_client(self, *args: Any, **kwargs: Any) -> Any:
        """A canfar ``Session`` for this account (token or certificate file must be set up)."""
        from canfar.sessions import Session

        return Session(*args, **kwargs)
