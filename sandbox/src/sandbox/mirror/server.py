"""The mirror's HTTP server: the repository's files, with the faults of ``sandbox.mirror``.

    python -m sandbox.mirror.server DOCUMENT_ROOT HOST PORT

Every request reads the faults file (cached by its mtime), so a fault set by any process
applies to the next request. ``/_sandbox/health`` is never faulted and answers with the
document root, so the sandbox can tell which build is served.
"""

from __future__ import annotations

import random
import sys
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sandbox import mirror


class Handler(SimpleHTTPRequestHandler):
    server_version = "sails-sandbox-mirror"
    root: Path = Path("/nonexistent")

    def send_head(self):
        path = self.path.split("?", 1)[0]
        if path == mirror.HEALTH_PATH:
            body = f"{self.root}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)
            return None
        client = self.client_address[0]
        current = mirror.faults()
        scoped = not current["clients"] or client in current["clients"]
        if scoped and current["delay"]:
            time.sleep(float(current["delay"]))
        failure = mirror.take_failure(client, random.random())
        if failure is not None:
            self.send_error(failure, "sandbox mirror fault")
            return None
        dists = f"/{mirror.PREFIX}/dists/"
        signatures = path.endswith(("/InRelease", "/Release.gpg"))
        if scoped and path.startswith(dists) and current["repo"] == "unsigned" and signatures:
            self.send_error(404)
            return None
        if scoped and path.startswith(dists) and current["repo"] == "tampered":
            self.directory = str(self.root / "tampered")
        return super().send_head()


def serve(root: Path, host: str, port: int) -> None:
    Handler.root = root
    server = ThreadingHTTPServer((host, port), partial(Handler, directory=str(root)))
    server.daemon_threads = True
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
