"""Steps on the VM over SSH (fabric): each reads the VM's state first and changes only what differs.

Commands run as the login user with ``sudo -n`` where root is needed. Secrets reach the VM on
standard input, never on a command line, and are never echoed back.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.ssh import fingerprint
from core.config import BootstrapConfig
from core.errors import (
    BOOTING_ERRNOS,
    BootstrapError,
    HostKeyError,
    LockHeldOnVM,
    RemoteCommandError,
    missing_tool,
    missing_tool_error,
    retry_transient,
)
from core.log import Progress, logger
from core.records import Action, Record

if TYPE_CHECKING:
    import fabric
    import paramiko

    from blocks.ssh import SSHKeyPair

#: The outer bound of one step on the VM, past every bound inside it (the config allows at most
#: an hour for apt, SSH, the boot and the volume, two for the drain of a restart; each command
#: has its own timeout): a step hung where none of those reaches fails here, not retried.
STEP_BOUND = 3 * 3600

VM_TASK: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": 2,
    "retry_delay_seconds": 5,
    "retry_condition_fn": retry_transient,
    "timeout_seconds": STEP_BOUND,
}
MANAGED = "# managed by sails-bootstrap"


class StepRecord(Record):
    kind: str = "vm"


def planned(changes: list[str], apply: bool) -> str:
    """The reason of a step record: what was done, or in plan mode what would be."""
    if not changes:
        return ""
    return "; ".join(changes) if apply else "pending: " + "; ".join(changes)


def same_attrs(stat_line: str, mode: str, owner: str) -> bool:
    """Whether ``stat -c '%a %U:%G'`` output matches ``mode`` (octal) and ``owner`` ("user" or
    "user:group")."""
    have_mode, _, have_owner = stat_line.strip().partition(" ")
    try:
        if int(have_mode, 8) != int(mode, 8):
            return False
    except ValueError:
        return False
    user, _, group = have_owner.partition(":")
    want_user, _, want_group = owner.partition(":")
    return user == want_user and (not want_group or group == want_group)


@dataclass
class Result:
    stdout: str
    stderr: str
    code: int

    @property
    def ok(self) -> bool:
        return self.code == 0


def untrusted_host_key(host: str, presented: str, why: str) -> HostKeyError:
    return HostKeyError(
        f"{host} presented host key {presented}, which {why}; nothing was sent to it. If the "
        "server was rebuilt or its keys regenerated on purpose, check that fingerprint on its "
        "console (`openstack console log show`) and run `sails-bootstrap provision --config "
        f"FILE --trust-host-key {presented}`; otherwise treat it as a man-in-the-middle"
    )


def _verify_policy(expected: list[str]) -> paramiko.MissingHostKeyPolicy:
    import paramiko

    class VerifyAgainstConsole(paramiko.MissingHostKeyPolicy):
        """A key known_hosts does not list is accepted only if its fingerprint is one the
        console printed (or the operator trusted): fail closed, also when there is none."""

        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            fp = fingerprint(f"{key.get_name()} {key.get_base64()}")
            if fp not in expected:
                raise untrusted_host_key(
                    hostname,
                    fp,
                    "is neither in the verified known_hosts nor among the console's "
                    f"fingerprints ({', '.join(expected) or 'none shown'})",
                )

    return VerifyAgainstConsole()


#: Seconds an SFTP transfer may go without an answer from the VM.
SFTP_TIMEOUT = 120

#: Where the VM's lock lives: one file for the login user (the operator's runs) and the
#: service user (the VM's deployments) alike; made by root, writable by both.
VM_LOCK_DIR = "/var/lib/sails-bootstrap"

#: The VM's own lock: every run that changes the VM holds it, from the operator's machine (over
#: SSH) or on the VM (its deployments). A flock held by a process that lives as long as the
#: holder's channel: a closed channel, a dropped connection or a killed run frees it.
VM_LOCK = r"""
d={dir}
if ! { [ -w "$d/vm.lock" ] && [ -w "$d/vm.holder" ]; }; then
  { [ -w "$d" ] && touch "$d/vm.lock" "$d/vm.holder" && chmod 0666 "$d/vm.lock" "$d/vm.holder"; } \
    2>/dev/null || sudo -n sh -c "install -d -m 0755 $d && touch $d/vm.lock $d/vm.holder \
    && chmod 0666 $d/vm.lock $d/vm.holder" 2>/dev/null \
    || { echo "error: no $d/vm.lock to lock the VM with (configure makes it)"; exit 4; }
