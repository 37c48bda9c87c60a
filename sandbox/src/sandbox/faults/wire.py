"""HTTP/1.1 framing the fault proxy reads: request and response heads, sized or chunked bodies."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}
REASONS = {500: "Internal Server Error", 503: "Service Unavailable", 429: "Too Many Requests"}


class ProtocolError(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise ProtocolError("truncated head") from exc
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


async def _read_body(
    reader: asyncio.StreamReader, headers: list[tuple[str, str]], until_eof: bool
) -> bytes:
    te = (_header(headers, "transfer-encoding") or "").lower()
    if "chunked" in te:
        chunks = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                # trailers until an empty line
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return b"".join(chunks)
    length = _header(headers, "content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    if until_eof:
        return await reader.read()
    return b""


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent: the path and its query
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on a client's connection; None once the client closed it."""
    head = await _read_head(reader)
    if head is None:
        return None
    request_line, headers = head
    method, target, _version = request_line.split(" ", 2)
    body = await _read_body(reader, headers, until_eof=False)
    return Request(method, target, headers, body)
