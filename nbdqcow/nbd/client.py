"""The client side of the NBD codec (doc/proto.md of NetworkBlockDevice/nbd).

Sans-I/O: functions that build what a client sends (option requests, transmission
request headers) and parse what a server answers (greeting, option replies, simple,
structured and extended reply headers, chunk payloads).  ``nbdqcow.nbdclient`` wires
these to asyncio streams; tests use them with raw sockets.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from nbdqcow.errors import RemoteError, RemoteProtocolError
from nbdqcow.nbd import wire
from nbdqcow.nbd.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)

# --- codecs: the shared ones from wire.py, client-only ones here ------------------------
GREETING = wire.SERVER_GREETING  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = wire.CLIENT_FLAGS
OPTION_HEADER = wire.OPTION_REQUEST  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = wire.OPTION_REPLY  # magic, option, reply type, length
EXPORT_NAME_REPLY = wire.EXPORT_NAME_REPLY  # size, transmission flags (+124 zeroes)
REQUEST = wire.REQUEST  # magic, flags, type, cookie, offset, length
EXTENDED_REQUEST = wire.EXTENDED_REQUEST
SIMPLE_REPLY = wire.SIMPLE_REPLY  # magic, error, cookie
STRUCTURED_REPLY = wire.STRUCTURED_REPLY  # magic, flags, type, cookie, length
EXTENDED_REPLY = wire.EXTENDED_REPLY  # magic, flags, type, cookie, offset, length
U16 = wire.U16
U32 = wire.U32
U64 = wire.U64
MAGIC = U32
INFO_EXPORT = wire.INFO_EXPORT  # info type, size, transmission flags
INFO_BLOCK_SIZE = wire.INFO_BLOCK_SIZE  # info type, minimum, preferred, maximum
OFFSET_HOLE = wire.OFFSET_HOLE
OFFSET_HOLE_EXT = struct.Struct(">QQ")  # draft-only 64-bit hole (type 3)
BS_EXTENT = wire.BLOCK_DESCRIPTOR
BS_EXT_HEADER = wire.BLOCK_STATUS_EXT_HEADER  # context id, count
BS_EXT_EXTENT = wire.BLOCK_DESCRIPTOR_EXT
ERROR_CHUNK = wire.ERROR_HEADER  # error, message length

GREETING_SIZE = GREETING.size  # 18
EXPORT_NAME_PADDING = wire.EXPORT_NAME_PADDING
# The first read of any reply: a simple reply is exactly this long, structured and
# extended headers are longer (see reply_header_size).
REPLY_PREFIX_SIZE = SIMPLE_REPLY.size  # 16
OFFSET_HOLE_EXT_TYPE = 3  # an early draft of extended headers; accepted, never required

_REPLY_SIZE = {
    SIMPLE_REPLY_MAGIC: SIMPLE_REPLY.size,
    STRUCTURED_REPLY_MAGIC: STRUCTURED_REPLY.size,
    EXTENDED_REPLY_MAGIC: EXTENDED_REPLY.size,
}


# --- handshake ------------------------------------------------------------------------
def parse_greeting(data: bytes | bytearray | memoryview) -> HandshakeFlag:
    """Check the 18-byte newstyle greeting and return the server's handshake flags."""
    if len(data) != GREETING_SIZE:
        raise RemoteProtocolError(f"greeting must be {GREETING_SIZE} bytes, got {len(data)}")
    magic, opt_magic, flags = GREETING.unpack(data)
    if magic != NBDMAGIC:
        raise RemoteProtocolError(f"bad server magic {magic:#x}")
    if opt_magic != IHAVEOPT:
        raise RemoteProtocolError(f"not a newstyle server (magic {opt_magic:#x})")
    if not flags & HandshakeFlag.FIXED_NEWSTYLE:
        raise RemoteProtocolError("server does not speak fixed newstyle negotiation")
    return HandshakeFlag(flags & (HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))


def client_flags(server: HandshakeFlag) -> ClientFlag:
    """The client flags to answer the greeting with: what both sides know."""
    flags = ClientFlag.FIXED_NEWSTYLE
    if server & HandshakeFlag.NO_ZEROES:
        flags |= ClientFlag.NO_ZEROES
    return flags


def build_client_flags(flags: ClientFlag | int) -> bytes:
    return CLIENT_FLAGS.pack(int(flags))


def build_option(option: Opt | int, payload: bytes = b"") -> bytes:
    """One option request: IHAVEOPT, option, length, payload."""
    return OPTION_HEADER.pack(IHAVEOPT, int(option), len(payload)) + payload


