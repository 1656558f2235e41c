"""Sans-I/O TLS sessions over memory buffers: ciphertext in with :meth:`feed`, out with
:meth:`take`; plaintext through :meth:`read_into` and :meth:`write`.

Two engines behind one interface: :class:`SslSession` (Python's :mod:`ssl`, x509 and
anonymous credentials) and :class:`OpenSslSession` (pyOpenSSL, PSK).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any, Protocol

from nbdqcow.errors import NbdqcowError


class TlsError(NbdqcowError):
    """The TLS handshake or a TLS record failed (bad certificate, wrong key, ...)."""


class TlsClosed(Exception):
    """The peer ended the TLS session (close_notify)."""


class TlsSession(Protocol):
    """What the I/O layers need from a TLS session."""

    def feed(self, data: bytes | bytearray | memoryview) -> object: ...

    def handshake(self) -> bool: ...

    #: the peer's close_notify arrived after the bytes the last read_into returned
    eof: bool

    def read_into(self, buf: memoryview) -> int: ...

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def take(self) -> bytes: ...

    def pending(self) -> int: ...

    def close(self) -> None: ...

    def peer_identity(self) -> str | None: ...

    def describe(self) -> str: ...


class SslSession:
    """:class:`ssl.SSLObject` on two :class:`ssl.MemoryBIO`.

    The per-record and per-chunk calls go straight to C (``MemoryBIO.write`` and
    ``.read``, the ``_ssl`` object under :class:`ssl.SSLObject`): no Python frame of
    ours or of :mod:`ssl` in between."""

    eof = False
    #: ciphertext in (``MemoryBIO.write``)
    feed: Callable[[bytes | bytearray | memoryview], object]
    #: ciphertext out, all there is (``MemoryBIO.read``)
    take: Callable[[], bytes]

    def __init__(self, ctx: ssl.SSLContext, server_side: bool,
                 hostname: str | None = None,
                 identity: Callable[[ssl.SSLObject], str | None] | None = None) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                 server_hostname=hostname)
        self._identity = identity
        self.feed = self._in.write
        self.take = self._out.read
        c: Any = getattr(self._obj, "_sslobj", self._obj)  # the C object, when there
        self._read: Callable[[int, memoryview], int] = c.read
        self._write: Callable[[bytes | bytearray | memoryview], int] = c.write
        self._pending: Callable[[], int] = c.pending

    def handshake(self) -> bool:
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as e:
            raise TlsError(_ssl_reason(e)) from None
        return True

    def read_into(self, buf: memoryview) -> int:
        """Decrypt into ``buf`` from as many records as there are (a record holds at
        most 16 KiB): fewer than ``len(buf)`` bytes means nothing more is buffered."""
        if self.eof:
            raise TlsClosed()
        read, size, got, bio = self._read, len(buf), 0, self._in
        try:
            while got < size:
                # OpenSSL (no read-ahead) takes one record at a time from the BIO: with
                # the BIO empty and nothing decrypted left, a read can only fail.  The
                # socket hands over whole records (the peer sends one per write), so
                # this skips the SSLWantReadError a chunk would otherwise end with.
                if not bio.pending and not self._pending():
                    return got
                n = read(size - got, buf[got:] if got else buf)
                if n <= 0:  # close_notify (ssl answers 0 or SSLZeroReturnError)
                    break
                got += n
            else:
                return got
        except ssl.SSLWantReadError:
            return got
        except ssl.SSLZeroReturnError:
            pass
        except ssl.SSLError as e:
            raise TlsError(_ssl_reason(e)) from None
        self.eof = True
        if not got:
            raise TlsClosed()
        return got

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._write(data)
        except ssl.SSLError as e:
            raise TlsError(_ssl_reason(e)) from None

    def pending(self) -> int:
        return self._out.pending

    def close(self) -> None:
        try:
            self._obj.unwrap()
        except ssl.SSLError:
            pass

    def peer_identity(self) -> str | None:
        return self._identity(self._obj) if self._identity is not None else None

    def describe(self) -> str:
        return f"{self._obj.version()} {(self._obj.cipher() or ('?',))[0]}"


def _ssl_reason(e: ssl.SSLError) -> str:
    reason = getattr(e, "reason", None)
    verify = getattr(e, "verify_message", None)
    text = str(reason or e.strerror or e).replace("_", " ").lower()
    return f"{text}: {verify}" if verify else text


#: the largest plaintext of one TLS record
_RECORD = 16 * 1024


class OpenSslSession:
    """pyOpenSSL's ``Connection`` on memory BIOs (``Connection(ctx, None)``)."""

    eof = False

    def __init__(self, conn: Any, identity: Callable[[], str | None]) -> None:
        from OpenSSL import SSL

        self._SSL = SSL
        self._conn = conn
        self._identity = identity
        # the size of the outgoing BIO (cryptography's binding; pyOpenSSL has no call
        # for it): take() reads exactly that, instead of a 1 MiB buffer and an
        # exception per call
        self._out_pending: Callable[[], int] | None = None
        try:
            from cryptography.hazmat.bindings.openssl.binding import Binding

            lib: Any = Binding.lib
            bio = conn._from_ssl
            self._out_pending = lambda: int(lib.BIO_ctrl_pending(bio))
        except (ImportError, AttributeError):
            pass

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._conn.bio_write(data)  # any buffer (cffi from_buffer): no copy here
        except TypeError:  # an older pyOpenSSL that takes bytes only
            self._conn.bio_write(bytes(data))

    def handshake(self) -> bool:
        SSL = self._SSL
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as e:
            raise TlsError(_openssl_reason(e)) from None
        return True

    def read_into(self, buf: memoryview) -> int:
        """As :meth:`SslSession.read_into`."""
        if self.eof:
            raise TlsClosed()
        SSL, recv_into = self._SSL, self._conn.recv_into
        size, got = len(buf), 0
        try:
            while got < size:
                # pyOpenSSL reads through a temporary buffer of the size asked for: ask
                # for one record (16 KiB at most), not for the whole request
                n = recv_into(buf[got:] if got else buf, min(size - got, _RECORD))
                if n <= 0:
                    break
                got += n
            else:
                return got
        except SSL.WantReadError:
            return got
        except SSL.ZeroReturnError:
            pass
        except SSL.Error as e:
            raise TlsError(_openssl_reason(e)) from None
        self.eof = True
        if not got:
            raise TlsClosed()
        return got

    def write(self, data: bytes | bytearray | memoryview) -> None:
        SSL = self._SSL
        view = memoryview(data)
        try:
            while view:
                n = self._conn.send(view)
                view = view[n:]
        except SSL.Error as e:
            raise TlsError(_openssl_reason(e)) from None

    def take(self) -> bytes:
        if self._out_pending is not None:
            n = self._out_pending()
            return bytes(self._conn.bio_read(n)) if n else b""
        SSL = self._SSL
        n = 0
        chunks = []
        while True:
            try:
                chunk = self._conn.bio_read(max(n, 1 << 20))
            except SSL.WantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def pending(self) -> int:
        # not known without the binding: then every flush take()s what there is
        return self._out_pending() if self._out_pending is not None else 0

    def close(self) -> None:
        SSL = self._SSL
        try:
            self._conn.shutdown()
        except SSL.Error:
            pass

    def peer_identity(self) -> str | None:
        return self._identity()

    def describe(self) -> str:
        return f"{self._conn.get_protocol_version_name()} {self._conn.get_cipher_name()}"


def _openssl_reason(e: Exception) -> str:
    args = e.args[0] if e.args else None
    if isinstance(args, list) and args and isinstance(args[0], tuple):
        return "; ".join(str(a[-1]) for a in args)
    return str(e) or type(e).__name__