fi
exec 9>>"$d/vm.lock"
i=0
while ! flock -n 9; do
  if [ "$i" -ge {wait} ]; then echo "held $(cat "$d/vm.holder" 2>/dev/null)"; exit 3; fi
  echo "waiting $(cat "$d/vm.holder" 2>/dev/null)"
  sleep 1; i=$((i + 1))
done
printf '%s\n' {holder} > "$d/vm.holder"
echo locked
cat >/dev/null
"""


def vm_exclusive(host: VM, config: BootstrapConfig, command: str) -> Any:
    """The VM's lock for a run of ``command`` (the same bound as the local lock's)."""
    wait = float(os.environ.get("SAILS_BOOTSTRAP_LOCK_WAIT", 3600))
    holder = f"`{command}` from {socket.gethostname()}, pid {os.getpid()}, since {time.ctime()}"
    return host.exclusive(config.environment, holder, wait)


def lock_script(holder: str, wait: float, directory: str = VM_LOCK_DIR) -> str:
    script = VM_LOCK.replace("{wait}", str(max(0, round(wait))))
    script = script.replace("{dir}", shlex.quote(directory))
    return script.replace("{holder}", shlex.quote(holder))


def hold_vm_lock(lines: Any, environment: str, wait: float) -> None:
    """Read the lock script's lines until it holds the lock; waiting is said every 30 s, a
    holder past ``wait`` is a LockHeldOnVM naming it."""
    progress = Progress(f"another run on the VM of {environment!r} to end", every=30)
    for raw in lines:
        line = raw.strip()
        if line == "locked":
            return
        if line.startswith("waiting"):
            progress.tick(line.removeprefix("waiting").strip() or "a run that wrote nothing yet")
        elif line.startswith("error:"):
            why = line.removeprefix("error:").strip()
            raise BootstrapError(f"the VM of {environment!r}: {why}")
        elif line.startswith("held"):
            raise LockHeldOnVM(
                f"the VM of {environment!r} is in use by another run "
                f"({line.removeprefix('held').strip() or 'unknown'}); wait for it to end or stop "
                f"it ({wait:.0f} s of waiting were spent; SAILS_BOOTSTRAP_LOCK_WAIT sets the bound)"
            )
    raise BootstrapError("the VM's lock could not be taken (the lock command ended); try again")


class LoopbackForward:
    """A port on this machine's loopback forwarded over an SSH transport to a port on the VM's
    loopback, as ``ssh -L`` does: how the operator's machine reaches the Prefect API, which
    listens only there (it carries the auth string and the blocks' secrets; Prefect speaks no
    TLS, SSH encrypts it).

    fabric's ``forward_local`` is not used: its listener thread ends at the first channel the
    VM refuses (a server restarting while its health is polled), and it binds only after it
    returns. Here the listening socket is bound before the first use, and a refused channel
    closes that one connection, as OpenSSH does.
    """

    def __init__(self, transport: Callable[[], paramiko.Transport], remote_port: int):
        #: the SSH transport to open each connection's channel on, asked for per connection:
        #: after a dropped SSH session the VM's connection is opened again, and so is the API
        self.transport = transport
        self.remote_port = remote_port
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.5)
        self.port: int = self._sock.getsockname()[1]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="api-forward", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                client, origin = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client, origin), daemon=True).start()

    def _pipe(self, client: socket.socket, origin: tuple[str, int]) -> None:
        import selectors

        try:
            channel = self.transport().open_channel(
                "direct-tcpip", ("127.0.0.1", self.remote_port), origin, timeout=15
            )
        except Exception:  # refused (nothing listens yet), the VM unreachable, ...
            client.close()  # ... end this connection only; the caller sees it closed
            return
        with selectors.DefaultSelector() as sel, channel, client:
            sel.register(client, selectors.EVENT_READ, channel)
            sel.register(channel, selectors.EVENT_READ, client)
            while not self._closed.is_set():
                for key, _ in sel.select(timeout=1):
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        key.data.sendall(data)
                    except OSError:
                        return

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._thread.join(5)


class VM:
    """A fabric connection to the VM with the host key checked against the console's."""

    @property
    def privileged(self) -> bool:
        """The login user, whose sudo is root: the service user's files are read and written
        through it (``sudo=host.privileged``)."""
        return True

    def __init__(
        self,
        host: str,
        key: SSHKeyPair,
        host_keys: list[str],
        port: int = 22,
        known_hosts: str | os.PathLike[str] | None = None,
    ):
        self.host = host
        self.port = port
        self.key = key
        self.host_keys = host_keys
        self.known_hosts = known_hosts
        self._conn: fabric.Connection | None = None
        self._lock = threading.Lock()

    @property
    def conn(self) -> fabric.Connection:
        """The connection, opened once: concurrent commands (the health probes) share it, and
        fabric's lazy open is not safe to race."""
        with self._lock:
            if self._conn is not None and not self._conn.is_connected:
                # the transport died (a dropped connection, the VM rebooted): open a new one
                self._conn.close()
                self._conn = None
            if self._conn is None:
                import paramiko

                conn = self.key.connect(
                    self.host,
                    port=self.port,
                    connect_timeout=15,
                    connect_kwargs={"banner_timeout": 30, "auth_timeout": 30},
                )
                if self.known_hosts and os.path.exists(self.known_hosts):
                    # the keys verified at provisioning; a different key for this host is refused
                    conn.client.get_host_keys().load(os.fspath(self.known_hosts))
                conn.client.set_missing_host_key_policy(_verify_policy(self.host_keys))
                try:
                    conn.open()
                except paramiko.BadHostKeyException as exc:

                    def fp(key: Any) -> str:
                        return fingerprint(f"{key.get_name()} {key.get_base64()}")

                    raise untrusted_host_key(
                        self.host,
                        fp(exc.key),
                        f"differs from the one verified in {self.known_hosts} "
                        f"({fp(exc.expected_key)})",
                    ) from None
                transport = conn.client.get_transport()
                if transport is not None:  # a dead peer is noticed between commands too
                    transport.set_keepalive(15)
                self._conn = conn
            return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def login_key(self) -> str | None:
        """The public key that opens the VM (never removed from authorized_keys)."""
        return self.key.public_key

    @contextlib.contextmanager
    def api(self, port: int) -> Iterator[str]:
        """The base URL (``http://127.0.0.1:N``) of the VM's loopback ``port`` for the body:
        forwarded over this verified SSH connection, never over the network in the clear."""

        def transport() -> paramiko.Transport:
            found = self.conn.client.get_transport()  # opened again after a drop
            if found is None:
                raise BootstrapError(f"no SSH connection to {self.host} for the API forward")
            return found

        transport()  # fails here, not on the first request, when the VM cannot be reached
        forward = LoopbackForward(transport, port)
        try:
            yield forward.url
        finally:
            forward.close()

    @contextlib.contextmanager
    def exclusive(self, environment: str, holder: str, wait: float) -> Iterator[None]:
        """Hold the VM's lock for the body (on a channel of its own: closing it releases)."""
        transport = self.conn.client.get_transport()
        assert transport is not None
        channel = transport.open_session()
        try:
            channel.exec_command(f"sh -c {shlex.quote(lock_script(holder, wait))}")
            hold_vm_lock(channel.makefile("r"), environment, wait)
            yield
        finally:
            channel.close()

    def run(
        self,
        command: str,
        *,
        sudo: bool = False,
        stdin: str | None = None,
        timeout: float = 300,
        check: bool = True,
    ) -> Result:
        full = f"sudo -n sh -c {shlex.quote(command)}" if sudo else command
        kwargs: dict[str, Any] = {"hide": True, "warn": True, "timeout": timeout, "pty": False}
        if stdin is not None:
            kwargs["in_stream"] = io.StringIO(stdin)
        else:
            kwargs["in_stream"] = False
        conn = self.conn
        r = conn.run(full, **kwargs)
        if r.exited == -1 and not conn.is_connected:
            # No exit status: the connection ended under the command (which may still be
            # running on the VM). Its outcome is unknown, not a failure: transient.
            raise ConnectionResetError(
                f"the SSH connection to {self.host} ended before "
                f"`{command.splitlines()[0][:80]}` reported its exit status"
            )
        return self._checked(command, Result(r.stdout, r.stderr, r.exited), check)

    def _checked(self, command: str, result: Result, check: bool) -> Result:
        """A command the image lacks is an error naming the image's requirement, whether or
        not the caller checks the exit code (its non-zero would mean something else)."""
        tool = missing_tool(result.code, result.stderr)
        if tool:
            raise missing_tool_error(tool, self.host)
        if check and not result.ok:
            where = f"on {self.host}: " if self.port else ""
            raise RemoteCommandError(
                f"{where}`{command.splitlines()[0][:120]}` exited {result.code}: "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
        return result

    def upload(self, data: bytes) -> str:
        """Copy ``data`` to a new file in a private (0700) temporary directory; return its path.

        SFTP, not standard input: fabric feeds stdin one byte at a time."""
        tmpdir = self.run("mktemp -d").stdout.strip()
        path = f"{tmpdir}/data"
        sftp = self.conn.sftp()
        # A bound on every wait of the transfer: a peer silent for this long fails it (and the
        # step's retry opens a new connection) instead of hanging the run.
        sftp.get_channel().settimeout(SFTP_TIMEOUT)
        sftp.putfo(io.BytesIO(data), path)
        return path

    def download(self, remote: str, local: str | os.PathLike[str]) -> None:
        """Copy the VM's file ``remote`` to ``local`` over SFTP (bounded like ``upload``)."""
        sftp = self.conn.sftp()
        sftp.get_channel().settimeout(SFTP_TIMEOUT)
        sftp.get(remote, os.fspath(local))

    def write_file(
        self,
        path: str,
        content: str,
        *,
        mode: str = "0644",
        owner: str = "root",
        sudo: bool = True,
        apply: bool = True,
        verify: str | None = None,
    ) -> bool:
        """Write ``content`` to ``path`` with ``mode`` and ``owner`` where any of them differs.
        True when something changed (with ``apply=False``: would; nothing is written). One
        command reads the file's mode, owner and content. ``verify``: a command that must
        accept the new file (its path appended) before it takes the old one's place."""
        q = shlex.quote(path)
        read = self.run(
            f"stat -c '%a %U:%G' {q} 2>/dev/null || echo missing; cat {q} 2>/dev/null || true",
            sudo=sudo,
            check=False,
        ).stdout
        attrs, _, current = read.partition("\n")
        if attrs != "missing" and current == content:
            if same_attrs(attrs, mode, owner):
                return False
            if apply:
                self.run(f"chmod {mode} {q} && chown {owner} {q}", sudo=sudo)
            return True
        if not apply:
            return True
        tmp = shlex.quote(self.upload(content.encode()))
        check = f"{verify} {tmp} && " if verify else ""
        self.run(
            f'mkdir -p "$(dirname {q})" && chmod {mode} {tmp} && chown {owner} {tmp} && {check}'
            f'cp -p {tmp} {q}.new && mv {q}.new {q}; rc=$?; rm -rf "$(dirname {tmp})"; exit $rc',
            sudo=sudo,
        )
        return True


class LocalHost(VM):
    """The VM itself, for flows that run on it (health check, remount, reauth via deployments).

    Same interface as ``VM``; it runs as the service user (``prefect.user``), whose only
    root is the units helper (tasks/service_user.py): ``privileged`` is false, and a command
    run with ``sudo`` needs that rule.
    """

    #: The VM's lock directory (another one for tests of the lock itself).
    lock_dir = VM_LOCK_DIR

    @property
    def privileged(self) -> bool:
        return os.geteuid() == 0

    def __init__(self, host: str = "localhost", login_key: str | None = None):
        self.host = host
        self.port = 0
        self.host_keys = []
        self._conn = None
        self._login_key = login_key

    @property
    def login_key(self) -> str | None:
        return self._login_key

    def close(self) -> None:
        return None

    @contextlib.contextmanager
    def api(self, port: int) -> Iterator[str]:
        """On the VM itself its loopback is here."""
        yield f"http://127.0.0.1:{port}"

    @contextlib.contextmanager
    def exclusive(self, environment: str, holder: str, wait: float) -> Iterator[None]:
        import subprocess

        proc = subprocess.Popen(
            ["sh", "-c", lock_script(holder, wait, self.lock_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            hold_vm_lock(proc.stdout, environment, wait)
            yield
        finally:
            if proc.stdin:
                proc.stdin.close()  # the lock's `cat` ends: released
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def upload(self, data: bytes) -> str:
        import tempfile

        path = os.path.join(tempfile.mkdtemp(prefix="sails-"), "data")  # a private directory
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return path

    def download(self, remote: str, local: str | os.PathLike[str]) -> None:
        import shutil

        shutil.copyfile(remote, local)

    def run(
        self,
        command: str,
        *,
        sudo: bool = False,
        stdin: str | None = None,
        timeout: float = 300,
        check: bool = True,
    ) -> Result:
        import subprocess

        argv = ["sh", "-c", command]
        if sudo and os.geteuid() != 0:
            argv = ["sudo", "-n", *argv]
        try:
            p = subprocess.run(
                argv,
                input=stdin or "",
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,
            )
            result = Result(p.stdout, p.stderr, p.returncode)
        except subprocess.TimeoutExpired:
            result = Result("", f"timed out after {timeout:.0f} s", 124)
        return self._checked(command, result, check)


def wait_for_port(host: str, port: int, timeout: float) -> float:
    """Wait until ``host:port`` accepts a TCP connection; return the seconds waited.

    A guest that Nova calls ACTIVE is still booting: its address answers "no route to host",
    refuses, or stays silent until sshd listens (20-90 s on a real cloud). Those are waited out
    within ``timeout``; only then is it an error, naming what to check."""
    progress = Progress(f"{host}:{port} to accept connections (the VM is booting)")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return progress.elapsed
        except OSError as exc:
            booting = isinstance(exc, TimeoutError) or exc.errno in BOOTING_ERRNOS
            if not booting or time.monotonic() > deadline:
                raise BootstrapError(
                    f"{host}:{port} did not accept connections within {timeout:.0f} s "
                    f"({exc.strerror or exc}); check that the security group allows TCP {port} "
                    "from this machine, that the floating IP is attached, and the server's "
                    "console log (`openstack console log show`) for a boot that stopped"
                ) from None
            progress.tick(exc.strerror or type(exc).__name__)
            time.sleep(2)


@task(name="wait-for-ssh", cache_policy=NO_CACHE)
def wait_for_ssh(vm: VM, timeout: float) -> StepRecord:
    """The SSH port, then a login with the key and the host key verified."""
    import paramiko

    wait_for_port(vm.host, vm.port, timeout)
    deadline = time.monotonic() + timeout
    progress = Progress(f"ssh login on {vm.host}")
    while True:
        try:
            out = vm.run("echo ok", timeout=30).stdout.strip()
            if out == "ok":
                break
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
            if time.monotonic() > deadline:
                raise BootstrapError(f"could not log in to {vm.host}: {exc}") from None
            progress.tick(type(exc).__name__)
            time.sleep(2)
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


@task(name="wait-for-cloud-init", **VM_TASK)
def wait_for_cloud_init(vm: VM, timeout: float) -> StepRecord:
    """Wait for cloud-init's first boot to finish before packages or disks are touched (it
    creates the user, installs keys, mounts the ephemeral disk and may run apt itself).

    An image without cloud-init has nothing to wait for. An error cloud-init reports is named
    but does not stop the run when the login user, its key and sudo work (this step runs over
    that login): what remains is this tool's to do."""
    if not vm.run("command -v cloud-init", check=False).ok:
        return StepRecord(name="cloud-init", reason="not installed: nothing to wait for")
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
        return StepRecord(
            name="cloud-init",
            reason=f"reported an error (user, key and sudo in place; going on): {detail}",
            details={"status": "error"},
        )
    if progress.elapsed > 5:
        logger().info("cloud-init on %s finished (%.0f s)", vm.host, progress.elapsed)
    return StepRecord(
        name="cloud-init",
        reason="first boot done" if state != "disabled" else "disabled on this image",
        details={"status": state or "done"},
    )


# -- persistent volume -------------------------------------------------------------------------
#: The one command that may format the data volume, run as root on the VM: under a lock (two
#: configures format at most once), and only a device that reads, where blkid finds nothing and
#: reports no error (it exits 2 for "nothing found" and for "could not open" alike), where wipefs
#: lists no signature, and whose first and last MiB are zeros. Prints one line: "formatted",
#: "has ext4" (someone else formatted it meanwhile) or "refuse: WHY" (exit 3).
FORMAT_GUARD = r"""
dev="$1"; label="$2"; mib=1048576
exec 9>/run/sails-format.lock
flock -w 600 9 || { echo "refuse: another format of a volume is still running"; exit 3; }
[ -b "$dev" ] || [ -f "$dev" ] || { echo "refuse: $dev is not a block device"; exit 3; }
[ "$(dd if="$dev" bs=4096 count=1 2>/dev/null | wc -c)" -eq 4096 ] || {
  echo "refuse: $dev cannot be read"; exit 3; }
found=$(blkid -p -o export "$dev" 2>&1); rc=$?
if [ $rc -eq 0 ]; then
  kind=$(printf '%s\n' "$found" | sed -n 's/^\(TYPE\|PTTYPE\)=//p' | head -n 1)
  [ "$kind" = ext4 ] && { echo "has ext4"; exit 0; }
  echo "refuse: $dev holds ${kind:-a signature blkid names no type for}"; exit 3
fi
[ $rc -eq 2 ] && [ -z "$found" ] || { echo "refuse: blkid failed ($rc): $found"; exit 3; }
sigs=$(wipefs --no-act --noheadings "$dev" 2>&1) || { echo "refuse: wipefs failed: $sigs"; exit 3; }
[ -z "$sigs" ] || { echo "refuse: wipefs finds signatures: $sigs"; exit 3; }
size=$(blockdev --getsize64 "$dev" 2>/dev/null || stat -c %s "$dev")
[ "$size" -ge $((2 * mib)) ] || { echo "refuse: $dev is smaller than 2 MiB"; exit 3; }
cmp -s -n $mib "$dev" /dev/zero || { echo "refuse: the first MiB of $dev is not empty"; exit 3; }
cmp -s -n $mib -i $((size - mib)):0 "$dev" /dev/zero || {
  echo "refuse: the last MiB of $dev is not empty"; exit 3; }
mkfs.ext4 -q -F -L "$label" "$dev" || { echo "refuse: mkfs.ext4 failed"; exit 3; }
echo formatted
"""


def format_guarded(vm: VM, device: str, label: str) -> str:
    """Run FORMAT_GUARD on ``device``: "formatted" or "has ext4"; a refusal is a BootstrapError
    naming why."""
    r = vm.run(
        f"sh -c {shlex.quote(FORMAT_GUARD)} sails-format {shlex.quote(device)} "
        f"{shlex.quote(label)}",
        sudo=True,
        check=False,
        timeout=900,
    )
    out = (r.stdout.strip().splitlines() or [""])[-1]
    if r.code == 0 and out in ("formatted", "has ext4"):
        return out
    why = out.removeprefix("refuse: ") or (r.stderr.strip()[-300:] or f"exit {r.code}")
    raise BootstrapError(
        f"refusing to format {device}: {why}. A data volume is formatted only when it is empty "
        "(no signature, zeros at both ends): look at it by hand (`sudo wipefs --no-act "
        f"{device}`), or attach another volume"
    )


def _blkid(vm: VM, device: str) -> dict[str, str]:
    q = shlex.quote(device)
    read = vm.run(f"dd if={q} bs=4096 count=1 2>/dev/null | wc -c", sudo=True, check=False)
    if read.stdout.strip() != "4096":
        raise BootstrapError(f"{device} cannot be read; check the volume's attachment")
    r = vm.run(f"blkid -p -o export {q}", sudo=True, check=False)
    if r.code == 2 and not (r.stdout + r.stderr).strip():  # nothing found, nothing wrong
        return {}
    if not r.ok:
        raise RemoteCommandError(f"blkid on {device} failed ({r.code}): {r.stderr.strip()}")
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def resolve_device(vm: VM, volume_id: str, timeout: float = 60) -> str:
    """The guest's device for the volume, found by its serial (never by Nova's name)."""
    candidates = [
        f"/dev/disk/by-id/virtio-{volume_id[:20]}",
        f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{volume_id[:20]}",
        f"/dev/disk/by-id/virtio-{volume_id}",
    ]
    probe = " ".join(shlex.quote(c) for c in candidates)
    deadline = time.monotonic() + timeout
    progress = Progress(f"volume {volume_id[:8]} to appear in the guest")
    while True:
        r = vm.run(
            f'for d in {probe}; do [ -e "$d" ] && readlink -f "$d" && exit 0; done; exit 1',
            check=False,
        )
        if r.ok and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
        if time.monotonic() > deadline:
            raise BootstrapError(
                f"volume {volume_id} is attached but no device with its serial appeared in the "
                f"guest within {timeout:.0f} s (looked for {candidates[0]})"
            )
        progress.tick("not there yet")
        time.sleep(1)


@task(name="ensure-volume-mounted", **VM_TASK)
def ensure_volume_mounted(
    vm: VM,
    config: BootstrapConfig,
    volume_id: str,
    apply: bool = True,
    recorded_uuid: str | None = None,
) -> StepRecord:
    """Format only an empty volume that was never formatted before (``recorded_uuid``: what the
    volume's metadata says was made there), mount it by UUID from fstab, hand it to the owner."""
    log = logger()
    mp, owner = config.volume.mount_point, config.volume.owner
    device = resolve_device(vm, volume_id)
    changes: list[str] = []
    probe = _blkid(vm, device)
    if recorded_uuid and not probe:
        raise BootstrapError(
            f"volume {volume_id} ({device}) was formatted before (filesystem {recorded_uuid}, "
            "recorded on the volume) but now reads as empty; refusing to format it again. Check "
            "that the right volume is attached and look at it by hand (`sudo wipefs --no-act "
            f"{device}`, `sudo file -s {device}`); if its data is truly gone, remove the "
            "volume's 'sails-bootstrap-fs-uuid' metadata key and run again"
        )
    if probe.get("PTTYPE"):
        raise BootstrapError(
            f"volume {volume_id} ({device}) holds a {probe['PTTYPE']} partition table; refusing "
            "to format it. Mount or wipe it by hand, or attach another volume"
        )
    fstype = probe.get("TYPE")
    if fstype and fstype != "ext4":
        raise BootstrapError(
            f"volume {volume_id} ({device}) holds a {fstype} filesystem, not ext4; refusing to "
            "format it. Copy its data off and wipe it, or attach another volume"
        )
    if not fstype and not apply:
        return StepRecord(
            name=f"volume at {mp}",
            action=Action.CHANGE,
            applied=False,
            reason=(
                f"pending: format {device} ext4 (it holds no filesystem), add it to fstab by UUID, "
                f"mount it at {mp} and hand it to {owner}"
            ),
            details={"device": device},
        )
    if not fstype:
        if format_guarded(vm, device, config.volume.label) == "formatted":
            changes.append(f"formatted {device} ext4 (it held no filesystem)")
        probe = _blkid(vm, device)
        if probe.get("TYPE") != "ext4":
            raise BootstrapError(
                f"volume {volume_id} ({device}) was formatted meanwhile as "
                f"{probe.get('TYPE') or probe.get('PTTYPE') or 'something unknown'}, not ext4; "
                "refusing to use it"
            )
    uuid = probe["UUID"]
    parent = mp.rsplit("/", 1)[0] or "/"
    line = (
        f"UUID={uuid} {mp} ext4 defaults,nofail,x-systemd.requires-mounts-for={parent} 0 2"
        f" {MANAGED}"
    )
    fstab = vm.run("cat /etc/fstab", check=False).stdout.splitlines()
    others = [entry for entry in fstab if entry.split()[1:2] != [mp] or entry.startswith("#")]
    if line not in fstab:
        changes.append("fstab entry by UUID")
        vm.write_file("/etc/fstab", "\n".join([*others, line]) + "\n", apply=apply)
    source = vm.run(f"findmnt -n -o SOURCE --mountpoint {shlex.quote(mp)}", check=False)
    mounted_from = source.stdout.strip() if source.ok else ""
    if mounted_from:
        real = vm.run(f"readlink -f {shlex.quote(mounted_from)}", check=False).stdout.strip()
        if real != device:
            raise BootstrapError(
                f"{mp} is already mounted from {mounted_from}, not from volume {volume_id} "
                f"({device}); unmount it first"
            )
    else:
        if apply:
            vm.run(f"mkdir -p {shlex.quote(mp)} && mount {shlex.quote(mp)}", sudo=True)
        changes.append(f"mounted at {mp}")
    # Not mounted (plan mode): the owner that counts is the volume's, known once it is mounted.
    if apply or mounted_from:
        own = vm.run(f"stat -c %U:%G {shlex.quote(mp)}").stdout.strip()
        if own != f"{owner}:{owner}":
            if apply:
                vm.run(f"chown {owner}:{owner} {shlex.quote(mp)}", sudo=True)
            changes.append(f"owner {own} -> {owner}")
    if changes and apply:
        log.info("volume: %s", "; ".join(changes))
    return StepRecord(
        name=f"volume at {mp}",
        id=uuid,
        action=Action.CHANGE if changes else Action.KEEP,
        applied=apply,
        reason=planned(changes, apply) or f"ext4 {device} mounted at {mp}, owned by {owner}",
        details={"device": device, "uuid": uuid},
    )


# -- operator keys -----------------------------------------------------------------------------
@task(name="ensure-operator-keys", **VM_TASK)
def ensure_operator_keys(vm: VM, config: BootstrapConfig, apply: bool = True) -> StepRecord:
    """Add listed team keys; remove only keys this tool added earlier and no longer lists."""
    home = f"/home/{config.server.user}"
    auth_file, ledger = f"{home}/.ssh/authorized_keys", f"{home}/.ssh/sails-bootstrap-keys"
    current = vm.run(f"cat {auth_file} 2>/dev/null || true").stdout.splitlines()
    added_before = vm.run(f"cat {ledger} 2>/dev/null || true").stdout.splitlines()
    wanted = list(dict.fromkeys(k.strip() for k in config.ssh.operator_keys))

    def ident(line: str) -> tuple[str, ...]:
        return tuple(line.split()[:2])

    protected = {ident(vm.login_key)} if vm.login_key else set()
    wanted_ids = {ident(k) for k in wanted}
    removable = {ident(k) for k in added_before} - wanted_ids - protected
    kept = [line for line in current if ident(line) not in removable]
    have = {ident(line) for line in kept}
    new = [k for k in wanted if ident(k) not in have]
    removed = len(current) - len(kept)
    ours_before = {ident(k) for k in added_before}
    ledger_lines = [k for k in wanted if ident(k) in ours_before or k in new]
    if new or removed:
        vm.write_file(
            auth_file,
            "\n".join([*kept, *new]) + "\n",
            mode="0600",
            owner=f"{config.server.user}:{config.server.user}",
            sudo=False,
            apply=apply,
        )
    if sorted(ledger_lines) != sorted(added_before):
        vm.write_file(
            ledger,
            "\n".join(ledger_lines) + ("\n" if ledger_lines else ""),
            mode="0600",
            owner=f"{config.server.user}:{config.server.user}",
            sudo=False,
            apply=apply,
        )
    changed = bool(new or removed)
    return StepRecord(
        name="operator keys",
        action=Action.CHANGE if changed else Action.KEEP,
        applied=apply,
        reason=(
            planned([f"added {len(new)}, removed {removed}"], apply)
            if changed
            else f"{len(wanted)} team key(s) present"
        ),
    )


# -- sshd keepalive ------------------------------------------------------------------------------
#: Where the VM's sshd takes our settings from (Ubuntu's sshd_config includes the folder first).
SSHD_DROP_IN = "/etc/ssh/sshd_config.d/60-sails-bootstrap.conf"
#: A session whose client went silent (a laptop closed, a network gone) ends after 15 s x 4
#: unanswered keepalives (150 s measured on the sandbox's guests, not TCP's two hours): the VM's
#: lock, held by an SSH session of the run that holds it, does not outlive its run.
SSHD_KEEPALIVE = "ClientAliveInterval 15\nClientAliveCountMax 4\n"


@task(name="ensure-sshd-keepalive", **VM_TASK)
def ensure_sshd_keepalive(vm: VM, apply: bool = True) -> StepRecord:
    """sshd ends sessions whose client stopped answering; the file is checked with ``sshd -t``
    before sshd reloads it (a bad file is removed again, so the next restart still lets us in)."""
    changed = vm.write_file(SSHD_DROP_IN, SSHD_KEEPALIVE, mode="0644", apply=apply)
    if changed and apply:
        check = vm.run("sshd -t", sudo=True, check=False)
        if not check.ok:
            vm.run(f"rm -f {SSHD_DROP_IN}", sudo=True)
            raise BootstrapError(f"sshd refused {SSHD_DROP_IN}: {check.stderr.strip()}")
        vm.run("systemctl try-reload-or-restart ssh.service", sudo=True)
    return StepRecord(
        name="sshd keepalive",
        action=Action.CHANGE if changed else Action.KEEP,
        applied=apply,
        reason=planned([f"wrote {SSHD_DROP_IN}, reloaded sshd"], apply)
        if changed
        else "silent sessions end after 4 unanswered keepalives",
    )
