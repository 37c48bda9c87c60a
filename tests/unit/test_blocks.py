from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from blocks import CanfarCredentials, OpenStackCredentials, SSHKeyPair
from blocks.ssh import fingerprint

PASSWORD = "pw-7f3a9c1e-do-not-log"
APP_SECRET = "appsecret-51bd-do-not-log"
CADC_PASSWORD = "cadc-1e2d-do-not-log"


def test_generated_keys_have_matching_fingerprints() -> None:
    for kind in ("ed25519", "rsa"):
        key = SSHKeyPair.generate(kind, comment="t")  # type: ignore[arg-type]
        assert key.public_key.endswith(" t")
        assert key.fingerprint == key.pkey().fingerprint == fingerprint(key.public_key)
    assert SSHKeyPair.generate("rsa").pkey().get_bits() == 4096


def test_private_key_files_are_0600_and_removed(tmp_path: Path) -> None:
    key = SSHKeyPair.generate()
    path = key.write_private_key(tmp_path / "sub" / "id")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key.private_key.get_secret_value()
    with key.private_key_file() as temp:
        assert stat.S_IMODE(temp.stat().st_mode) == 0o600
    assert not temp.exists()


def test_secrets_stay_out_of_reprs_and_errors() -> None:
    creds = OpenStackCredentials(
        auth_url="http://127.0.0.1:1/v3",
        auth_type="password",
        username="u",
        password=SecretStr(PASSWORD),
        project_name="p",
    )
    assert PASSWORD not in repr(creds) and PASSWORD not in str(creds.model_dump())
    with pytest.raises(ValueError, match="application_credential_id") as info:
        OpenStackCredentials(auth_url="http://x/v3").get_connection()
    assert APP_SECRET not in str(info.value)


def test_canfar_credentials_need_a_way_in() -> None:
    with pytest.raises(ValueError, match="password, a certificate or a token"):
        CanfarCredentials(username="someone")


def test_openstack_credentials_from_clouds_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        "clouds:\n  mycloud:\n    auth_type: v3applicationcredential\n    region_name: RegionOne\n"
        "    auth:\n      auth_url: http://127.0.0.1:5000/v3\n"
        f"      application_credential_id: abc\n      application_credential_secret: {APP_SECRET}\n"
    )
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    creds = OpenStackCredentials.from_clouds_yaml("mycloud")
    assert creds.auth_type == "v3applicationcredential"
    assert creds.application_credential_id == "abc"
    assert creds.application_credential_secret is not None
    assert creds.application_credential_secret.get_secret_value() == APP_SECRET
    assert creds.region_name == "RegionOne"
    conn = creds.get_connection()  # lazy: no request is sent
    assert conn.config.get_auth_args()["application_credential_secret"] == APP_SECRET


def test_canfar_registry_is_the_one_the_canfar_client_uses() -> None:
    from canfar.idp import get_idp

    creds = CanfarCredentials(username="someone", password=SecretStr(CADC_PASSWORD))
    assert creds.registry_url == str(get_idp("cadc").registry_url)
    assert creds.registry_url == "https://cadc-west-01.canfar.net/reg/resource-caps"
    assert CanfarCredentials.model_fields["registry_url"].default == creds.registry_url


# The password clouds.yaml the dashboard offers (Horizon's template): project by id and name,
# the user's domain, no password.
DASHBOARD_CLOUDS_YAML = """clouds:
  arbutus:
    auth:
      auth_url: https://arbutus-canfar.example.org:5000
      username: "cadcuser"
      project_id: 3f1e0c6b9a2d4e8f8c7b6a5d4c3b2a19
      project_name: "canfar-alma-sails"
      user_domain_name: "CANFAR"
    region_name: "RegionOne"
    interface: "public"
    identity_api_version: 3
"""


def _clouds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(text)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    monkeypatch.delenv("OS_PASSWORD", raising=False)
    monkeypatch.delenv("OS_CLOUD", raising=False)


def test_dashboard_clouds_yaml_without_password_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blocks.openstack import CredentialsError

    _clouds(tmp_path, monkeypatch, DASHBOARD_CLOUDS_YAML)
    with pytest.raises(CredentialsError) as info:
        OpenStackCredentials.from_clouds_yaml("arbutus")
    message = str(info.value)
    for fix in ("OS_PASSWORD", "secure.yaml", "arbutus-canfar", "Application Credentials"):
        assert fix in message

    # OS_PASSWORD fills it, as for the openstack client; scoping is by the project's id.
    monkeypatch.setenv("OS_PASSWORD", PASSWORD)
    creds = OpenStackCredentials.from_clouds_yaml("arbutus")
    assert creds.project_id == "3f1e0c6b9a2d4e8f8c7b6a5d4c3b2a19"
    assert PASSWORD not in repr(creds)
    auth = creds.get_connection().config.get_auth_args()
    assert auth["project_id"] == "3f1e0c6b9a2d4e8f8c7b6a5d4c3b2a19"
    assert "project_name" not in auth and "project_domain_name" not in auth
    assert auth["user_domain_name"] == "CANFAR"
    assert auth["password"] == PASSWORD


def test_domain_ids_are_kept_and_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clouds(
        tmp_path,
        monkeypatch,
        "clouds:\n  c:\n    auth_type: v3password\n    auth:\n"
        "      auth_url: http://127.0.0.1:5000/v3\n      username: u\n"
        f"      password: {PASSWORD}\n      project_name: p\n"
        "      project_domain_id: pdom01\n      user_domain_id: udom01\n",
    )
    creds = OpenStackCredentials.from_clouds_yaml("c")
    assert (creds.auth_type, creds.project_domain_id, creds.user_domain_id) == (
        "password",
        "pdom01",
        "udom01",
    )
    auth = creds.get_connection().config.get_auth_args()
    assert auth["project_name"] == "p" and auth["project_domain_id"] == "pdom01"
    assert auth["user_domain_id"] == "udom01"
    assert "user_domain_name" not in auth and "project_domain_name" not in auth


def test_application_credential_entry_and_unsupported_auth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blocks.openstack import CredentialsError

    # The application credential's clouds.yaml as the dashboard offers it, secret left out.
    _clouds(
        tmp_path,
        monkeypatch,
        "clouds:\n  a:\n    auth_type: v3applicationcredential\n    auth:\n"
        "      auth_url: http://127.0.0.1:5000\n      application_credential_id: abc\n"
        "  o:\n    auth_type: v3oidcpassword\n    auth:\n      auth_url: http://x:5000\n",
    )
    with pytest.raises(CredentialsError, match="application_credential_secret"):
        OpenStackCredentials.from_clouds_yaml("a")
    with pytest.raises(CredentialsError, match="v3applicationcredential") as info:
        OpenStackCredentials.from_clouds_yaml("o")
    assert "v3oidcpassword" in str(info.value)
