"""Listen on TCP / unix / inherited sockets, admit clients, shut down cleanly."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import socket
import stat
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbdqcow.block.libc import libc
from nbdqcow.block.signals import STOP_SIGNALS, block_stop_signals
from nbdqcow.errors import NbdqcowError
from nbdqcow.nbd.handshake import ExportInfo
from nbdqcow.server.budget import DEFAULT_LIMIT, MemoryBudget
from nbdqcow.server.exports import Export
from nbdqcow.server.protocol import NbdProtocol
from nbdqcow.server.ringio import close_ring

if TYPE_CHECKING:  # ssl is imported only when TLS is used
    from nbdqcow.tls.authz import Authz
    from nbdqcow.tls.creds import TlsCreds

log = logging.getLogger("nbdqcow.server")

DEFAULT_PORT = 10809
#: seconds a client may take to finish the handshake, TLS included (qemu-nbd's
#: --handshake-limit; 0 = no limit)
HANDSHAKE_LIMIT = 10.0


@dataclass(frozen=True)
class TlsConfig:
    """``--tls-creds`` (server endpoint) and ``--tls-authz``."""

    creds: TlsCreds
    authz: Authz | None = None
SD_LISTEN_FDS_START = 3


class _First:
    """The empty export name selects the first export (qemu-nbd's one export)."""


FIRST = _First()


class ListenError(NbdqcowError):
    """Could not create a listening socket."""


# --- listeners ------------------------------------------------------------------------------
def unix_listener(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    # bind a temporary name and rename it once listening: a client never sees a
    # socket file that refuses connections
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        sock.listen(128)
        os.rename(tmp, path)
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ListenError(f"cannot listen on {path}: {e.strerror}") from None
    return sock


def tcp_listeners(host: str | None, port: int) -> list[socket.socket]:
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise ListenError(f"cannot resolve {host}: {e.strerror}") from None
    socks: list[socket.socket] = []
    errors: list[str] = []
    seen: set[tuple[int, object]] = set()
    for family, type_, proto, _, addr in infos:
        if (family, addr) in seen:
            continue
        seen.add((family, addr))
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(128)
        except OSError as e:
            sock.close()
            errors.append(f"{addr}: {e.strerror}")
            continue
        socks.append(sock)
    if not socks:
        raise ListenError("cannot listen: " + "; ".join(errors))
    return socks


def inherited_listeners() -> list[socket.socket]:
    """systemd socket activation: LISTEN_PID is us, LISTEN_FDS sockets start at fd 3."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return socks


def socket_activation_requested() -> bool:
    return "LISTEN_FDS" in os.environ and "LISTEN_PID" in os.environ


# --- the server -----------------------------------------------------------------------------
def _ignore() -> None:
    """A signal the ending server ignores."""


class NbdServer:
    """Exports, client admission (``-e``) and the one-shot rule (no ``-t``)."""

    def __init__(
        self, exports: Sequence[Export], shared: int = 1, persistent: bool = False,
        default: str | None | _First = FIRST,
        max_buffer: int = DEFAULT_LIMIT,
        tls: TlsConfig | None = None, handshake_limit: float = HANDSHAKE_LIMIT,
    ) -> None:
        if not exports and default is FIRST:
            raise ValueError("no exports")
        self.tls = tls
        self.handshake_limit = handshake_limit
        self.exports = list(exports)
        #: the export the empty name selects: FIRST (qemu-nbd: the one export), a name,
        #: or None (none: several exports and no default configured)
        self.default = default
        self.shared = shared
        self.persistent = persistent
        self.connections_total = 0
        self.handshakes_failed = 0
        #: server-wide extras started with the listeners (control socket, metrics)
        self.extras: list[Callable[[NbdServer], Awaitable[asyncio.AbstractServer]]] = []
        self.on_hup: Callable[[], Coroutine[Any, Any, None]] | None = None
        self.active: set[NbdProtocol] = set()
        self.waiting: collections.deque[NbdProtocol] = collections.deque()
        self._done: asyncio.Event | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.unix_paths: list[str] = []
        #: buffered request and reply bytes of all connections (--max-buffer)
        self.budget = MemoryBudget(max_buffer)
        self._trim_pending = False

    # --- exports ----------------------------------------------------------------------------
    def export_infos(self) -> list[ExportInfo]:
        return [e.info() for e in self.exports]

    def export_by_name(self, name: str) -> Export | None:
        for e in self.exports:
            if e.name == name:
                return e
        if name == "":
            if self.default is FIRST:
                return self.exports[0] if self.exports else None
            if isinstance(self.default, str):
                return self.export_by_name(self.default) if self.default else None
        return None

    def lookup_info(self, name: str) -> ExportInfo | None:
        e = self.export_by_name(name)
        return None if e is None else e.info()

    def add_export(self, export: Export) -> None:
        if any(e.name == export.name for e in self.exports):
            raise NbdqcowError(f"export '{export.name}' exists already")
        self.exports.append(export)

    def clients_of(self, export: Export) -> list[NbdProtocol]:
        return [p for p in self.active
                if p.dispatcher is not None and p.dispatcher.export is export]

    async def remove_export(self, name: str, force: bool = False) -> Export:
        """Stop serving ``name``: refused while clients use it unless ``force`` (then
        their in-flight requests finish, the image is flushed, they are disconnected).
        The caller closes the returned export's driver."""
        export = next((e for e in self.exports if e.name == name), None)
        if export is None:
            raise NbdqcowError(f"no export '{name}'")
        clients = self.clients_of(export)
        if clients and not force:
            raise NbdqcowError(f"export '{name}' has {len(clients)} client(s) connected "
                               "(use --force to disconnect them)")
        self.exports.remove(export)
        if clients:
            await asyncio.gather(*(c.shutdown() for c in clients), return_exceptions=True)
        close_ring(asyncio.get_running_loop())  # waits for cold reads still in flight
        if export.writable and export.cache != "unsafe":
            await asyncio.get_running_loop().run_in_executor(None, export.driver.flush)
        return export

    # --- admission --------------------------------------------------------------------------
    def admit(self, proto: NbdProtocol) -> bool:
        self.connections_total += 1
        if self.shared > 0 and len(self.active) >= self.shared:
            self.waiting.append(proto)
            return False
        self.active.add(proto)
        proto.start()
        return True

    def release(self, proto: NbdProtocol) -> None:
        if not proto.in_transmission:
            self.handshakes_failed += 1
        self._schedule_trim()
        if proto in self.active:
            self.active.discard(proto)
        elif proto in self.waiting:
            self.waiting.remove(proto)
        while self.waiting and (self.shared <= 0 or len(self.active) < self.shared):
            nxt = self.waiting.popleft()
            if not nxt.closed:
                self.active.add(nxt)
                nxt.start()
        # one-shot serving (no -t), as qemu-nbd: the server ends when a client that
        # reached transmission leaves and no other connection is open then; probes,
        # LIST/INFO-only connections and failed handshakes never end it
        if not self.persistent and proto.in_transmission and not self.active:
            self.stop()

    def _schedule_trim(self) -> None:
        """Soon after a client left: give the freed heap pages back to the system (its
        buffers went back to malloc, which keeps freed pages of its heap otherwise)."""
        if self._trim_pending:
            return
        self._trim_pending = True

        def trim() -> None:
            self._trim_pending = False
            trim_malloc()

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_later(0.2, trim)

    def negotiated(self, proto: NbdProtocol) -> None:
        """A client finished its handshake (hook for logging/tests)."""

    def stop(self) -> None:
        if self._done is not None:
            self._done.set()

    # --- running ----------------------------------------------------------------------------
    async def serve(
        self, listeners: Sequence[socket.socket], ready: Callable[[], None] | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        # run_in_executor's threads must not take SIGTERM/SIGINT either (see below)
        loop.set_default_executor(ThreadPoolExecutor(initializer=block_stop_signals))
        self._done = asyncio.Event()
        for sock in listeners:
            if sock.family == socket.AF_UNIX:
                srv = await loop.create_unix_server(lambda: NbdProtocol(self), sock=sock)
                name = sock.getsockname()
                if isinstance(name, str) and name:
                    self.unix_paths.append(re.sub(r"\.\d+\.tmp$", "", name))
            else:
                srv = await loop.create_server(lambda: NbdProtocol(self), sock=sock)
            self.servers.append(srv)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        if self.on_hup is not None:
            hup = self.on_hup
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(hup()))
        # after the signal handlers: a SIGHUP sent once the control socket exists must
        # find its handler
        for extra in self.extras:
            self.servers.append(await extra(self))
        if ready is not None:
            ready()
        try:
            await self._done.wait()
        finally:
            # from here on the server is ending: a SIGTERM/SIGINT must not kill it while
            # it flushes and closes the images.  Removing the loop's handler restores the
            # default action (death) until SIG_IGN replaces it, so first hold the signals
            # off in this thread (helper threads never take them): one arriving meanwhile
            # stays pending, and SIG_IGN discards it
            held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, _ignore)
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
                with contextlib.suppress(ValueError):
                    signal.signal(sig, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    async def shutdown(self) -> None:
        for srv in self.servers:
            srv.close()
        clients = list(self.active) + list(self.waiting)
        if clients:
            await asyncio.gather(*(c.shutdown() for c in clients), return_exceptions=True)
        close_ring(asyncio.get_running_loop())  # waits for cold reads still in flight
        for export in self.exports:
            try:
                if export.writable and export.cache != "unsafe":
                    export.driver.flush()
            except Exception as e:  # noqa: BLE001 - report and keep closing
                log.error("flush of export %r failed: %s", export.name, e)
        for path in self.unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)


def tune_malloc() -> None:
    """glibc: at most two malloc arenas.

    Payload buffers are allocated on the event loop and freed by worker threads (and
    the other way round); with one arena per thread, freed memory piles up in arenas
    that are rarely reused and resident memory grows.  (A fixed mmap threshold was
    measured too: it costs 30-60% more CPU per 1 MiB request in page faults.)
    """
    try:
        mallopt = libc()["mallopt"]
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    m_arena_max = -8
    mallopt(m_arena_max, 2)


_malloc_trim: Callable[[int], int] | None = None


def trim_malloc() -> None:
    """glibc's malloc_trim(0): return free heap pages to the system."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = libc()["malloc_trim"]
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            _malloc_trim = lambda _pad: 0  # noqa: E731
    _malloc_trim(0)


def install_uvloop() -> bool:
    """Use uvloop when it is importable."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(
    server: NbdServer,
    listeners: Sequence[socket.socket],
    ready: Callable[[], None] | None = None,
    use_uvloop: bool = True,
) -> None:
    """Serve until the last client leaves (unless persistent) or a signal arrives."""
    tune_malloc()
    if use_uvloop:
        install_uvloop()
    asyncio.run(server.serve(listeners, ready))
    # the server is ending: a SIGTERM/SIGINT now (the event loop's handlers are gone)
    # must not kill the process while the images are closed (last flush, dirty bit)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
