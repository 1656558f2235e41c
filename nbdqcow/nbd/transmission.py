"""Transmission phase, server side: request framing and reply encoders (sans-I/O).

``RequestDecoder`` frames requests, including WRITE payloads.  The shell hands it
bytes either with ``feed(data)`` or, without copies, through ``get_buffer()`` /
``buffer_updated(n)`` (the asyncio BufferedProtocol interface): small requests are
parsed out of one reusable receive buffer; a large WRITE payload is received straight
into its own buffer.  WRITE payloads larger than ``max_payload`` are read and thrown
away (the request comes out with ``payload=None`` so the server can answer an error
and keep the connection).  Before a buffer for a payload of at least ``reserve_min``
bytes is made, ``reserve(length)`` is asked (the server's memory budget); when it says
no, the decoder stops in front of that request (``blocked``) until ``unblock()``.

``ReplyEncoder`` builds reply headers.  Data never gets concatenated to a header: the
shell writes the header and the payload buffers separately (``writelines``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from nbdqcow.errors import RemoteProtocolError
from nbdqcow.nbd import wire
from nbdqcow.nbd.buffers import POOL, POOL_MIN
from nbdqcow.nbd.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    MAX_REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    ReplyFlag,
    ReplyType,
)

_WRITE = int(Cmd.WRITE)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_DONE = int(ReplyFlag.DONE)
_T_NONE = int(ReplyType.NONE)
_T_DATA = int(ReplyType.OFFSET_DATA)
_T_HOLE = int(ReplyType.OFFSET_HOLE)
_T_BS = int(ReplyType.BLOCK_STATUS)
_T_BS_EXT = int(ReplyType.BLOCK_STATUS_EXT)
_T_ERROR = int(ReplyType.ERROR)
_T_ERROR_OFFSET = int(ReplyType.ERROR_OFFSET)

DEFAULT_BUFFER = 256 * 1024


class Request(NamedTuple):
    """One framed request.  ``payload`` is the WRITE data (None: none, or discarded)."""

    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int
    payload: bytes | bytearray | None


class RequestDecoder:
    """Frames requests out of a byte stream (compact or extended headers)."""

    def __init__(
        self,
        extended: bool = False,
        max_payload: int = MAX_REQUEST,
        buffer_size: int = DEFAULT_BUFFER,
        reserve: Callable[[int], bool] | None = None,
        reserve_min: int = 0,
    ) -> None:
        self.extended = extended
        self.max_payload = max_payload
        self._hs = wire.EXTENDED_REQUEST_SIZE if extended else wire.REQUEST_SIZE
        self._unpack = (wire.EXTENDED_REQUEST if extended else wire.REQUEST).unpack_from
        self._magic = EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC
        self._buf = bytearray(max(buffer_size, 4096))
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._payload: bytearray | None = None
        self._pmv: memoryview | None = None
        self._pfill = 0
        self._discard = 0
        self._pending: tuple[int, int, int, int, int] | None = None
        self._big_write = False  # the last request framed was a WRITE of >= POOL_MIN
        self.broken = False
        self.reserve = reserve
        self.reserve_min = reserve_min
        self.blocked = False  # reserve() said no: stopped in front of a WRITE header

    # --- the BufferedProtocol interface -------------------------------------------------
    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (never empty)."""
        if self._pmv is not None:
            return self._pmv[self._pfill :]
        if self._start == self._end:
            self._start = self._end = 0
            if self._big_write:
                # after a large WRITE another one is likely: take just its header, so
                # that its payload is received straight into its own buffer, not
                # copied there from this one
                return self._mv[: self._hs]
        elif len(self._buf) - self._end < self._hs * 4:
            n = self._end - self._start
            self._buf[:n] = self._mv[self._start : self._end]
            self._start, self._end = 0, n
        return self._mv[self._end :]

    def buffer_updated(self, n: int) -> list[Request]:
        """``n`` bytes were written into the last ``get_buffer()``; the completed requests."""
        if self._pmv is not None:
            self._pfill += n
            if self._pfill < len(self._pmv):
                return []
            payload = self._payload
            cmd, flags, cookie, offset, length = self._pending  # type: ignore[misc]
            self._payload = self._pmv = None
            self._pending = None
            out = [Request(cmd, flags, cookie, offset, length, payload)]
            return self._parse(out)
        self._end += n
        if self.blocked:
            return []
        return self._parse([])

    def unblock(self) -> list[Request]:
        """Go on after ``reserve`` said no (it is asked again for the same request)."""
        self.blocked = False
        return self._parse([])

    def close(self) -> None:
        """Drop a partly received payload (the connection is gone)."""
        self._payload = self._pmv = None
        self._pending = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Request]:
        """Convenience for tests and simple callers: hand over any amount of bytes."""
        mv = memoryview(data).cast("B")
        out: list[Request] = []
        while len(mv):
            buf = self.get_buffer()
            k = min(len(buf), len(mv))
            buf[:k] = mv[:k]
            mv = mv[k:]
            out += self.buffer_updated(k)
        return out

    @property
    def idle(self) -> bool:
        """No partial request is buffered."""
        return self._start == self._end and self._pmv is None and not self._discard

    # --- parsing ----------------------------------------------------------------------------
    def _parse(self, out: list[Request]) -> list[Request]:
        if self.broken:
            raise RemoteProtocolError("connection is broken")
        buf, mv, hs = self._buf, self._mv, self._hs
        start, end = self._start, self._end
        while True:
            if self._discard:
                k = min(end - start, self._discard)
                start += k
                self._discard -= k
                if self._discard:
                    break
                cmd, flags, cookie, offset, length = self._pending  # type: ignore[misc]
                self._pending = None
                out.append(Request(cmd, flags, cookie, offset, length, None))
                continue
            if end - start < hs:
                break
            magic, flags, cmd, cookie, offset, length = self._unpack(buf, start)
            if magic != self._magic:
                self.broken = True
                self._start, self._end = start, end
                raise RemoteProtocolError(f"bad request magic {magic:#x}")
            start += hs
            has_payload = cmd == _WRITE or (self.extended and flags & _PAYLOAD_LEN)
            self._big_write = has_payload and length >= POOL_MIN
            if not has_payload or length == 0:
                out.append(Request(cmd, flags, cookie, offset, length, b"" if has_payload else None))
                continue
            if cmd != _WRITE or length > self.max_payload:
                self._discard = length
                self._pending = (cmd, flags, cookie, offset, length)
                continue
            avail = end - start
            if avail >= length:
                out.append(Request(cmd, flags, cookie, offset, length, bytes(mv[start : start + length])))
                start += length
                continue
            if self.reserve is not None and length >= self.reserve_min and not self.reserve(length):
                self.blocked = True
                start -= hs  # parsed again by unblock()
                break
            payload = POOL.take(length)
            payload[:avail] = mv[start:end]
            self._payload = payload
            self._pmv = memoryview(payload)
            self._pfill = avail
            self._pending = (cmd, flags, cookie, offset, length)
            start = end = 0
            break
        self._start, self._end = start, end
        return out


