"""``--metrics ADDR:PORT``: ``GET /metrics`` answers OpenMetrics text (a few lines of
HTTP/1.0 on asyncio streams; no framework)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nbdqcow.errors import NbdqcowError
from nbdqcow.server.observe import metrics_text
from nbdqcow.server.serve import NbdServer
from nbdqcow.server.stats import CONTENT_TYPE

log = logging.getLogger("nbdqcow.server")
MAX_REQUEST_HEAD = 8192


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6]:PORT``; ``:PORT`` means every address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise NbdqcowError(f"--metrics: expected ADDR:PORT, got '{text}'")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


async def _respond(server: NbdServer, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
            ConnectionError):
        writer.close()
        return
    line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(line) < 2:
        status, body, ctype = "400 Bad Request", b"bad request\n", "text/plain"
    elif line[0] not in ("GET", "HEAD"):
        status, body, ctype = "405 Method Not Allowed", b"only GET\n", "text/plain"
    elif line[1].split("?")[0] != "/metrics":
        status, body, ctype = "404 Not Found", b"see /metrics\n", "text/plain"
    else:
        status, body, ctype = "200 OK", metrics_text(server).encode(), CONTENT_TYPE
    writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
    if line and line[0] != "HEAD":
        writer.write(body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


def metrics_endpoint(address: str) -> Callable[[NbdServer], Awaitable[asyncio.AbstractServer]]:
    """A server extra (NbdServer.extras) listening on ``address``."""
    host, port = parse_address(address)

    async def start(server: NbdServer) -> asyncio.AbstractServer:
        try:
            return await asyncio.start_server(
                lambda r, w: _respond(server, r, w), host, port, limit=MAX_REQUEST_HEAD)
        except OSError as e:
            raise NbdqcowError(f"--metrics: cannot listen on {address}: {e.strerror}") from None

    return start
