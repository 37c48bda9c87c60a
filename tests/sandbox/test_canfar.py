"""The CANFAR stand-ins, driven by the real canfar client, real TLS, real sshd and real sshfs.

The client runs in subprocesses whose only settings are what ``sandbox.canfar.env()`` returns
(plus PATH and a scratch HOME), as a user's shell would have them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from cryptography import x509

pytestmark = [pytest.mark.sandbox]

CRED_SERVICE = "ivo://cadc.nrc.ca/cred"
CDP_PROXY = "ivo://ivoa.net/std/CDP#proxy-1.0"
BASIC_AA = "ivo://ivoa.net/sso#BasicAA"
IMAGE = "images.canfar.net/skaha/astroml:latest"


def _ca_context(canfar, cert: Path | None = None) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    ctx = ssl.create_default_context(cafile=canfar.info()["ca_bundle"])
    if cert is not None:
        ctx.load_cert_chain(str(cert))
    return ctx


def _cdp_url(client: httpx.Client, registry_url: str) -> str:
    """registry → capabilities → the CDP interface with BasicAA, as canfar/auth/x509.py
    ``_certificate_url`` walks it."""
    r = client.get(registry_url)
    r.raise_for_status()
    caps_url = None
    for line in r.text.splitlines():
        uri, _, url = line.partition("=")
        if uri.strip() == CRED_SERVICE:
            caps_url = url.strip()
    assert caps_url, r.text
    r = client.get(caps_url)
    r.raise_for_status()
    for cap in ET.fromstring(r.text).findall(".//{*}capability"):
        if cap.get("standardID") != CDP_PROXY:
            continue
        for iface in cap.findall("{*}interface"):
            methods = {m.get("standardID") for m in iface.findall("{*}securityMethod")}
            access = iface.findtext("{*}accessURL")
            if BASIC_AA in methods and access:
                return access.strip()
    raise AssertionError(f"no BasicAA CDP interface in {r.text}")


def test_certificate_through_registry_capabilities_and_cdp(canfar_faults) -> None:  # type: ignore[no-untyped-def]
    canfar = canfar_faults
    info = canfar.info()
    with httpx.Client(verify=_ca_context(canfar), timeout=30) as client:
        url = _cdp_url(client, info["registry_url"])
        assert url == info["cred_url"]
        r = client.get(url, params={"daysValid": 30}, auth=(info["username"], canfar.password()))
        assert r.status_code == 200, r.text
        pem = r.text
        assert "BEGIN CERTIFICATE" in pem and "BEGIN PRIVATE KEY" in pem
        cert = x509.load_pem_x509_certificate(pem.encode())
        ca = x509.load_pem_x509_certificate(canfar.ca_pem().encode())
        cert.verify_directly_issued_by(ca)
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == info["username"]
        left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
        assert dt.timedelta(days=29, hours=23) < left <= dt.timedelta(days=30)

        # daysValid beyond the service's maximum is capped, as CADC caps it
        r = client.get(url, params={"daysValid": 400}, auth=(info["username"], canfar.password()))
        capped = x509.load_pem_x509_certificate(r.content)
        assert capped.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)

        # a wrong password, or none: 401 with a Basic challenge
        r = client.get(url, params={"daysValid": 1}, auth=(info["username"], "wrong-pw-77"))
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        assert "wrong-pw-77" not in r.text
        assert client.get(url, params={"daysValid": 1}).status_code == 401

        # tests can make the service issue short-lived certificates
        canfar.set_certificate_validity(60)
        r = client.get(url, params={"daysValid": 30}, auth=(info["username"], canfar.password()))
        short = x509.load_pem_x509_certificate(r.content)
        assert short.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=60)


def _client_env(canfar, home: Path, **extra: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "COLUMNS": "200", **canfar.env()}
    env.update(extra)
    return {k: v for k, v in env.items() if v}


def _python(script: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=env["HOME"],
        start_new_session=True,  # no controlling terminal: getpass reads stdin
    )


def test_canfar_gather_parses_the_sandbox_registry(canfar_sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The client's own login code (x509.gather: registry, capabilities, CDP), pointed at the
    sandbox registry instead of its built-in one; the password comes on stdin."""
    info = canfar_sandbox.info()
    out = tmp_path / "cadcproxy.pem"
    r = _python(
        f"""
        from pathlib import Path
        from pydantic import AnyHttpUrl
        import canfar.idp as idp
        from canfar.auth import x509
        idp._BUILTIN_IDPS["cadc"] = idp._BUILTIN_IDPS["cadc"].model_copy(
            update={{"registry_url": AnyHttpUrl({info["registry_url"]!r})}})
        print(x509.gather(username={info["username"]!r}, cert_path=Path({str(out)!r})))
        """,
        _client_env(canfar_sandbox, tmp_path),
        stdin=canfar_sandbox.password() + "\n",
    )
    assert r.returncode == 0, r.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert x509.load_pem_x509_certificate(out.read_bytes())