class ReplyEncoder:
    """Reply headers for the negotiated mode (simple, structured or extended)."""

    def __init__(self, structured: bool = False, extended: bool = False) -> None:
        self.structured = structured or extended
        self.extended = extended

    # --- generic ----------------------------------------------------------------------------
    def _chunk(self, flags: int, rtype: int, cookie: int, offset: int, length: int) -> bytes:
        if self.extended:
            return wire.EXTENDED_REPLY.pack(
                EXTENDED_REPLY_MAGIC, flags, rtype, cookie, offset, length
            )
        return wire.STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)

    def ok(self, cookie: int, offset: int = 0) -> bytes:
        """Success without data (WRITE, FLUSH, TRIM, ...)."""
        if self.extended:
            return self._chunk(_DONE, _T_NONE, cookie, offset, 0)
        return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def error(
        self, cookie: int, error: int, message: str = "", offset: int = 0,
        error_offset: int | None = None,
    ) -> bytes:
        """A final error reply (simple, or an ERROR chunk with DONE)."""
        if not self.structured:
            return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
        msg = message.encode()[:4096]
        payload = wire.ERROR_HEADER.pack(error, len(msg)) + msg
        rtype = _T_ERROR
        if error_offset is not None:
            payload += wire.ERROR_OFFSET.pack(error_offset)
            rtype = _T_ERROR_OFFSET
        return self._chunk(_DONE, rtype, cookie, offset, len(payload)) + payload

    def none(self, cookie: int, offset: int = 0) -> bytes:
        """Structured NONE chunk with DONE (ends a reply whose last chunk was not final)."""
        return self._chunk(_DONE, _T_NONE, cookie, offset, 0)

    # --- READ -------------------------------------------------------------------------------
    def read_simple(self, cookie: int) -> bytes:
        """Simple reply header; the data follows as a separate buffer."""
        return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def data(self, cookie: int, offset: int, length: int, done: bool, req_offset: int = 0) -> bytes:
        """OFFSET_DATA chunk header including its offset; ``length`` data bytes follow."""
        flags = _DONE if done else 0
        if self.extended:
            return wire.EXTENDED_OFFSET_DATA.pack(
                EXTENDED_REPLY_MAGIC, flags, _T_DATA, cookie, req_offset, length + 8, offset
            )
        return wire.STRUCTURED_OFFSET_DATA.pack(
            STRUCTURED_REPLY_MAGIC, flags, _T_DATA, cookie, length + 8, offset
        )

    def hole(self, cookie: int, offset: int, length: int, done: bool, req_offset: int = 0) -> bytes:
        """Complete OFFSET_HOLE chunk."""
        flags = _DONE if done else 0
        if self.extended:
            return wire.EXTENDED_OFFSET_HOLE.pack(
                EXTENDED_REPLY_MAGIC, flags, _T_HOLE, cookie, req_offset, 12, offset, length
            )
        return wire.STRUCTURED_OFFSET_HOLE.pack(
            STRUCTURED_REPLY_MAGIC, flags, _T_HOLE, cookie, 12, offset, length
        )

    # --- BLOCK_STATUS -----------------------------------------------------------------------
    def block_status(
        self, cookie: int, context_id: int, extents: Iterable[tuple[int, int]], done: bool,
        req_offset: int = 0,
    ) -> bytes:
        """Complete BLOCK_STATUS (or BLOCK_STATUS_EXT) chunk: ``extents`` = (length, flags)."""
        flags = _DONE if done else 0
        if self.extended:
            descs = [wire.BLOCK_DESCRIPTOR_EXT.pack(n, f) for n, f in extents]
            payload = wire.BLOCK_STATUS_EXT_HEADER.pack(context_id, len(descs)) + b"".join(descs)
            return self._chunk(flags, _T_BS_EXT, cookie, req_offset, len(payload)) + payload
        body = b"".join([wire.BLOCK_DESCRIPTOR.pack(n, f) for n, f in extents])
        payload = wire.BLOCK_STATUS_HEADER.pack(context_id) + body
        return self._chunk(flags, _T_BS, cookie, req_offset, len(payload)) + payload
