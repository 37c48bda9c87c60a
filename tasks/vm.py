"""The SSH transport to the VM (fabric) and the vocabulary of the steps run over it.

``VM`` runs commands as the login user with ``sudo -n`` where root is needed; ``LocalHost`` is
the same interface on the VM itself. Secrets reach the VM on standard input, never on a command
line, and are never echoed back. Each step reads the VM's state first, changes only what
differs, and returns a ``StepRecord``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blocks.ssh import fingerprint
from core.errors import (
    BootstrapError,
    RemoteCommandError,
    missing_tool,
    missing_tool_error,
)
from core.records import Record
from tasks.host_key_policy import _verify_policy, untrusted_host_key
from tasks.ssh_forward import LoopbackForward
from tasks.vm_lock import VM_LOCK_DIR, hold_vm_lock, lock_script

if TYPE_CHECKING:
    import fabric
    import paramiko

    from blocks.ssh import SSHKeyPair

#: The outer bound of one step on the VM, past every bound inside it (the config allows at most
#: an hour for apt, SSH, the boot and the volume, two for the drain of a restart; each command
#: has its own timeout): a step hung where none of those reaches fails here, not retried (the
#: task timeout of every VM step, ``VM_TASK`` in flows/steps.py).
STEP_BOUND = 3 * 3600
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


#: Seconds an SFTP transfer may go without an answer from the VM.
SFTP_TIMEOUT = 120


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
        """Run ``command`` with ``sh`` (as root with ``sudo``), ``stdin`` fed to it; its
        result, checked (an error on a non-zero exit) unless ``check`` is False."""
        return self._checked(command, self._execute(command, sudo, stdin, timeout), check)

    def _execute(self, command: str, sudo: bool, stdin: str | None, timeout: float) -> Result:
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
        return Result(r.stdout, r.stderr, r.exited)

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

    def _execute(self, command: str, sudo: bool, stdin: str | None, timeout: float) -> Result:
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
        except subprocess.TimeoutExpired:
            return Result("", f"timed out after {timeout:.0f} s", 124)
        return Result(p.stdout, p.stderr, p.returncode)