def _string(value: str, what: str) -> bytes:
    raw = value.encode()
    if len(raw) > MAX_STRING:
        raise ValueError(f"{what} longer than {MAX_STRING} bytes")
    return raw


def build_export_name(name: str) -> bytes:
    return build_option(Opt.EXPORT_NAME, _string(name, "export name"))


def info_request_payload(name: str, infos: Sequence[Info | int] = (Info.BLOCK_SIZE,)) -> bytes:
    """Payload of NBD_OPT_INFO / NBD_OPT_GO: name length, name, count, info requests."""
    raw = _string(name, "export name")
    payload = U32.pack(len(raw)) + raw + U16.pack(len(infos))
    return payload + b"".join(U16.pack(int(i)) for i in infos)


def build_info_request(
    option: Opt, name: str, infos: Sequence[Info | int] = (Info.BLOCK_SIZE,)
) -> bytes:
    """NBD_OPT_INFO or NBD_OPT_GO."""
    if option not in (Opt.INFO, Opt.GO):
        raise ValueError("only INFO and GO carry information requests")
    return build_option(option, info_request_payload(name, infos))


def meta_context_payload(export: str, queries: Iterable[str]) -> bytes:
    """Payload of NBD_OPT_{LIST,SET}_META_CONTEXT: export, number of queries, queries."""
    raw = _string(export, "export name")
    encoded = [_string(q, "meta context query") for q in queries]
    payload = U32.pack(len(raw)) + raw + U32.pack(len(encoded))
    return payload + b"".join(U32.pack(len(q)) + q for q in encoded)


def build_meta_context(option: Opt, export: str, queries: Iterable[str]) -> bytes:
    """NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT."""
    if option not in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
        raise ValueError("not a meta context option")
    return build_option(option, meta_context_payload(export, queries))


class OptionReply(NamedTuple):
    option: int
    reply: int
    length: int

    @property
    def is_error(self) -> bool:
        return bool(self.reply & (1 << 31))


def parse_option_reply_header(data: bytes | bytearray | memoryview) -> OptionReply:
    magic, option, reply, length = OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise RemoteProtocolError(f"bad option reply magic {magic:#x}")
    return OptionReply(option, reply, length)


def option_error(reply: OptionReply, payload: bytes) -> RemoteError:
    """The error a failed option turns into (the server's message, if any)."""
    try:
        name = Rep(reply.reply).name
    except ValueError:
        name = f"{reply.reply:#x}"
    text = payload.decode(errors="replace")
    return RemoteError(
        reply.reply, f"option {reply.option}: {name}" + (f": {text}" if text else "")
    )


class ExportInfo(NamedTuple):
    size: int
    flags: TransmissionFlag


class BlockSizes(NamedTuple):
    minimum: int
    preferred: int
    maximum: int


InfoValue = ExportInfo | BlockSizes | str | bytes


def parse_info(payload: bytes) -> tuple[int, InfoValue]:
    """One NBD_REP_INFO payload -> (info type, decoded value).  Unknown types: raw bytes."""
    if len(payload) < 2:
        raise RemoteProtocolError("NBD_REP_INFO too short")
    (kind,) = U16.unpack_from(payload)
    if kind == Info.EXPORT:
        if len(payload) != INFO_EXPORT.size:
            raise RemoteProtocolError("NBD_INFO_EXPORT has the wrong length")
        _, size, flags = INFO_EXPORT.unpack(payload)
        return kind, ExportInfo(size, TransmissionFlag(flags))
    if kind == Info.BLOCK_SIZE:
        if len(payload) != INFO_BLOCK_SIZE.size:
            raise RemoteProtocolError("NBD_INFO_BLOCK_SIZE has the wrong length")
        _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(payload)
        return kind, BlockSizes(minimum, preferred, maximum)
    if kind in (Info.NAME, Info.DESCRIPTION):
        return kind, payload[2:].decode(errors="replace")
    return kind, payload[2:]


def parse_export_name_reply(data: bytes) -> ExportInfo:
    size, flags = EXPORT_NAME_REPLY.unpack_from(data)
    return ExportInfo(size, TransmissionFlag(flags))


