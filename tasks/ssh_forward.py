"""A port on this machine's loopback forwarded over SSH to a port on the VM's loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import paramiko


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