SESSION_SCRIPT = """
import asyncio, json, time
from canfar.images import Images
from canfar.sessions import AsyncSession, Session
from canfar.exceptions.session import SessionRequestError

out = {}
out["images"] = Images().fetch()
s = Session(errors="raise")
ok = s.create(name="hello-1", image="skaha/astroml", cores=1, ram=1, kind="headless",
              cmd="echo", args="hello from", env={"GREETING": "hi"})
bad = s.create(name="fails", image="images.canfar.net/skaha/astroml:latest", cores=1, ram=1,
               cmd="ls", args="/no/such/dir")
seen = {ok[0]: [], bad[0]: []}
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    infos = {i["id"]: i for i in s.info(ok + bad)}
    for sid in seen:
        if not seen[sid] or seen[sid][-1] != infos[sid]["status"]:
            seen[sid].append(infos[sid]["status"])
    if all(v[-1] in ("Succeeded", "Failed") for v in seen.values()):
        break
    time.sleep(0.2)
out["states"] = [seen[ok[0]], seen[bad[0]]]
out["logs"] = s.logs(ok)[ok[0]]
out["bad_logs"] = s.logs(bad)[bad[0]]
out["events"] = s.events(ok)[0][ok[0]]
out["succeeded"] = [r["id"] for r in s.fetch(kind="headless", status="Succeeded")]
out["record"] = s.info(ok)[0]
out["stats"] = s.stats()
out["renew_done"] = s.renew(bad, errors="ignore")
out["destroyed"] = s.destroy(ok + bad)
out["after"] = [r["id"] for r in s.fetch()]
try:
    s.info(ok)
except SessionRequestError as exc:
    out["gone"] = [e.response.status_code for e in exc.errors.values()]

async def run_async():
    async with AsyncSession(errors="raise") as a:
        ids = await a.create(name="async", image="images.canfar.net/skaha/terminal:1.1.1",
                             cores=1, ram=1, cmd="env", replicas=2)
        for _ in range(150):
            infos = await a.info(ids)
            if all(i["status"] == "Succeeded" for i in infos):
                break
            await asyncio.sleep(0.2)
        logs = await a.logs(ids)
        await a.destroy(ids)
        return [i["status"] for i in infos], logs
out["async_states"], out["async_logs"] = asyncio.run(run_async())
print(json.dumps(out))
"""