def parse_server(payload: bytes) -> tuple[str, str]:
    """NBD_REP_SERVER (answer to LIST) -> (export name, description)."""
    if len(payload) < 4:
        raise RemoteProtocolError("NBD_REP_SERVER too short")
    (n,) = U32.unpack_from(payload)
    if 4 + n > len(payload):
        raise RemoteProtocolError("NBD_REP_SERVER name runs past the reply")
    name = payload[4 : 4 + n].decode(errors="replace")
    return name, payload[4 + n :].decode(errors="replace")


def parse_meta_context(payload: bytes) -> tuple[int, str]:
    """NBD_REP_META_CONTEXT -> (context id, context name)."""
    if len(payload) < 4:
        raise RemoteProtocolError("NBD_REP_META_CONTEXT too short")
    (ctx_id,) = U32.unpack_from(payload)
    return ctx_id, payload[4:].decode(errors="replace")


# --- transmission ---------------------------------------------------------------------
def build_request(
    cmd: int, flags: int, cookie: int, offset: int, length: int, extended: bool = False
) -> bytes:
    """A request header (28 bytes, or 32 with extended headers); payload goes separately."""
    if extended:
        return EXTENDED_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


class ReplyHeader(NamedTuple):
    """Any reply header.  For a simple reply ``type`` is NONE, ``flags`` DONE, and
    ``length`` 0 (the data of a simple READ reply follows with the request's length)."""

    magic: int
    flags: int
    type: int
    cookie: int
    length: int
    error: int = 0
    offset: int = 0

    @property
    def simple(self) -> bool:
        return self.magic == SIMPLE_REPLY_MAGIC

    @property
    def done(self) -> bool:
        return bool(self.flags & ReplyFlag.DONE)


def reply_header_size(prefix: bytes | bytearray | memoryview) -> int:
    """Total header size announced by the first bytes (at least 4) of a reply."""
    (magic,) = MAGIC.unpack_from(prefix)
    try:
        return _REPLY_SIZE[magic]
    except KeyError:
        raise RemoteProtocolError(f"bad reply magic {magic:#x}") from None


def parse_reply_header(data: bytes | bytearray | memoryview, extended: bool = False) -> ReplyHeader:
    """Decode a whole reply header (size given by :func:`reply_header_size`).

    With ``extended`` negotiated only extended headers are legal; without it, extended
    headers are a protocol error.
    """
    (magic,) = MAGIC.unpack_from(data)
    if magic == SIMPLE_REPLY_MAGIC and not extended:
        _, error, cookie = SIMPLE_REPLY.unpack(data)
        return ReplyHeader(magic, ReplyFlag.DONE, ReplyType.NONE, cookie, 0, error)
    if magic == STRUCTURED_REPLY_MAGIC and not extended:
        _, flags, rtype, cookie, length = STRUCTURED_REPLY.unpack(data)
        return ReplyHeader(magic, flags, rtype, cookie, length)
    if magic == EXTENDED_REPLY_MAGIC and extended:
        _, flags, rtype, cookie, offset, length = EXTENDED_REPLY.unpack(data)
        return ReplyHeader(magic, flags, rtype, cookie, length, 0, offset)
    raise RemoteProtocolError(f"unexpected reply magic {magic:#x} (extended={extended})")


def parse_offset_data(payload: bytes | memoryview) -> tuple[int, memoryview]:
    """OFFSET_DATA -> (offset, data view)."""
    if len(payload) <= 8:
        raise RemoteProtocolError("OFFSET_DATA chunk without data")
    (offset,) = U64.unpack_from(payload)
    return offset, memoryview(payload)[8:]


def parse_offset_hole(
    payload: bytes | memoryview, rtype: int = ReplyType.OFFSET_HOLE
) -> tuple[int, int]:
    """OFFSET_HOLE (64-bit offset, 32-bit length) -> (offset, length)."""
    codec = OFFSET_HOLE_EXT if rtype == OFFSET_HOLE_EXT_TYPE else OFFSET_HOLE
    if len(payload) != codec.size:
        raise RemoteProtocolError("OFFSET_HOLE chunk has the wrong length")
    offset, length = codec.unpack(payload)
    if length == 0:
        raise RemoteProtocolError("OFFSET_HOLE of length 0")
    return offset, length


Extents = list[tuple[int, int]]  # (length, flags)


