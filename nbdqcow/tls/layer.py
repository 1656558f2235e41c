"""TLS between an asyncio socket transport and an NBD protocol, after STARTTLS.

:class:`TlsLayer` is both the raw transport's protocol (ciphertext in) and the
transport the NBD protocol writes to (plaintext out): the server's protocol keeps its
code and only swaps its ``transport``; :func:`upgrade_streams` does the same for a
client's asyncio streams.  The TLS work is a sans-I/O session from
:mod:`nbdqcow.tls.session`.  Under TLS, replies cannot leave through sendfile (no
kernel TLS here): every byte is encrypted by OpenSSL in this process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from nbdqcow.tls.session import TlsClosed, TlsError, TlsSession

_RAW_BUFFER = 256 * 1024
#: plaintext writes smaller than this are gathered and encrypted together at the end of
#: the event loop iteration (one TLS record and one socket write for many small replies)
_GATHER_MAX = 16 * 1024
#: large writes are encrypted and handed to the socket this much at a time (4 records)
_SLICE = 64 * 1024


class _App(Protocol):
    def get_buffer(self, sizehint: int) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


class _StreamApp:
    """A plain (data_received) protocol seen as a buffered one."""

    def __init__(self, proto: asyncio.Protocol) -> None:
        self.proto = proto
        self._buf = memoryview(bytearray(_RAW_BUFFER))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        self.proto.data_received(bytes(self._buf[:nbytes]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.proto.connection_lost(exc)

    def pause_writing(self) -> None:
        self.proto.pause_writing()

    def resume_writing(self) -> None:
        self.proto.resume_writing()


class TlsLayer(asyncio.BufferedProtocol):
    """Raw side: a BufferedProtocol.  App side: the subset of ``asyncio.Transport``
    the NBD protocol uses."""

    def __init__(self, raw: asyncio.Transport, session: TlsSession, app: _App,
                 on_ready: Callable[[TlsSession], str | None] | None = None) -> None:
        self.raw = raw
        self.session = session
        self.app = app
        self.on_ready = on_ready  # returns a refusal reason, or None to go on
        self.on_failure: Callable[[str], None] | None = None
        self.ready = False
        self._buf = memoryview(bytearray(_RAW_BUFFER))
        self._plain: list[bytes | bytearray | memoryview] = []  # gathered small writes
        self._plain_n = 0
        self._flush_handle: asyncio.Handle | None = None
        self._paused = False
        self._closed = False
        self._loop = asyncio.get_running_loop()
        #: done when the TLS handshake succeeded (result) or failed (exception)
        self.handshake_done: asyncio.Future[None] = self._loop.create_future()
        # a server side failure is logged by on_failure; nobody awaits the future then
        self.handshake_done.add_done_callback(lambda f: f.cancelled() or f.exception())

    def start(self) -> None:
        """Client side: send the ClientHello."""
        self._handshake_step()

    def _handshake_step(self) -> bool:
        try:
            done = self.session.handshake()
        except TlsError as e:
            self._flush()
            self._fail(f"TLS handshake failed: {e}")
            return False
        self._flush()
        if not done:
            return False
        refusal = self.on_ready(self.session) if self.on_ready is not None else None
        if refusal is not None:
            self._fail(refusal)
            return False
        self.ready = True
        if not self.handshake_done.done():
            self.handshake_done.set_result(None)
        return True

    # --- raw side ------------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.ready and not self._closed:
            self.session.feed(self._buf[:nbytes])
            self._pump()
        else:
            self.feed(self._buf[:nbytes])

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            return
        self.session.feed(data)
        if not self.ready and not self._handshake_step():
            return
        self._pump()

    def _pump(self) -> None:
        """Hand decrypted bytes to the app while it reads."""
        session, app = self.session, self.app
        while not self._paused and not self._closed:
            # one read_into fills the app's buffer from as many records as there are
            # (one buffer_updated per MiB, not one per 16 KiB record); a short one means
            # the session has nothing more until the next feed
            buf = app.get_buffer(-1)
            try:
                got = session.read_into(buf)
            except TlsClosed:
                got = 0
            except TlsError as e:
                self._fail(f"TLS error: {e}")
                return
            if got:
                app.buffer_updated(got)
            if session.eof:
                self._flush()
                self.close()
                return
            if got < len(buf):
                break
        self._flush()  # TLS 1.3 key updates / tickets

    def _flush(self) -> None:
        out = self.session.take()
        if out and not self.raw.is_closing():
            self.raw.write(out)

    def _fail(self, reason: str) -> None:
        self._closed = True
        if self.on_failure is not None:
            self.on_failure(reason)
        if not self.handshake_done.done():
            self.handshake_done.set_exception(TlsError(reason))
        self.raw.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if not self.handshake_done.done():
            self.handshake_done.set_exception(
                TlsError("the peer closed the connection during the TLS handshake"))
        self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    # --- app side (transport interface) ------------------------------------------------------
    # Writes are encrypted in order; small ones are gathered, and the ciphertext of one
    # event-loop iteration leaves in one socket write (fewer records, syscalls, wakeups).
    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines((data,))

    def writelines(self, bufs: Iterable[bytes | bytearray | memoryview]) -> None:
        if self._closed or self.raw.is_closing():
            return
        plain = self._plain
        try:
            for b in bufs:
                n = len(b)
                if n < _GATHER_MAX:
                    plain.append(b)
                    self._plain_n += n
                    if self._plain_n >= _GATHER_MAX:
                        self._encrypt_gathered()
                else:
                    if plain:
                        # the gathered bytes (a reply header) share the first record
                        k = _GATHER_MAX - self._plain_n
                        view = memoryview(b)
                        plain.append(view[:k])
                        self._encrypt_gathered()
                        b = view[k:]
                    self._write_large(b)
        except TlsError as e:
            self._fail(f"TLS error: {e}")
            return
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush_written)

    def _write_large(self, b: bytes | bytearray | memoryview) -> None:
        """Encrypt and send in slices: the peer decrypts the first records while the
        next ones are encrypted here (on two CPUs, twice the throughput of one big
        write at the end)."""
        n = len(b)
        if n <= _SLICE:
            self.session.write(b)
            return
        view = memoryview(b)
        for pos in range(0, n, _SLICE):
            self.session.write(view[pos : pos + _SLICE])
            self._flush()

    def _encrypt_gathered(self) -> None:
        plain, self._plain, self._plain_n = self._plain, [], 0
        self.session.write(plain[0] if len(plain) == 1 else b"".join(plain))

    def _flush_written(self) -> None:
        self._flush_handle = None
        if self._closed:
            return
        if self._plain:
            try:
                self._encrypt_gathered()
            except TlsError as e:
                self._fail(f"TLS error: {e}")
                return
        self._flush()

    def close(self) -> None:
        if not self._closed:
            self._flush_written()
            self._closed = True
            self.session.close()  # close_notify
            self._flush()
        self.raw.close()

    def abort(self) -> None:
        self._closed = True
        self.raw.abort()

    def is_closing(self) -> bool:
        return self._closed or self.raw.is_closing()

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size() + self._plain_n + self.session.pending()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high=high, low=low)

    def pause_reading(self) -> None:
        self._paused = True
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self.raw.resume_reading()
            self._loop.call_soon(self._pump)

    def is_reading(self) -> bool:
        return not self._paused

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "tls_session":
            return self.session
        return self.raw.get_extra_info(name, default)


async def upgrade_streams(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: TlsSession,
    limit: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Client side: run the TLS handshake on ``writer``'s connection and return streams
    that read and write through it (the old ones must not be used any more)."""
    loop = asyncio.get_running_loop()
    raw = writer.transport
    new_reader = asyncio.StreamReader(limit=limit, loop=loop)
    proto = asyncio.StreamReaderProtocol(new_reader, loop=loop)
    layer = TlsLayer(raw, session, _StreamApp(proto))  # type: ignore[arg-type]
    raw.set_protocol(layer)
    proto.connection_made(layer)  # type: ignore[arg-type]
    layer.start()
    await layer.handshake_done
    new_writer = asyncio.StreamWriter(layer, proto, new_reader, loop)  # type: ignore[arg-type]
    return new_reader, new_writer