def test_headless_sessions_with_the_real_client(canfar_faults, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = _client_env(canfar_faults, tmp_path)
    assert set(canfar_faults.env()) == {"CANFAR_URL", "CANFAR_CERTIFICATE", "SSL_CERT_FILE"}
    r = _python(SESSION_SCRIPT, env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert IMAGE in out["images"]
    assert out["states"][0] == ["Pending", "Running", "Succeeded"] or out["states"][0] == [
        "Pending",
        "Succeeded",
    ]
    assert out["states"][1][-1] == "Failed"
    assert out["logs"] == "hello from\n"
    assert "No such file or directory" in out["bad_logs"]
    assert "Started" in out["events"]
    ok_id = out["record"]["id"]
    assert ok_id in out["succeeded"]
    assert out["record"]["image"] == IMAGE and out["record"]["userid"] == "sailsuser"
    assert out["record"]["requestedCPUCores"] == "1" and out["record"]["requestedRAM"] == "1G"
    assert "cores" in out["stats"] and "ram" in out["stats"]
    assert list(out["renew_done"].values()) == [False]  # a finished session cannot be renewed
    assert all(out["destroyed"].values()) and ok_id not in out["after"]
    assert out["gone"] == [404]
    assert out["async_states"] == ["Succeeded", "Succeeded"]
    for i, text in enumerate(out["async_logs"].values(), start=1):
        assert f"REPLICA_ID={i}" in text and "REPLICA_COUNT=2" in text
        assert "CANFAR" not in text  # the session sees its own environment, not the caller's

    # the CLI, with the same environment
    ps = subprocess.run(
        ["canfar", "ps", "--all"], env=env, capture_output=True, text=True, timeout=120
    )
    assert ps.returncode == 0, ps.stdout + ps.stderr


def test_bearer_token_and_errors_as_the_service_answers(canfar_faults, tmp_path) -> None:  # type: ignore[no-untyped-def]
    canfar = canfar_faults
    base = canfar.info()["canfar_url"]
    cert = tmp_path / "good.pem"
    canfar.mint_certificate(days=1, path=cert)
    with httpx.Client(verify=_ca_context(canfar, cert), timeout=30) as c:
        r = c.get(f"{base}/session/nosuchid")
        assert (r.status_code, r.text.strip()) == (404, "session nosuchid not found")
        params = {"name": "x", "image": IMAGE, "cores": 1, "ram": 1, "type": "headless"}
        r = c.post(f"{base}/session", data={**params, "image": "images.canfar.net/x/y:1"})
        assert r.status_code == 404 and "image not found" in r.text
        r = c.post(f"{base}/session", data={**params, "image": "docker.io/library/bash:5"})
        assert r.status_code == 400 and "must come from one of" in r.text
        r = c.post(f"{base}/session", data={**params, "cores": 999})
        assert (r.status_code, r.text.strip()) == (400, "Invalid value for 'cores': 999")
        r = c.post(f"{base}/session", data={**params, "name": "bad name!"})
        assert r.status_code == 400 and "alpha-numeric" in r.text
        canfar.set_failure(fail_next_creates=1)
        assert c.post(f"{base}/session", data=params).status_code == 503
        r = c.post(f"{base}/session", data={**params, "cmd": "true"})
        assert r.status_code == 200 and r.text.endswith("\n")
        assert c.delete(f"{base}/session/{r.text.strip()}").status_code == 200
    with httpx.Client(verify=_ca_context(canfar), timeout=30) as c:
        r = c.get(f"{base}/session")
        assert r.status_code == 401 and r.text.startswith("NotAuthenticatedException")
        assert c.get(f"{base}/session", headers={"Authorization": "Bearer nope"}).status_code == 401
        # the VOSI endpoints are public, as the client's discovery expects
        assert c.get(base.rsplit("/", 1)[0] + "/availability").status_code == 200

    # the real client with a bearer token instead of a certificate; injected 503s surface
    env = _client_env(canfar, tmp_path, CANFAR_CERTIFICATE="", CANFAR_TOKEN=canfar.token())
    canfar.set_failure(fail_next_creates=2)
    r = _python(
        f"""
        from canfar.sessions import Session
        from canfar.exceptions.session import SessionRequestError
        s = Session()
        print("ignored", s.create(name="t", image={IMAGE!r}, cores=1, ram=1, cmd="true"))
        try:
            Session(errors="raise").create(name="t", image={IMAGE!r}, cores=1, ram=1)
        except SessionRequestError as exc:
            print("raised", [e.response.status_code for e in exc.errors.values()])
        print("listed", type(s.fetch()).__name__)
        """,
        env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["ignored []", "raised [503]", "listed list"]


def test_expired_certificate_is_refused(canfar_faults, tmp_path) -> None:  # type: ignore[no-untyped-def]
    canfar = canfar_faults
    cert = tmp_path / "expiring.pem"
    canfar.mint_certificate(seconds=2, path=cert)
    base = canfar.info()["canfar_url"]
    with httpx.Client(verify=_ca_context(canfar, cert), timeout=30) as c:
        assert c.get(f"{base}/session").status_code == 200
        time.sleep(3)
        r = c.get(f"{base}/session")
    assert r.status_code == 401 and "expired" in r.text
    # the client itself refuses an expired certificate before any request
    r = _python(
        """
        from canfar.sessions import Session
        try:
            Session(errors="raise").fetch()
        except Exception as exc:
            print("refused:", exc)
        """,
        _client_env(canfar, tmp_path, CANFAR_CERTIFICATE=str(cert)),
    )
    assert "refused:" in r.stdout and "expired" in r.stdout, r.stdout + r.stderr


# -- /arc over sshfs -------------------------------------------------------------------------
class MountNamespace:
    """A private mount namespace held open by a sleeping process: sshfs and every access to
    the mount run inside it, so nothing on the host sees (or stats) the test's mount."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sleep", "3600"],
            start_new_session=True,
        )
        time.sleep(0.2)

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--", *cmd]

    def run(self, *cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*cmd), capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


def probe(ns: MountNamespace, mountpoint: Path, within: float, scratch: Path) -> str:
    """'live', 'dead' or 'stale', without ever blocking this process: a child looks up a name
    no cache can answer and records what happened; this process only polls for that record."""
    name = f".probe-{time.monotonic_ns()}"
    out = scratch / f"{name}.out"
    child = subprocess.Popen(
        ns.argv("sh", "-c", f"stat {mountpoint}/{name} > {out}.tmp 2>&1; mv {out}.tmp {out}"),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + within
    while time.monotonic() < end:
        if out.exists():
            child.wait()
            return "live" if "No such file or directory" in out.read_text() else "dead"
        time.sleep(0.05)
    return "stale"  # the child stays behind, stuck in the kernel until the mount goes


def test_arc_over_sshfs_reconnects_and_a_frozen_host_is_stale(canfar_faults, tmp_path) -> None:  # type: ignore[no-untyped-def]
    canfar = canfar_faults
    info = canfar.info()
    key = tmp_path / "canfar_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    canfar.add_arc_key(key.with_suffix(".pub").read_text())
    known = tmp_path / "known_hosts"
    known.write_text(
        "".join(f"[{info['arc_host']}]:{info['arc_port']} {k}\n" for k in info["arc_host_keys"])
    )
    mp = tmp_path / "canfar_arc"
    mp.mkdir()
    # The VM's own options. (With ServerAliveInterval=1,ServerAliveCountMax=2 a frozen host
    # turns into EIO after ~3 s instead of a hang: "dead", not "stale".)
    ns = MountNamespace()
    sshfs = subprocess.Popen(
        ns.argv(
            "sshfs",
            "-f",
            "-p",
            str(info["arc_port"]),
            "-o",
            f"IdentityFile={key},reconnect,ServerAliveInterval=15,ServerAliveCountMax=10,"
            f"UserKnownHostsFile={known},StrictHostKeyChecking=yes,BatchMode=yes",
            f"{info['arc_user']}@{info['arc_host']}:/",
            str(mp),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # nsenter execs sshfs, so this pid is sshfs itself
    try:
        deadline = time.monotonic() + 20
        while ns.run("mountpoint", "-q", str(mp)).returncode:
            assert sshfs.poll() is None, sshfs.stderr.read() if sshfs.stderr else ""
            assert time.monotonic() < deadline, "sshfs did not mount"
            time.sleep(0.1)
        note = mp / "home" / info["arc_user"] / "note.txt"
        assert ns.run("sh", "-c", f"echo from the test > {note}").returncode == 0
        assert ns.run("cat", str(note)).stdout == "from the test\n"
        assert ns.run("test", "-d", str(mp / "projects" / info["arc_project"])).returncode == 0
        assert probe(ns, mp, 5, tmp_path) == "live"

        # the host restarts: the next access after it is back reconnects
        canfar.arc_restart()
        states = [probe(ns, mp, 5, tmp_path)]
        deadline = time.monotonic() + 30
        while states[-1] != "live" and time.monotonic() < deadline:
            time.sleep(0.3)
            states.append(probe(ns, mp, 5, tmp_path))
        assert states[-1] == "live", states
        assert ns.run("cat", str(note)).stdout == "from the test\n"

        # the host hangs (processes stopped, TCP up): a detached probe says "stale" in time
        canfar.arc_freeze()
        t0 = time.monotonic()
        assert probe(ns, mp, 5, tmp_path) == "stale"
        # in time: its own 5 s limit plus start-up, far short of sshfs's own give-up (15 s x 10)
        assert time.monotonic() - t0 < 20
        canfar.arc_thaw()
        deadline = time.monotonic() + 60
        while probe(ns, mp, 5, tmp_path) != "live":
            assert time.monotonic() < deadline, "no recovery after thaw"
            time.sleep(0.5)
    finally:
        canfar.arc_thaw()
        if sshfs.poll() is None:
            os.kill(sshfs.pid, signal.SIGKILL)  # releases any caller stuck in the mount
        sshfs.wait()
        ns.run("fusermount3", "-u", "-z", str(mp))
        ns.close()


# -- the guests' package index ---------------------------------------------------------------
def test_package_index_alone_installs_prefect_and_canfar(canfar_sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    index = canfar_sandbox.info()["package_index"]
    assert httpx.get(f"{index}/prefect/", timeout=10).status_code == 200
    uv = shutil.which("uv")
    assert uv, "uv is needed for this test"
    venv = tmp_path / "venv"
    env = {  # no configuration, no cache, no other index: only the sandbox's
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "UV_NO_CONFIG": "1",
        "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
        "UV_PYTHON_DOWNLOADS": "never",
    }
    subprocess.run([uv, "venv", "-q", "--python", "3.11", str(venv)], env=env, check=True)
    r = subprocess.run(
        [uv, "pip", "install", "--index-url", index, "--python", str(venv / "bin" / "python"),
         "prefect==3.9.1", "canfar==1.5.2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import prefect, canfar.sessions; print(prefect.__version__)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "3.9.1", r.stderr


def test_blocks_saved_by_sails_sandbox_are_read_by_the_product_on_a_fresh_home(
    canfar_sandbox, sandbox_env, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """The demo's sequence with no Prefect API set, on a fresh Prefect home: the product's
    command starts the local server (its block key kept outside the database), `sails-sandbox
    blocks` saves the CANFAR account there, and the product reads it back. (A Prefect server
    started by the sandbox on its own made another key, and the product's read failed.)"""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_PROFILE="ephemeral")
    bin_dir = Path(sys.executable).parent

    def cli(*argv: str) -> str:
        r = subprocess.run(
            argv, env=env, cwd=root, capture_output=True, text=True, timeout=600, check=False
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r.stdout

    cli(str(bin_dir / "sails-bootstrap"), "blocks", "register")
    saved = cli(str(bin_dir / "sails-sandbox"), "blocks", "--config", "examples/sandbox.yaml")
    assert "saved CanfarCredentials block 'sails-demo-canfar'" in saved, saved
    read = (
        "from sails_bootstrap.local_api import ensure_api; ensure_api(); "
        "from blocks import CanfarCredentials; "
        "print(type(CanfarCredentials.load('sails-demo-canfar')).__name__)"
    )
    assert cli(sys.executable, "-c", read).strip().endswith("CanfarCredentials")
