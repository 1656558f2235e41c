"""``--control PATH``: change a running server through a unix socket (owner only).

One JSON object per line each way.  Requests: ``{"cmd": "list"}``,
``{"cmd": "add", "name": N, "file": F, "options": {...}}``,
``{"cmd": "remove", "name": N, "force": false}``, ``{"cmd": "stats", "name": N|null}``,
``{"cmd": "flush", "name": N}``.  Replies: ``{"ok": true, ...}`` or
``{"ok": false, "error": "one line"}``.  Opening images is the caller's business (an
``opener`` from the command line layer); it runs in a thread, as do flushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from nbdqcow.errors import NbdqcowError
from nbdqcow.server.exports import Export
from nbdqcow.server.observe import stats_dict
from nbdqcow.server.serve import NbdServer, unix_listener

log = logging.getLogger("nbdqcow.server")

#: (name, file, options) -> an open Export (blocking: runs in a thread)
Opener = Callable[[str, str, Mapping[str, str]], Export]
MAX_LINE = 1 << 20


def export_summary(server: NbdServer, e: Export) -> dict[str, Any]:
    return {"name": e.name, "source": e.source, "description": e.description,
            "size": e.driver.size, "readonly": not e.writable,
            "clients": len(server.clients_of(e))}


class Control:
    def __init__(self, server: NbdServer, opener: Opener) -> None:
        self.server = server
        self.opener = opener
        self._lock = asyncio.Lock()  # one change at a time (SIGHUP reloads take it too)

    # --- changes (also used by SIGHUP reloads) ---------------------------------------------
    async def add(self, name: str, file: str, options: Mapping[str, str]) -> Export:
        async with self._lock:
            if any(e.name == name for e in self.server.exports):
                raise NbdqcowError(f"export '{name}' exists already")
            loop = asyncio.get_running_loop()
            export = await loop.run_in_executor(None, self.opener, name, file, options)
            try:
                self.server.add_export(export)
            except BaseException:
                await loop.run_in_executor(None, export.driver.close)
                raise
            log.info("export %r added (%s)", name, file)
            return export

    async def remove(self, name: str, force: bool) -> None:
        async with self._lock:
            export = await self.server.remove_export(name, force)
            await asyncio.get_running_loop().run_in_executor(None, export.driver.close)
            log.info("export %r removed", name)

    # --- the socket ------------------------------------------------------------------------
    async def handle(self, req: Mapping[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        server = self.server
        if cmd == "list":
            return {"exports": [export_summary(server, e) for e in server.exports]}
        if cmd == "add":
            name, file = req.get("name"), req.get("file")
            opts = req.get("options") or {}
            if not isinstance(name, str) or not isinstance(file, str) or not isinstance(
                    opts, dict):
                raise NbdqcowError("add needs a name, a file and options")
            e = await self.add(name, file, {str(k): str(v) for k, v in opts.items()})
            return {"export": export_summary(server, e)}
        if cmd == "remove":
            name = req.get("name")
            if not isinstance(name, str):
                raise NbdqcowError("remove needs a name")
            await self.remove(name, bool(req.get("force")))
            return {}
        if cmd == "stats":
            name = req.get("name")
            if name is not None and not any(e.name == name for e in server.exports):
                raise NbdqcowError(f"no export '{name}'")
            return stats_dict(server, name)
        if cmd == "flush":
            name = req.get("name")
            target = next((x for x in server.exports if x.name == name), None)
            if target is None:
                raise NbdqcowError(f"no export '{name}'")
            await asyncio.get_running_loop().run_in_executor(None, target.driver.flush)
            return {}
        raise NbdqcowError(f"unknown command {cmd!r}")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("a JSON object is expected")
                    reply: dict[str, Any] = {"ok": True, **await self.handle(req)}
                except (NbdqcowError, ValueError, OSError) as e:
                    reply = {"ok": False, "error": str(e).splitlines()[0] if str(e) else
                             type(e).__name__}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    def endpoint(self, path: str) -> Callable[[NbdServer], Awaitable[asyncio.AbstractServer]]:
        """A server extra listening on ``path`` (mode 0600)."""

        async def start(server: NbdServer) -> asyncio.AbstractServer:
            old = os.umask(0o177)
            try:
                sock = unix_listener(path)
            finally:
                os.umask(old)
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)
            server.unix_paths.append(path)
            return await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE)

        return start
