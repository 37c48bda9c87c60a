"""CANFAR authentication: proxy certificates obtained with no prompt, installed on the VM.

The protocol is the one ``canfar auth login`` speaks (IVOA registry → the credential service's
VOSI capabilities → the CDP proxy interface with HTTP basic auth → a PEM certificate + key), with
a configurable registry so private or local services work too. The password is sent only to the
credential service from the control machine; the VM receives the certificate alone.
"""

from __future__ import annotations

import datetime as dt
import shlex
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

from core.config import BootstrapConfig
from core.errors import BootstrapError
from core.log import logger
from core.records import Action
from tasks.arc import home
from tasks.service_user import service_dirs
from tasks.vm import VM, StepRecord, planned

if TYPE_CHECKING:
    from blocks.canfar import CanfarCredentials

CREDENTIAL_SERVICE = "ivo://cadc.nrc.ca/cred"
CDP_PROXY = "ivo://ivoa.net/std/CDP#proxy-1.0"
BASIC_AA = "ivo://ivoa.net/sso#BasicAA"
VM_CA_BUNDLE = "/etc/sails-bootstrap/ca-bundle.pem"


def _client(creds: CanfarCredentials) -> Any:
    import ssl

    import httpx

    verify = ssl.create_default_context(cafile=creds.ca_bundle) if creds.ca_bundle else True
    return httpx.Client(timeout=30, verify=verify, headers={"User-Agent": "sails-bootstrap"})


def certificate_url(creds: CanfarCredentials) -> str:
    """Find the password-authenticated CDP endpoint through the registry."""
    import httpx

    try:
        with _client(creds) as client:
            caps = client.get(creds.registry_url)
            caps.raise_for_status()
            for line in caps.text.splitlines():
                uri, _, url = line.partition("=")
                if uri.strip() == CREDENTIAL_SERVICE:
                    break
            else:
                raise BootstrapError(
                    f"the registry {creds.registry_url} does not list {CREDENTIAL_SERVICE}; "
                    "check registry_url in the CanfarCredentials block"
                )
            doc = client.get(url.strip())
            doc.raise_for_status()
    except httpx.HTTPError as exc:
        raise BootstrapError(
            f"cannot reach the CADC registry {creds.registry_url}: {exc}"
        ) from None
    for cap in ElementTree.fromstring(doc.text).findall(".//{*}capability"):
        if cap.get("standardID") != CDP_PROXY:
            continue
        for interface in cap.findall("{*}interface"):
            methods = {m.get("standardID") for m in interface.findall("{*}securityMethod")}
            access = interface.findtext("{*}accessURL")
            if BASIC_AA in methods and access:
                return access.strip()
    raise BootstrapError(f"{CREDENTIAL_SERVICE} offers no password login for certificates")


def fetch_proxy_certificate(creds: CanfarCredentials, days: int | None = None) -> str:
    """A fresh PEM proxy certificate (certificate + key) for the block's account."""
    import httpx

    if creds.password is None:
        if creds.certificate is not None:
            return creds.certificate.get_secret_value()
        raise BootstrapError("the CanfarCredentials block has no password to renew a certificate")
    url = certificate_url(creds)
    with _client(creds) as client:
        try:
            r = client.get(
                url,
                params={"daysValid": days or creds.days_valid},
                auth=(creds.username, creds.password.get_secret_value()),
            )
        except httpx.HTTPError as exc:
            raise BootstrapError(f"cannot reach the credential service: {exc}") from None
    if r.status_code in (401, 403):
        raise BootstrapError(
            f"the CADC credential service refused user {creds.username!r} (HTTP "
            f"{r.status_code}); fix the password in the CanfarCredentials block"
        )
    if r.status_code != 200 or "BEGIN CERTIFICATE" not in r.text:
        raise BootstrapError(f"the credential service answered HTTP {r.status_code}")
    return r.text


def certificate_expiry(pem: str) -> dt.datetime:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.not_valid_after_utc


def vm_cert_path(config: BootstrapConfig) -> str:
    return f"{home(config)}/.ssl/cadcproxy.pem"


def vm_env_path(config: BootstrapConfig) -> str:
    return f"{home(config)}/.config/sails-bootstrap/canfar.env"


