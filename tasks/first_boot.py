"""The VM's first boot: its SSH port accepting connections, a verified login, cloud-init done."""

from __future__ import annotations

import socket
import time

from core.errors import BOOTING_ERRNOS, BootstrapError
from core.log import Progress, logger
from core.poll import poll
from tasks.vm import VM, StepRecord


def wait_for_port(host: str, port: int, timeout: float) -> float:
    """Wait until ``host:port`` accepts a TCP connection; return the seconds waited.

    A guest that Nova calls ACTIVE is still booting: its address answers "no route to host",
    refuses, or stays silent until sshd listens (20-90 s on a real cloud). Those are waited out
    within ``timeout``; only then is it an error, naming what to check."""
    t0 = time.monotonic()

    def refused(exc: OSError) -> BootstrapError:
        return BootstrapError(
            f"{host}:{port} did not accept connections within {timeout:.0f} s "
            f"({exc.strerror or exc}); check that the security group allows TCP {port} "
            "from this machine, that the floating IP is attached, and the server's "
            "console log (`openstack console log show`) for a boot that stopped"
        )

    def connect() -> OSError | None:
        try:
            with socket.create_connection((host, port), timeout=5):
                return None
        except OSError as exc:
            if isinstance(exc, TimeoutError) or exc.errno in BOOTING_ERRNOS:
                return exc  # still booting
            raise refused(exc) from None

    poll(
        connect,
        lambda exc: exc is None,
        f"{host}:{port} to accept connections (the VM is booting)",
        timeout,
        state=lambda exc: str(exc and (exc.strerror or type(exc).__name__)),
        timed_out=lambda exc: refused(exc or OSError()),
    )
    return time.monotonic() - t0


def wait_for_ssh(vm: VM, timeout: float) -> StepRecord:
    """The SSH port, then a login with the key and the host key verified."""
    import paramiko

    wait_for_port(vm.host, vm.port, timeout)

    def login() -> str:
        """ "ok", or why the login did not get through yet (a key refused fails at once)."""
        try:
            return vm.run("echo ok", timeout=30).stdout.strip()
        except paramiko.BadHostKeyException:
            raise BootstrapError(
                f"{vm.host} presented a host key that is not among the fingerprints on the "
                "server's console: refusing to log in (a reused address or a man in the middle)"
            ) from None
        except paramiko.AuthenticationException:
            raise BootstrapError(
                f"{vm.host} refused the key {vm.key.fingerprint}; check the keypair the server "
                "was created with matches ssh.key_block"
            ) from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            vm.close()
            return f"{type(exc).__name__}: {exc}"

    poll(
        login,
        lambda out: out == "ok",
        f"ssh login on {vm.host}",
        timeout,
        state=lambda out: out.split(":", 1)[0],
        timed_out=lambda out: BootstrapError(f"could not log in to {vm.host}: {out}"),
    )
    return StepRecord(name="ssh", reason=f"logged in as {vm.key.username}@{vm.host}")


# -- cloud-init -------------------------------------------------------------------------------
def cloud_init_state(output: str) -> str:
    """'done', 'error', 'running' or 'disabled' from ``cloud-init status --long`` output ('' if
    none). cloud-init 23.4+ adds ``extended_status`` ('degraded done': recoverable errors)."""
    fields: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("status", "extended_status"):
            fields.setdefault(key.strip(), value.strip())
    state = fields.get("status", "")
    extended = fields.get("extended_status", "")
    if state == "error" or "error" in extended or "degraded" in extended:
        return "error"
    if state == "done":
        return "done"
    if state in ("running", "not run", "not started"):
        return "running"
    if state == "disabled":
        return "disabled"
    return ""


class CloudInitRecord(StepRecord):
    """cloud-init's first boot as the VM reports it (``done``, ``error``, ``disabled``)."""

    status: str = ""


def wait_for_cloud_init(vm: VM, timeout: float) -> CloudInitRecord:
    """Wait for cloud-init's first boot to finish before packages or disks are touched (it
    creates the user, installs keys, mounts the ephemeral disk and may run apt itself).

    An image without cloud-init has nothing to wait for. An error cloud-init reports is named
    but does not stop the run when the login user, its key and sudo work (this step runs over
    that login): what remains is this tool's to do."""
    if not vm.run("command -v cloud-init", check=False).ok:
        return CloudInitRecord(name="cloud-init", reason="not installed: nothing to wait for")
    progress = Progress(f"cloud-init on {vm.host} to finish the first boot")
    if cloud_init_state(vm.run("cloud-init status", check=False).stdout) == "running":
        progress.tick("cloud-init status --wait")  # said only when there is a wait
    # coreutils' timeout bounds the wait on the VM itself; the SSH command ends with it.
    r = vm.run(
        f"timeout {max(1, round(timeout))} cloud-init status --wait --long",
        timeout=timeout + 60,
        check=False,
    )
    state = cloud_init_state(r.stdout)
    if r.code == 124 or state == "running":
        raise BootstrapError(
            f"cloud-init on {vm.host} was still running after {timeout:.0f} s "
            "(server.boot_timeout); see /var/log/cloud-init-output.log on the VM or the "
            "server's console log"
        )
    if state == "error" or (r.code != 0 and state != "done"):
        detail = " ".join(
            line.strip()
            for line in (r.stdout + r.stderr).splitlines()
            if line.strip() and not line.lstrip().startswith(("boot_status_code", "detail:"))
        )[-400:]
        if not vm.run("sudo -n true", check=False).ok:
            raise BootstrapError(
                f"cloud-init on {vm.host} reported an error and the login user has no "
                f"passwordless sudo: {detail}. See /var/log/cloud-init.log on the VM"
            )
        logger().warning(
            "cloud-init on %s reported an error (%s); the login user, its key and sudo work, "
            "so configuring goes on. See /var/log/cloud-init.log on the VM",
            vm.host,
            detail,
        )
        return CloudInitRecord(
            name="cloud-init",
            reason=f"reported an error (user, key and sudo in place; going on): {detail}",
            status="error",
        )
    if progress.elapsed > 5:
        logger().info("cloud-init on %s finished (%.0f s)", vm.host, progress.elapsed)
    return CloudInitRecord(
        name="cloud-init",
        reason="first boot done" if state != "disabled" else "disabled on this image",
        status=state or "done",
    )
