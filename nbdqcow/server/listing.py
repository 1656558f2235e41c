"""``-L/--list``: a tiny synchronous client that lists a server's exports (like qemu-nbd -L)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nbdqcow.errors import RemoteProtocolError
from nbdqcow.nbd import wire
from nbdqcow.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)


@dataclass
class ListedExport:
    name: str
    description: str = ""
    size: int | None = None
    flags: int = 0
    block_sizes: tuple[int, int, int] | None = None
    contexts: list[str] = field(default_factory=list)


class _Conn(Protocol):
    def recv(self, n: int, /) -> bytes: ...

    def sendall(self, data: bytes, /) -> Any: ...


def _recv_exact(sock: _Conn, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise RemoteProtocolError("server closed the connection")
        out += chunk
    return bytes(out)


def _option(sock: _Conn, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send an option; collect replies up to ACK or an error."""
    sock.sendall(wire.pack_option_request(opt, data))
    replies = []
    while True:
        magic, ropt, rtype, length = wire.OPTION_REPLY.unpack(
            _recv_exact(sock, wire.OPTION_REPLY_SIZE)
        )
        if magic != OPTION_REPLY_MAGIC or ropt != opt:
            raise RemoteProtocolError("bad option reply")
        payload = _recv_exact(sock, length) if length else b""
        replies.append((rtype, payload))
        if rtype == Rep.ACK or rtype & (1 << 31):
            return replies


def list_exports(sock: socket.socket,
                 starttls: Callable[[socket.socket], _Conn] | None = None
                 ) -> list[ListedExport]:
    """``starttls``: with TLS credentials, turns the socket into a TLS connection after
    the server acknowledged NBD_OPT_STARTTLS."""
    magic, ihaveopt, hflags = wire.SERVER_GREETING.unpack(_recv_exact(sock, wire.GREETING_SIZE))
    if magic != NBDMAGIC or ihaveopt != IHAVEOPT:
        raise RemoteProtocolError("not a newstyle NBD server")
    sock.sendall(wire.CLIENT_FLAGS.pack(int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
                                        & hflags))
    conn: _Conn = sock
    if starttls is not None:
        rtype, payload = _option(sock, Opt.STARTTLS)[-1]
        if rtype != Rep.ACK:
            raise RemoteProtocolError(f"the server refused STARTTLS: {payload.decode(errors='replace')}")
        conn = starttls(sock)
    return _list(conn)


def _list(sock: _Conn) -> list[ListedExport]:
    # as qemu-nbd -L: structured replies first, so the listed flags include DF
    _option(sock, Opt.STRUCTURED_REPLY)
    exports: list[ListedExport] = []
    for rtype, payload in _option(sock, Opt.LIST):
        if rtype == Rep.SERVER:
            (n,) = wire.STRING_LENGTH.unpack_from(payload)
            name = payload[4 : 4 + n].decode()
            exports.append(ListedExport(name, payload[4 + n :].decode()))
        elif rtype == Rep.ERR_TLS_REQD:
            raise RemoteProtocolError("the server requires TLS (--tls-creds)")
        elif rtype != Rep.ACK:
            raise RemoteProtocolError(f"NBD_OPT_LIST failed ({rtype:#x})")
    for ex in exports:
        bname = ex.name.encode()
        reqs = [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]
        data = wire.pack_string(bname) + wire.U16.pack(len(reqs))
        data += b"".join(wire.U16.pack(r) for r in reqs)
        for rtype, payload in _option(sock, Opt.INFO, data):
            if rtype != Rep.INFO:
                continue
            (itype,) = wire.INFO_TYPE.unpack_from(payload)
            if itype == Info.EXPORT:
                _, ex.size, ex.flags = wire.INFO_EXPORT.unpack(payload)
            elif itype == Info.BLOCK_SIZE:
                _, a, b, c = wire.INFO_BLOCK_SIZE.unpack(payload)
                ex.block_sizes = (a, b, c)
        query = wire.pack_string(bname) + wire.U32.pack(0)
        for rtype, payload in _option(sock, Opt.LIST_META_CONTEXT, query):
            if rtype == Rep.META_CONTEXT:
                ex.contexts.append(payload[4:].decode())
    sock.sendall(wire.pack_option_request(Opt.ABORT))
    return exports


_FLAG_NAMES = [
    (TransmissionFlag.READ_ONLY, "readonly"),
    (TransmissionFlag.SEND_FLUSH, "flush"),
    (TransmissionFlag.SEND_FUA, "fua"),
    (TransmissionFlag.ROTATIONAL, "rotational"),
    (TransmissionFlag.SEND_TRIM, "trim"),
    (TransmissionFlag.SEND_WRITE_ZEROES, "zeroes"),
    (TransmissionFlag.SEND_DF, "df"),
    (TransmissionFlag.CAN_MULTI_CONN, "multi"),
    (TransmissionFlag.SEND_RESIZE, "resize"),
    (TransmissionFlag.SEND_CACHE, "cache"),
    (TransmissionFlag.SEND_FAST_ZERO, "fast-zero"),
]


def format_listing(exports: list[ListedExport]) -> str:
    """The same layout as ``qemu-nbd -L``."""
    lines = [f"exports available: {len(exports)}"]
    for ex in exports:
        lines.append(f" export: '{ex.name}'")
        if ex.description:
            lines.append(f"  description: {ex.description}")
        if ex.size is not None:
            lines.append(f"  size:  {ex.size}")
            names = " ".join(n for bit, n in _FLAG_NAMES if ex.flags & bit)
            lines.append(f"  flags: {ex.flags:#x} ( {names} )")
        if ex.block_sizes:
            lines.append(f"  min block: {ex.block_sizes[0]}")
            lines.append(f"  opt block: {ex.block_sizes[1]}")
            lines.append(f"  max block: {ex.block_sizes[2]}")
        lines.append(f"  available meta contexts: {len(ex.contexts)}")
        lines.extend(f"   {c}" for c in ex.contexts)
    return "\n".join(lines)