def read_vm_expiry(vm: VM, config: BootstrapConfig) -> dt.datetime | None:
    """The expiry of the certificate on the VM (read with openssl: the key never leaves it)."""
    r = vm.run(
        f"openssl x509 -noout -enddate -in {shlex.quote(vm_cert_path(config))}",
        sudo=vm.privileged,  # the service user's file
        check=False,
    )
    if not r.ok or "notAfter=" not in r.stdout:
        return None
    text = r.stdout.strip().split("=", 1)[1]
    return dt.datetime.strptime(text, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=dt.UTC)


class CertificateRecord(StepRecord):
    """The VM's CANFAR proxy certificate: when it ends (ISO 8601), in how many days."""

    expiry: str | None = None
    days_left: float | None = None


def ensure_ca_bundle(vm: VM, config: BootstrapConfig, apply: bool = True) -> StepRecord:
    """System CAs plus the config's extra CA file, for private services (SSL_CERT_FILE)."""
    from pathlib import Path

    extra = Path(config.ca_bundle).expanduser().read_text() if config.ca_bundle else ""
    system = vm.run("cat /etc/ssl/certs/ca-certificates.crt 2>/dev/null || true").stdout
    changed = vm.write_file(VM_CA_BUNDLE, system + extra, mode="0644", apply=apply)
    return StepRecord(
        name="CA bundle",
        action=Action.CHANGE if changed else Action.KEEP,
        applied=apply,
        reason=planned([f"wrote {VM_CA_BUNDLE}"], apply) if changed else "up to date",
    )


def ensure_canfar_auth(
    vm: VM,
    config: BootstrapConfig,
    creds: CanfarCredentials,
    force: bool = False,
    apply: bool = True,
) -> CertificateRecord:
    """A valid proxy certificate on the VM and the env file the canfar client reads."""
    log = logger()
    now = dt.datetime.now(dt.UTC)
    expiry = read_vm_expiry(vm, config)
    min_left = dt.timedelta(days=config.canfar.renew_days_before)
    action = Action.KEEP
    renew = creds.token is None and (force or expiry is None or expiry - now < min_left)
    if renew and not apply:
        return CertificateRecord(
            name="canfar auth",
            action=Action.CREATE if expiry is None else Action.CHANGE,
            applied=False,
            reason=(
                "pending: a proxy certificate for the VM (it has none)"
                if expiry is None
                else f"pending: a new proxy certificate (the VM's ends {expiry:%Y-%m-%d %H:%M} UTC)"
            ),
            expiry=expiry.isoformat() if expiry else None,
        )
    if renew:
        pem = fetch_proxy_certificate(creds)
        new_expiry = certificate_expiry(pem)
        if new_expiry <= now:
            raise BootstrapError(
                f"the certificate obtained for {creds.username!r} expired on {new_expiry:%Y-%m-%d}"
                "; give the block a password or a current certificate"
            )
        service_dirs(vm, config, vm_cert_path(config), vm_env_path(config))
        vm.write_file(
            vm_cert_path(config),
            pem,
            mode="0600",
            owner=f"{config.prefect.user}:{config.prefect.user}",
            sudo=vm.privileged,
        )
        action = Action.CREATE if expiry is None else Action.CHANGE
        log.info("installed a CANFAR proxy certificate valid until %s", new_expiry.isoformat())
        expiry = new_expiry
    lines = [f"CANFAR_URL={creds.url}", f"SSL_CERT_FILE={VM_CA_BUNDLE}"]
    if creds.token is not None:
        lines.append(f"CANFAR_TOKEN={creds.token.get_secret_value()}")
    else:
        lines.append(f"CANFAR_CERTIFICATE={vm_cert_path(config)}")
    if apply and not renew:
        service_dirs(vm, config, vm_env_path(config))
    env_changed = vm.write_file(
        vm_env_path(config),
        "\n".join(lines) + "\n",
        mode="0600",
        owner=f"{config.prefect.user}:{config.prefect.user}",
        sudo=vm.privileged,
        apply=apply,
    )
    if env_changed and action == Action.KEEP:
        action = Action.CHANGE
    days = (expiry - now).total_seconds() / 86400 if expiry else None
    current = (
        f"certificate valid until {expiry:%Y-%m-%d %H:%M} UTC ({days:.1f} days)"
        if expiry
        else "bearer token"
    )
    return CertificateRecord(
        name="canfar auth",
        action=action,
        applied=apply,
        reason=current
        if apply or not env_changed
        else f"pending: {vm_env_path(config)}; {current}",
        expiry=expiry.isoformat() if expiry else None,
        days_left=days,
    )
