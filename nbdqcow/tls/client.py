"""Client-side TLS: sessions from libnbd-style URI parameters, and a blocking wrapper
for synchronous clients (``serve -L``)."""

from __future__ import annotations

import getpass
import socket
import ssl

from nbdqcow.tls.creds import X509Creds, peer_dn
from nbdqcow.tls.psk import PskContext, read_psk_file
from nbdqcow.tls.session import SslSession, TlsClosed, TlsError, TlsSession


def uri_session(*, certificates: str | None = None, psk_file: str | None = None,
                username: str | None = None, verify_peer: bool = True,
                hostname: str | None = None) -> TlsSession:
    """A client session as libnbd makes one for an ``nbds://`` URI: PSK with
    ``tls-psk-file`` (the URI's user, else the login name), else x509 with the
    certificates in ``tls-certificates`` (``ca-cert.pem``, ``client-cert.pem``,
    ``client-key.pem``) or the system's CAs."""
    if psk_file is not None:
        user = username or getpass.getuser()
        return PskContext(False, read_psk_file(psk_file), user, None, None).session()
    if certificates is not None:
        creds = X509Creds("uri", endpoint="client", verify_peer=verify_peer, dir=certificates)
        return creds.session(hostname)
    ctx = ssl.create_default_context()
    if not verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif not hostname:
        ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return SslSession(ctx, False, hostname=hostname, identity=peer_dn)


class BlockingTls:
    """``recv``/``sendall`` through a TLS session over a blocking socket."""

    def __init__(self, sock: socket.socket, session: TlsSession) -> None:
        self.sock = sock
        self.session = session
        self._buf = memoryview(bytearray(64 * 1024))
        while True:
            done = session.handshake()
            out = session.take()
            if out:
                sock.sendall(out)
            if done:
                return
            data = sock.recv(65536)
            if not data:
                raise TlsError("the server closed the connection during the TLS handshake")
            session.feed(data)

    def recv(self, n: int) -> bytes:
        view = self._buf[: min(n, len(self._buf))]
        while True:
            try:
                k = self.session.read_into(view)
            except TlsClosed:
                return b""
            if k:
                return bytes(view[:k])
            data = self.sock.recv(65536)
            if not data:
                return b""
            self.session.feed(data)

    def sendall(self, data: bytes) -> None:
        self.session.write(data)
        self.sock.sendall(self.session.take())

    def close(self) -> None:
        self.session.close()
        out = self.session.take()
        if out:
            try:
                self.sock.sendall(out)
            except OSError:
                pass
