"""asyncio BufferedProtocol: wires one client connection to the sans-I/O codec."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from nbdqcow.block.hostfile import pread_full
from nbdqcow.errors import RemoteProtocolError
from nbdqcow.nbd.buffers import Leases
from nbdqcow.nbd.constants import MAX_REQUEST, Cmd
from nbdqcow.nbd.handshake import ServerHandshake
from nbdqcow.nbd.transmission import Request, RequestDecoder
from nbdqcow.server.budget import CHARGE_MIN
from nbdqcow.server.dispatch import Dispatcher, Leased, Reply
from nbdqcow.server.flow import FlowControl

if TYPE_CHECKING:
    from nbdqcow.server.serve import NbdServer
    from nbdqcow.tls.session import TlsSession

log = logging.getLogger("nbdqcow.server")

_HANDSHAKE_BUFFER = 16 * 1024
_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)
#: send buffer asked for on every client socket (replies leave without queuing in Python)
SOCKET_BUFFER = 2 * 1024 * 1024
JOIN_SMALL = 256 * 1024
#: a reply's data up to this size is joined to its header (one small copy, one write)
JOIN_REPLY = 64 * 1024


def _dropped(bufs: Reply) -> None:
    """Where replies of a closed connection go."""


class NbdProtocol(asyncio.BufferedProtocol):
    """One client: handshake first, then transmission."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.handshake: ServerHandshake | None = None
        self.decoder: RequestDecoder | None = None
        self.dispatcher: Dispatcher | None = None
        self.flow: FlowControl | None = None
        self._hsbuf = memoryview(b"")  # allocated when admitted (queued clients hold none)
        self.closed = False
        self.started = False
        self.backlog: collections.deque[Request] = collections.deque()
        # replies produced while handling one batch of requests go out in one writev
        self._cork: list[bytes | bytearray | memoryview] | None = None
        self._corked = 0  # bytes in _cork
        self.peer = ""
        self._sockfd = -1  # the connection's socket, for sendfile
        self.leases = Leases()  # pooled READ buffers the transport may still be sending
        self._deadline: asyncio.TimerHandle | None = None

    # --- connection lifecycle -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: trust the interface
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.flow = FlowControl(transport, budget=self.server.budget)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if SOCKET_BUFFER:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self.peer = str(transport.get_extra_info("peername") or "unix")
        try:
            self._sockfd = sock.fileno() if sock is not None else -1
        except (OSError, AttributeError):
            self._sockfd = -1
        if not self.server.admit(self):
            transport.pause_reading()  # queued: no greeting until a slot frees up

    def start(self) -> None:
        """Send the greeting (called when the connection is admitted)."""
        assert self.transport is not None
        self.started = True
        self._hsbuf = memoryview(bytearray(_HANDSHAKE_BUFFER))
        self.transport.resume_reading()
        self.handshake = ServerHandshake(self.server.export_infos, lookup=self.server.lookup_info,
                                         tls=self.server.tls is not None)
        self.transport.write(self.handshake.start())
        limit = self.server.handshake_limit
        if limit > 0:
            self._deadline = self.loop.call_later(limit, self._handshake_deadline)
        log.info("client %s connected", self.peer)

    @property
    def in_transmission(self) -> bool:
        """The client finished the handshake (GO / EXPORT_NAME): a real client."""
        return self.decoder is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._deadline is not None:  # it would keep this connection alive 10 s more
            self._deadline.cancel()
            self._deadline = None
        self._hsbuf = memoryview(b"")
        self.backlog.clear()  # nobody will read the replies: do not start more work
        if self.decoder is not None:
            self.decoder.close()  # a half-received WRITE payload goes now
        self.leases = Leases()
        if self.flow is not None:
            self.flow.stopped = True
            self.flow.backlog = 0
            self.flow.close()  # every byte it held goes back to the budget at once
            self.flow.update()  # idle once nothing is in flight
        self.server.release(self)
        log.info("client %s disconnected", self.peer)
        self._unlink()

    def _unlink(self) -> None:
        """Break the reference cycles through bound methods, so that the connection and
        every buffer it holds are freed now, not at some later cyclic collection."""
        if self.flow is not None:
            self.flow.on_capacity = None
        if self.decoder is not None:
            self.decoder.reserve = None
        disp = self.dispatcher
        if disp is not None:
            disp.send = _dropped  # requests still running answer nobody
            disp.send_file = None
            disp.unlink()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        if self.flow is not None:
            self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.leases.reclaim()
        if self.flow is not None:
            self.flow.resume_writing()

    def _handshake_deadline(self) -> None:
        if self.decoder is None and not self.closed and self.transport is not None:
            log.warning("client %s: handshake not finished in %gs", self.peer,
                        self.server.handshake_limit)
            self.transport.close()

    def abort(self, reason: str) -> None:
        log.warning("client %s: %s; disconnecting", self.peer, reason)
        if self.transport is not None:
            self.transport.abort()

    # --- reading ----------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        if self.decoder is not None:
            return self.decoder.get_buffer()
        return self._hsbuf

    def buffer_updated(self, nbytes: int) -> None:
        decoder = self.decoder
        if decoder is None:
            self._handshake_data(self._hsbuf[:nbytes])
            return
        try:
            reqs = decoder.buffer_updated(nbytes)
        except RemoteProtocolError as e:
            self.abort(str(e))
            return
        if reqs:  # none: a part of a WRITE payload arrived
            self._handle(reqs)

    def _handle(self, reqs: list[Request]) -> None:
        if len(reqs) > 1:
            self.corked(lambda: self._handle_batch(reqs))
        else:
            self._handle_batch(reqs)

    def corked(self, fn: Callable[[], None]) -> None:
        """Run ``fn``; the replies it sends go out in as few writes as possible."""
        if self._cork is not None:
            fn()
            return
        self._cork = []
        try:
            fn()
        finally:
            # corking ends before the write: a reply produced while the transport
            # writes (resume_writing -> backlog drained) goes out directly after it
            bufs, self._cork, self._corked = self._cork, None, 0
            self._write_joined(bufs)

    def _flush_cork(self) -> None:
        """Mid-batch: write what the batch produced so far; replies produced while that
        write runs are corked again, after it."""
        bufs, self._cork, self._corked = self._cork, [], 0
        self._write_joined(bufs)

    def _write_joined(self, bufs: list[bytes | bytearray | memoryview] | None) -> None:
        """Write ``bufs`` (small ones joined into one write)."""
        t = self.transport
        if bufs and t is not None and not t.is_closing():
            if sum(map(len, bufs)) <= JOIN_SMALL:
                t.write(b"".join(bufs))
            else:
                t.writelines(bufs)

    def _handle_batch(self, reqs: list[Request]) -> None:
        if self.backlog:
            self.backlog.extend(reqs)
            self._drain()
            return
        disp, flow = self.dispatcher, self.flow
        assert disp is not None and flow is not None
        for i, req in enumerate(reqs):
            if disp.disconnecting:
                break
            # over the in-flight caps, or no budget for it now: the rest waits its turn
            charge = -1 if flow.saturated else self._charge(req)
            if charge < 0:
                self.backlog.extend(reqs[i:])
                flow.backlog = len(self.backlog)
                flow.update()
                return
            disp.handle(req, charge)
        if disp.disconnecting:
            self._disconnect()

    def _charge(self, req: Request) -> int:
        """The budget bytes ``req`` holds (its WRITE payload was charged when it
        arrived; a large READ is charged now); -1: not now (the budget said wait)."""
        n = req.length
        if n < CHARGE_MIN:
            return 0
        if req.cmd == _WRITE:
            return n if isinstance(req.payload, bytearray) else 0
        if req.cmd != _READ or n > MAX_REQUEST:
            return 0
        assert self.flow is not None
        return n if self.flow.charge(n) else -1

    def _reserve_payload(self, n: int) -> bool:
        """The decoder is about to receive a WRITE payload of ``n`` bytes: charge it, or
        park the decoder (no buffer, reading paused) until the budget grants it."""
        flow = self.flow
        assert flow is not None
        if not self.backlog and flow.charge(n):
            flow.parked = False
            return True
        flow.parked = True
        flow.update()
        return False

    def _drain(self) -> None:
        """Start backlogged requests while the caps allow (called when capacity frees)."""
        disp, flow, backlog = self.dispatcher, self.flow, self.backlog
        assert disp is not None and flow is not None
        while backlog and not flow.saturated and not disp.disconnecting:
            charge = self._charge(backlog[0])
            if charge < 0:
                break
            disp.handle(backlog.popleft(), charge)
        flow.backlog = len(backlog)
        if disp.disconnecting:
            backlog.clear()
            flow.backlog = 0
            flow.parked = False
            self._disconnect()
            return
        decoder = self.decoder
        if flow.parked and not backlog and not flow.waiting and decoder is not None:
            flow.parked = False  # the WRITE payload the decoder waits for: ask again
            try:
                reqs = decoder.unblock()
            except RemoteProtocolError as e:
                self.abort(str(e))
                return
            if reqs:
                self._handle(reqs)
        flow.update()  # reading resumes once the backlog is gone

    def _handshake_data(self, data: memoryview) -> None:
        hs, transport = self.handshake, self.transport
        if hs is None or transport is None:  # data before admission: cannot happen
            return
        out = hs.receive(data)
        if out:
            transport.write(out)
        if hs.closed:
            log.info("client %s: %s", self.peer, hs.close_reason)
            transport.close()
            return
        if hs.starttls:
            self._start_tls(hs.leftover)
            return
        if hs.done:
            neg = hs.result
            assert neg is not None and self.flow is not None
            export = self.server.export_by_name(neg.export.name)
            if export is None:  # removed while this client negotiated
                self.abort(f"export {neg.export.name!r} is gone")
                return
            self.decoder = RequestDecoder(extended=neg.extended, reserve=self._reserve_payload,
                                          reserve_min=CHARGE_MIN)
            self.dispatcher = Dispatcher(export, neg, self.send, self.flow, self.loop,
                                         self.send_file if self._sockfd >= 0 else None,
                                         self.corked)
            self.flow.on_capacity = self._drain
            self.server.negotiated(self)
            if hs.leftover:
                try:
                    reqs = self.decoder.feed(hs.leftover)
                except RemoteProtocolError as e:
                    self.abort(str(e))
                    return
                self._handle(reqs)

    # --- TLS --------------------------------------------------------------------------------
    def _start_tls(self, early: bytes) -> None:
        """STARTTLS was acknowledged: the rest of the connection goes through TLS."""
        tls, raw = self.server.tls, self.transport
        assert tls is not None and raw is not None and self.flow is not None
        from nbdqcow.tls.layer import TlsLayer  # only when TLS is used (ssl is slow to import)

        layer = TlsLayer(raw, tls.creds.session(), self, self._tls_ready)
        layer.on_failure = self._tls_failed
        raw.set_protocol(layer)
        self.transport = cast(asyncio.Transport, layer)
        self.flow.transport = self.transport
        self._sockfd = -1  # no sendfile: every byte is encrypted
        if early:
            layer.feed(early)

    def _tls_ready(self, session: TlsSession) -> str | None:
        """The TLS handshake succeeded: authorize the peer, then negotiate again."""
        tls, hs = self.server.tls, self.handshake
        assert tls is not None and hs is not None
        identity = session.peer_identity()
        if tls.authz is not None and (identity is None or not tls.authz.is_allowed(identity)):
            return f"TLS {tls.creds.kind} authz check for {identity} is denied"
        hs.tls_started()
        log.info("client %s: TLS established (%s, %s)", self.peer, session.describe(),
                 identity or "no identity")
        return None

    def _tls_failed(self, reason: str) -> None:
        log.warning("client %s: %s", self.peer, reason)

    # --- writing ----------------------------------------------------------------------------
    def send(self, bufs: Reply) -> None:
        if self._cork is not None:
            self._cork.extend(bufs)
            self._corked += sum(map(len, bufs)) if len(bufs) > 1 else len(bufs[0])
            if self._corked >= JOIN_SMALL:
                # hand it to the transport now: its buffer limits (pause_writing) must
                # see what a long batch of inline READs produces
                self._flush_cork()
        else:
            t = self.transport
            if t is not None and not t.is_closing():
                if len(bufs) == 1:
                    t.write(bufs[0])
                elif len(bufs) == 2 and len(bufs[1]) <= JOIN_REPLY:
                    # header + small data: one buffer takes uvloop's one-write fast path
                    t.write(b"".join(bufs))
                else:
                    t.writelines(bufs)
        if type(bufs) is Leased:
            self.leases.add(bufs.buf)

    def send_file(self, head: bytes, fd: int, pos: int, n: int) -> bool:
        """Send ``head`` then ``n`` bytes of ``fd`` from ``pos`` straight from the page
        cache (sendfile: no copy through Python).  Only when nothing is queued in the
        transport (the bytes must follow every earlier reply); what the socket does not
        take now is queued in the transport after it, in order.  False: nothing sent."""
        t, sock = self.transport, self._sockfd
        if (t is None or sock < 0 or self._cork or t.is_closing()
                or t.get_write_buffer_size()):
            return False
        try:
            k = os.write(sock, head)
        except OSError:  # full (EAGAIN) or broken: the usual path copes
            return False
        if k < len(head):
            t.write(head[k:])
            t.write(pread_full(fd, n, pos))
            return True
        sent = 0
        try:
            while sent < n:
                got = os.sendfile(sock, fd, pos + sent, n - sent)
                if got == 0:
                    break
                sent += got
        except OSError:  # the socket is full: the rest goes through the transport
            pass
        if sent < n:
            t.write(pread_full(fd, n - sent, pos + sent))
        return True

    def _disconnect(self) -> None:
        """NBD_CMD_DISC: stop reading, finish what is in flight, then close."""
        assert self.flow is not None
        self.flow.stop()
        self.loop.create_task(self._close_when_idle())

    async def _close_when_idle(self) -> None:
        assert self.flow is not None
        await self.flow.idle.wait()
        if self.transport is not None:
            self.transport.close()

    async def shutdown(self) -> None:
        """Server shutdown: stop reading, let in-flight requests finish, close."""
        if self.flow is not None:
            self.flow.stop()
            try:
                await asyncio.wait_for(self.flow.idle.wait(), 10)
            except TimeoutError:
                pass
        if self.transport is not None:
            self.transport.close()
