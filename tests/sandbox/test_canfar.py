"""The CANFAR stand-ins, driven by the real canfar client, real sshfs and the CDP protocol."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from blocks.canfar import CanfarCredentials
from blocks.ssh import SSHKeyPair
from tasks.canfar import certificate_expiry, fetch_proxy_certificate
from tasks.errors import BootstrapError

pytestmark = [pytest.mark.sandbox]
ROOT = Path(__file__).resolve().parents[2]


def creds(canfar, password: str | None = None) -> CanfarCredentials:  # type: ignore[no-untyped-def]
    info = canfar.info()
    from pydantic import SecretStr

    return CanfarCredentials(
        username=info["username"],
        password=SecretStr(password or canfar.password()),
        url=info["canfar_url"],
        registry_url=info["registry_url"],
        ca_bundle=info["ca_bundle"],
    )


def test_certificate_through_registry_capabilities_and_cdp(canfar_sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pem = fetch_proxy_certificate(creds(canfar_sandbox), days=30)
    assert "BEGIN CERTIFICATE" in pem and "PRIVATE KEY" in pem
    left = certificate_expiry(pem).timestamp() - time.time()
    assert 29 * 86400 < left <= 30 * 86400
    with pytest.raises(BootstrapError, match="refused user 'sailsuser'") as info:
        fetch_proxy_certificate(creds(canfar_sandbox, password="wrong-pw-77"))
    assert "wrong-pw-77" not in str(info.value)
    # the raw protocol answers 401 to a wrong password, as CADC's service does
    ca = canfar_sandbox.info()["ca_bundle"]
    r = httpx.get(
        "https://10.211.0.1:8444/cred/priv",
        params={"daysValid": 1},
        auth=("sailsuser", "nope"),
        verify=ssl.create_default_context(cafile=ca),
    )
    assert r.status_code == 401


def _client(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/tmp",
    )


def test_headless_session_with_the_real_client(canfar_sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Only what `eval "$(sails-bootstrap sandbox env)"` exports.
    out = subprocess.run(
        ["sails-bootstrap", "sandbox", "env"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    for line in out.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.strip("'")
    assert {"CANFAR_URL", "CANFAR_CERTIFICATE", "OS_CLOUD", "OS_CLIENT_CONFIG_FILE"} <= env.keys()
    r = _client(
        """
        import time
        from canfar.sessions import Session
        s = Session(errors="raise")
        ids = s.create(name="t1", image="images.canfar.net/skaha/astroml:latest", cores=1,
                       ram=1, kind="headless", cmd="sh", args="-c 'echo hello from $SKAHA_SESSION_ID; sleep 1.5; exit 3'")
        seen = []
        for _ in range(60):
            st = s.info(ids)[0]["status"]
            seen.append(st)
            if st in ("Succeeded", "Failed"):
                break
            time.sleep(0.5)
        print(ids[0], "->".join(dict.fromkeys(seen)))
        print(s.logs(ids)[ids[0]].strip())
        print(s.destroy(ids))
        print(s.fetch())
        """,
        env,
    )
    assert r.returncode == 0, r.stderr
    first, logs, destroyed, listing = r.stdout.strip().splitlines()
    sid, states = first.split()
    assert states == "Pending->Running->Failed"  # exit 3: Failed
    assert logs == f"hello from {sid}"
    assert destroyed == f"{{'{sid}': True}}" and listing == "[]"
    # CLI too
    ps = subprocess.run(
        ["canfar", "ps", "--all"], env=env, capture_output=True, text=True, timeout=120, cwd="/tmp"
    )
    assert ps.returncode == 0, ps.stderr


def test_expired_certificate_and_bad_requests_are_refused(canfar_sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cert = tmp_path / "expired.pem"
    canfar_sandbox.mint_certificate(seconds=2, path=cert)
    time.sleep(3)
    env = {**os.environ, **canfar_sandbox.env(), "CANFAR_CERTIFICATE": str(cert)}
    r = _client(
        """
        from canfar.sessions import Session
        try:
            Session(errors="raise").fetch()
        except Exception as exc:
            print("refused", getattr(getattr(exc, "response", None), "status_code", exc))
        """,
        env,
    )
    assert "refused" in r.stdout or "expired" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    ca = canfar_sandbox.info()["ca_bundle"]
    good = tmp_path / "good.pem"
    canfar_sandbox.mint_certificate(days=1, path=good)
    base = canfar_sandbox.info()["canfar_url"]
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(str(good))
    with httpx.Client(verify=ctx) as c:
        assert c.get(f"{base}/session/nosuchid").status_code == 404
        bad = c.post(
            f"{base}/session",
            params={
                "name": "x",
                "image": "images.canfar.net/x/y:1",
                "cores": 1,
                "ram": 1,
                "type": "headless",
            },
        )
        assert bad.status_code == 400 and "image" in bad.text
        big = c.post(
            f"{base}/session",
            params={
                "name": "x",
                "cores": 999,
                "ram": 1,
                "image": "images.canfar.net/skaha/astroml:latest",
            },
        )
        assert big.status_code == 400 and "exceed" in big.text
    with httpx.Client(verify=ssl.create_default_context(cafile=ca)) as c:
        assert c.get(f"{base}/session").status_code == 401
        token = {"Authorization": f"Bearer {canfar_sandbox.token()}"}
        assert c.get(f"{base}/session", headers=token).status_code == 200


def _probe(mountpoint: Path, deadline: float) -> str:
    """Never blocks the caller: the access runs in a detached child that is only polled."""
    rc = mountpoint.parent / "probe.rc"
    rc.unlink(missing_ok=True)
    probe = mountpoint / f".probe-{time.monotonic_ns()}"  # never cached: only the server answers
    subprocess.Popen(
        ["sh", "-c", f"stat {probe} 2>&1 | grep -q 'No such file'; echo $? > {rc}"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if rc.exists() and rc.read_text().strip():
            return "live" if rc.read_text().strip() == "0" else "dead"
        time.sleep(0.1)
    return "stale"


def test_sshfs_mount_recovers_and_freeze_is_detected(canfar_sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = SSHKeyPair.generate("rsa")
    key_path = key.write_private_key(tmp_path / "canfar_key")
    canfar_sandbox.add_arc_key(key.public_key)
    mp = tmp_path / "arc"
    mp.mkdir()
    info = canfar_sandbox.info()
    cmd = [
        "sshfs",
        "-p",
        str(info["arc_port"]),
        "-o",
        f"IdentityFile={key_path},reconnect,ServerAliveInterval=15,ServerAliveCountMax=10,"
        f"StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null",
        f"{info['arc_user']}@{info['arc_host']}:/",
        str(mp),
    ]
    subprocess.run(cmd, check=True, timeout=30)
    try:
        (mp / "home/sailsuser/hello.txt").write_text("from the test\n")
        assert (mp / "home/sailsuser/hello.txt").read_text() == "from the test\n"
        assert (mp / "projects/ALMA-SAILS").is_dir()

        canfar_sandbox.arc_restart()
        for _ in range(50):  # reconnect: the next accesses succeed again
            if _probe(mp, 3) == "live":
                break
            time.sleep(0.2)
        assert (mp / "home/sailsuser/hello.txt").read_text() == "from the test\n"

        canfar_sandbox.arc_freeze()
        t0 = time.monotonic()
        assert _probe(mp, 5) == "stale"
        assert time.monotonic() - t0 < 10
    finally:
        canfar_sandbox.arc_thaw()
        subprocess.run(["pkill", "-9", "-f", f"sshfs.*{mp}"], check=False)
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
    assert shutil.disk_usage(tmp_path)  # the test directory is usable again