def parse_block_status(payload: bytes | memoryview, rtype: int) -> tuple[int, Extents]:
    """BLOCK_STATUS or BLOCK_STATUS_EXT -> (context id, [(length, flags), ...])."""
    if rtype == ReplyType.BLOCK_STATUS:
        n = len(payload) - 4
        if n < BS_EXTENT.size or n % BS_EXTENT.size:
            raise RemoteProtocolError("BLOCK_STATUS chunk has a bad length")
        (ctx,) = U32.unpack_from(payload)
        return ctx, [BS_EXTENT.unpack_from(payload, off) for off in range(4, len(payload), 8)]
    if rtype == ReplyType.BLOCK_STATUS_EXT:
        n = len(payload) - BS_EXT_HEADER.size
        if n < BS_EXT_EXTENT.size or n % BS_EXT_EXTENT.size:
            raise RemoteProtocolError("BLOCK_STATUS_EXT chunk has a bad length")
        ctx, count = BS_EXT_HEADER.unpack_from(payload)
        if count * BS_EXT_EXTENT.size != n:
            raise RemoteProtocolError("BLOCK_STATUS_EXT count disagrees with its length")
        return ctx, [BS_EXT_EXTENT.unpack_from(payload, off) for off in range(8, len(payload), 16)]
    raise RemoteProtocolError(f"not a block status chunk: {rtype}")


def check_extents(extents: Extents, length: int, req_one: bool) -> None:
    """What the spec requires of one context's extents for a request of ``length``.

    Every extent is non-empty and only the last may run past the request; with REQ_ONE
    there is exactly one extent and it does not run past the request.
    """
    if not extents:
        raise RemoteProtocolError("block status without extents")
    if req_one and (len(extents) != 1 or extents[0][0] > length):
        raise RemoteProtocolError("REQ_ONE block status must be one extent within the request")
    pos = 0
    for n, _ in extents:
        if n == 0:
            raise RemoteProtocolError("block status extent of length 0")
        if pos >= length:
            raise RemoteProtocolError("block status extents run past the request")
        pos += n


def parse_error_chunk(payload: bytes | memoryview, rtype: int) -> tuple[int, str, int | None]:
    """ERROR / ERROR_OFFSET -> (errno, message, offset or None)."""
    if len(payload) < ERROR_CHUNK.size:
        raise RemoteProtocolError("error chunk too short")
    code, msglen = ERROR_CHUNK.unpack_from(payload)
    end = ERROR_CHUNK.size + msglen
    if rtype == ReplyType.ERROR_OFFSET:
        if len(payload) != end + 8:
            raise RemoteProtocolError("ERROR_OFFSET chunk has the wrong length")
        (offset,) = U64.unpack_from(payload, end)
    else:
        if len(payload) != end:
            raise RemoteProtocolError("ERROR chunk has the wrong length")
        offset = None
    if code == 0:
        raise RemoteProtocolError("error chunk with error 0")
    return code, bytes(payload[ERROR_CHUNK.size : end]).decode(errors="replace"), offset


def remote_error(code: int, message: str = "") -> RemoteError:
    """The exception for an NBD error reply (the server's message appended, if any)."""
    base = RemoteError(code)
    return RemoteError(code, f"{base}: {message}") if message else base


def is_error_type(rtype: int) -> bool:
    return bool(rtype & (1 << 15))


class ReadAssembler:
    """Collects the chunks of one structured READ reply into a buffer.

    Checks what the spec requires of a server: every chunk inside the request, no
    overlap, the whole range covered when the reply is done and had no error.
    """

    __slots__ = ("offset", "length", "buf", "_runs", "error")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        self.buf = bytearray(length)
        self._runs: list[tuple[int, int]] = []
        self.error: RemoteError | None = None

    def _claim(self, offset: int, length: int) -> int:
        start = offset - self.offset
        if start < 0 or start + length > self.length:
            raise RemoteProtocolError(
                f"chunk {offset}+{length} outside request {self.offset}+{self.length}"
            )
        self._runs.append((start, length))
        return start

    def data(self, offset: int, data: memoryview | bytes) -> None:
        start = self._claim(offset, len(data))
        self.buf[start : start + len(data)] = data

    def hole(self, offset: int, length: int) -> None:
        self._claim(offset, length)  # the buffer is already zero

    def fail(self, code: int, message: str) -> None:
        if self.error is None:
            self.error = remote_error(code, message)

    def finish(self) -> bytearray:
        if self.error is not None:
            raise self.error
        pos = 0
        for start, length in sorted(self._runs):
            if start != pos:
                what = "overlap" if start < pos else "gap"
                raise RemoteProtocolError(
                    f"structured read reply has a {what} at {self.offset + pos}"
                )
            pos = start + length
        if pos != self.length:
            raise RemoteProtocolError("structured read reply does not cover the request")
        return self.buf
