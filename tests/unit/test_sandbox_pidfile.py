"""The sandbox's background servers are known by pid file and command line: a pid that now
belongs to another process is never taken for the server, nor signalled."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from sandbox import pidfile

SERVER = [sys.executable, "-c", "import time; time.sleep(60)", "sails-test-server"]


def started(command: list[str]) -> subprocess.Popen[bytes]:
    """``command`` running: until its exec, a child's command line is still its parent's."""
    proc = subprocess.Popen(command)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[:-1] != [
        arg.encode() for arg in command
    ]:
        assert time.monotonic() < deadline, "the process never ran its command"
        time.sleep(0.01)
    return proc


def test_the_server_is_found_and_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    proc = started(SERVER)
    try:
        pid_file.write_text(f"{proc.pid}\n")
        assert pidfile.alive(pid_file, b"sails-test-server", b"time.sleep") == proc.pid
        pidfile.stop(pid_file, b"sails-test-server")
        assert proc.wait(5) == -15  # SIGTERM
        assert not pid_file.exists()
    finally:
        proc.kill()


def test_a_pid_of_another_process_is_left_alone(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    other = started([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_file.write_text(f"{other.pid}\n")  # the server is gone; its pid was reused
        assert pidfile.alive(pid_file, b"sails-test-server") is None
        pidfile.stop(pid_file, b"sails-test-server")
        assert other.poll() is None  # not signalled
        assert not pid_file.exists()
    finally:
        other.kill()
        other.wait()


def test_no_file_or_garbage_is_no_server(tmp_path: Path) -> None:
    assert pidfile.alive(tmp_path / "missing.pid", b"x") is None
    (tmp_path / "bad.pid").write_text("not a pid")
    assert pidfile.alive(tmp_path / "bad.pid", b"x") is None
