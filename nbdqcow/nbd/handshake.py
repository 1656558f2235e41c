"""Fixed-newstyle NBD handshake, server side, as a sans-I/O state machine.

``ServerHandshake.start()`` gives the greeting; ``receive(data)`` takes whatever bytes
arrived and returns the bytes to send back.  When ``done`` is true the connection
enters transmission with the parameters in ``result`` (bytes that arrived after the
last option are in ``leftover``); when ``closed`` is true the server sends what
``receive`` returned and closes the connection.

Options: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT,
SET_META_CONTEXT, EXTENDED_HEADERS; anything else -> ERR_UNSUP.

TLS: without it, STARTTLS gets ERR_POLICY (``TLS not configured``).  With ``tls=True``
every option but STARTTLS and ABORT gets ERR_TLS_REQD until STARTTLS (EXPORT_NAME, which
cannot be answered with an error, closes); STARTTLS is acknowledged and ``starttls``
becomes true: the caller runs the TLS handshake on the bytes that follow (``leftover``
holds any that already arrived) and then calls :meth:`ServerHandshake.tls_started`;
negotiation starts over inside TLS (nothing chosen before carries over).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nbdqcow.nbd import wire
from nbdqcow.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MAX_STRING,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)

#: option payloads larger than this are skipped (not buffered) and refused
OPTION_BUFFER_LIMIT = 1 << 20

_KNOWN_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
#: options a server that requires TLS answers before STARTTLS
_BEFORE_TLS = (Opt.STARTTLS, Opt.ABORT)


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    flags: int  # transmission flags (HAS_FLAGS included)
    description: str = ""
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = MAX_PAYLOAD
    contexts: tuple[str, ...] = (BASE_ALLOCATION,)

    def context_id(self, name: str) -> int:
        """Stable id of a metadata context of this export (1-based)."""
        return self.contexts.index(name) + 1


@dataclass
class Negotiated:
    """The outcome of a successful handshake."""

    export: ExportInfo
    structured: bool = False
    extended: bool = False
    no_zeroes: bool = False
    #: selected metadata contexts, id -> name, in selection order
    contexts: dict[int, str] = field(default_factory=dict)


class _Bad(Exception):
    """Malformed option payload: answer ERR_INVALID."""


class ServerHandshake:
    """Server side of the fixed-newstyle negotiation."""

    def __init__(
        self,
        exports: Sequence[ExportInfo] | Callable[[], Sequence[ExportInfo]],
        *,
        allow_extended: bool = True,
        lookup: Callable[[str], ExportInfo | None] | None = None,
        tls: bool = False,
    ) -> None:
        self._exports = exports
        self._lookup = lookup
        self.allow_extended = allow_extended
        self.tls = tls
        self.tls_active = False
        self.starttls = False  # STARTTLS acknowledged: the TLS handshake comes next
        self._buf = bytearray()
        self._state = "flags"
        self._option = 0
        self._need = 4
        self._skip_left = 0
        self.client_flags = 0
        self.structured = False
        self.extended = False
        self._meta_export: str | None = None
        self._meta: dict[int, str] = {}
        self.result: Negotiated | None = None
        self.leftover = b""
        self.done = False
        self.closed = False
        self.close_reason = ""
        self._out: list[bytes] = []
        self._handlers: dict[int, Callable[[bytes], None]] = {
            Opt.EXPORT_NAME: self._opt_export_name,
            Opt.ABORT: self._opt_abort,
            Opt.LIST: self._opt_list,
            Opt.STARTTLS: self._opt_starttls,
            Opt.INFO: self._opt_info,
            Opt.GO: self._opt_go,
            Opt.STRUCTURED_REPLY: self._opt_structured_reply,
            Opt.LIST_META_CONTEXT: self._opt_list_meta_context,
            Opt.SET_META_CONTEXT: self._opt_set_meta_context,
            Opt.EXTENDED_HEADERS: self._opt_extended_headers,
        }

    # --- exports ----------------------------------------------------------------------------
    def exports(self) -> Sequence[ExportInfo]:
        ex = self._exports
        return ex() if callable(ex) else ex

    def lookup(self, name: str) -> ExportInfo | None:
        """The export called ``name``; the empty name selects the default (first) export,
        unless the server decides (``lookup``: several exports, a configured default)."""
        if self._lookup is not None:
            return self._lookup(name)
        exports = self.exports()
        for e in exports:
            if e.name == name:
                return e
        if name == "" and exports:
            return exports[0]
        return None

    # --- driving ----------------------------------------------------------------------------
    def start(self) -> bytes:
        """The server greeting (first bytes on the wire)."""
        return wire.pack_greeting(int(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))

    def receive(self, data: bytes | bytearray | memoryview) -> bytes:
        """Consume client bytes; return the bytes to send."""
        if self.done or self.closed or self.starttls:
            self.leftover += bytes(data)
            return b""
        self._buf += data
        while not (self.done or self.closed or self.starttls):
            if self._state == "skip":
                n = min(len(self._buf), self._skip_left)
                del self._buf[:n]
                self._skip_left -= n
                if self._skip_left:
                    break
                self._skipped()
                continue
            if len(self._buf) < self._need:
                break
            chunk = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            self._step(chunk)
        if self.done or self.starttls:
            self.leftover = bytes(self._buf)
            self._buf.clear()
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The TLS handshake succeeded: negotiate again, from a clean state."""
        self.starttls = False
        self.tls_active = True
        self.leftover = b""
        self.structured = False
        self.extended = False
        self._meta.clear()
        self._meta_export = None
        self._expect_option()

    def _close(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason

    def _step(self, chunk: bytes) -> None:
        state = self._state
        if state == "flags":
            (flags,) = wire.CLIENT_FLAGS.unpack(chunk)
            if flags & ~_KNOWN_CLIENT_FLAGS:
                self._close(f"unknown client flags {flags:#x}")
                return
            self.client_flags = flags
            self._expect_option()
        elif state == "header":
            magic, option, length = wire.OPTION_REQUEST.unpack(chunk)
            if magic != IHAVEOPT:
                self._close("bad option magic")
                return
            self._option = option
            if length > MAX_OPTION_LENGTH:
                self._close(f"option length {length} too large")
            elif length > OPTION_BUFFER_LIMIT:
                self._state, self._skip_left = "skip", length
            elif length == 0:
                self._dispatch(b"")
            else:
                self._state, self._need = "data", length
        elif state == "data":
            self._dispatch(chunk)

    def _expect_option(self) -> None:
        self._state, self._need = "header", wire.OPTION_REQUEST_SIZE

    def _skipped(self) -> None:
        known = self._option in self._handlers
        self._reply(Rep.ERR_TOO_BIG if known else Rep.ERR_UNSUP)
        self._expect_option()

    def _dispatch(self, data: bytes) -> None:
        self._expect_option()
        if self.tls and not self.tls_active and self._option not in _BEFORE_TLS:
            if self._option == Opt.EXPORT_NAME:
                self._close("option NBD_OPT_EXPORT_NAME not permitted before TLS")
                return
            self._reply(Rep.ERR_TLS_REQD,
                        f"Option {self._option:#x} not permitted before TLS".encode())
            return
        handler = self._handlers.get(self._option)
        if handler is None:
            self._reply(Rep.ERR_UNSUP)
            return
        try:
            handler(data)
        except _Bad as e:
            self._reply(Rep.ERR_INVALID, str(e).encode())

    def _reply(self, rep: int, data: bytes = b"") -> None:
        self._out.append(wire.pack_option_reply(self._option, rep, data))

    # --- option handlers --------------------------------------------------------------------
    def _opt_export_name(self, data: bytes) -> None:
        export = self.lookup(data.decode("utf-8", "replace"))
        if export is None:
            self._close("unknown export requested with NBD_OPT_EXPORT_NAME")
            return
        self._out.append(wire.EXPORT_NAME_REPLY.pack(export.size, self._flags(export)))
        if not self.client_flags & ClientFlag.NO_ZEROES:
            self._out.append(bytes(wire.EXPORT_NAME_PADDING))
        self._finish(export, keep_meta=False)

    def _flags(self, export: ExportInfo) -> int:
        """The export's transmission flags for this connection: SEND_DF only once
        structured replies are negotiated (the spec's MUST)."""
        if self.structured:
            return export.flags
        return export.flags & ~int(TransmissionFlag.SEND_DF)

    def _opt_abort(self, data: bytes) -> None:
        self._reply(Rep.ACK)
        self._close("client aborted the negotiation")

    def _opt_starttls(self, data: bytes) -> None:
        if not self.tls:
            self._reply(Rep.ERR_POLICY, b"TLS not configured")
        elif self.tls_active:
            self._reply(Rep.ERR_INVALID, b"TLS already enabled")
        elif data:
            raise _Bad("NBD_OPT_STARTTLS takes no data")
        else:
            self._reply(Rep.ACK)
            self.starttls = True

    def _opt_list(self, data: bytes) -> None:
        if data:
            raise _Bad("NBD_OPT_LIST takes no data")
        for e in self.exports():
            name = e.name.encode()
            self._reply(Rep.SERVER, wire.pack_string(name) + e.description.encode())
        self._reply(Rep.ACK)

    def _opt_structured_reply(self, data: bytes) -> None:
        if data:
            raise _Bad("NBD_OPT_STRUCTURED_REPLY takes no data")
        if self.extended:
            raise _Bad("extended headers already negotiated")
        self.structured = True
        self._reply(Rep.ACK)

    def _opt_extended_headers(self, data: bytes) -> None:
        if not self.allow_extended:
            self._reply(Rep.ERR_UNSUP)
            return
        if data:
            raise _Bad("NBD_OPT_EXTENDED_HEADERS takes no data")
        self.extended = True
        self.structured = True
        self._meta.clear()
        self._meta_export = None
        self._reply(Rep.ACK)

    def _opt_info(self, data: bytes) -> None:
        self._info_or_go(data, go=False)

    def _opt_go(self, data: bytes) -> None:
        self._info_or_go(data, go=True)

    def _info_or_go(self, data: bytes, go: bool) -> None:
        name, pos = _take_string(data, 0)
        if pos + 2 > len(data):
            raise _Bad("truncated information request list")
        (count,) = wire.INFO_REQUEST_COUNT.unpack_from(data, pos)
        pos += 2
        if pos + 2 * count != len(data):
            raise _Bad("information request list does not match the option length")
        wanted = {wire.U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)}
        export = self.lookup(name)
        if export is None:
            self._reply(Rep.ERR_UNKNOWN, f"export '{name}' not present".encode())
            return
        flags = self._flags(export)
        self._reply(Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, export.size, flags))
        if Info.NAME in wanted:
            self._reply(Rep.INFO, wire.INFO_TYPE.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in wanted and export.description:
            desc = export.description.encode()
            self._reply(Rep.INFO, wire.INFO_TYPE.pack(Info.DESCRIPTION) + desc)
        # A client that did not ask for block sizes may send requests of any alignment
        # (every driver takes them, by read-modify-write): GO tells it the default
        # minimum of 1; INFO, which commits to nothing, states the real minimum and
        # asks for the request (NBD_REP_ERR_BLOCK_SIZE_REQD), as qemu-nbd does.
        asked = Info.BLOCK_SIZE in wanted
        minimum = export.min_block if asked or not go else 1
        self._reply(
            Rep.INFO,
            wire.INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, minimum, export.pref_block, export.max_block
            ),
        )
        if not asked and not go and export.min_block > 1:
            self._reply(Rep.ERR_BLOCK_SIZE_REQD,
                        b"request NBD_INFO_BLOCK_SIZE to use this export")
            return
        self._reply(Rep.ACK)
        if go:
            self._finish(export, keep_meta=self._meta_export == export.name)

    def _finish(self, export: ExportInfo, keep_meta: bool) -> None:
        contexts = dict(self._meta) if keep_meta else {}
        self.result = Negotiated(
            export=export,
            structured=self.structured,
            extended=self.extended,
            no_zeroes=bool(self.client_flags & ClientFlag.NO_ZEROES),
            contexts=contexts,
        )
        self.done = True

    # --- metadata contexts ------------------------------------------------------------------
    def _parse_meta(self, data: bytes) -> tuple[ExportInfo | None, str, list[str]]:
        name, pos = _take_string(data, 0)
        if pos + 4 > len(data):
            raise _Bad("truncated query count")
        (count,) = wire.U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            q, pos = _take_string(data, pos)
            queries.append(q)
        if pos != len(data):
            raise _Bad("query list does not match the option length")
        return self.lookup(name), name, queries

    def _opt_list_meta_context(self, data: bytes) -> None:
        export, name, queries = self._parse_meta(data)
        if export is None:
            self._reply(Rep.ERR_UNKNOWN, f"export '{name}' not present".encode())
            return
        for ctx in _match(export, queries, listing=True):
            self._reply_context(export, ctx)
        self._reply(Rep.ACK)

    def _opt_set_meta_context(self, data: bytes) -> None:
        if not self.structured:
            raise _Bad("structured replies must be negotiated first")
        export, name, queries = self._parse_meta(data)
        self._meta.clear()
        self._meta_export = None
        if export is None:
            self._reply(Rep.ERR_UNKNOWN, f"export '{name}' not present".encode())
            return
        for ctx in _match(export, queries, listing=False):
            self._meta[export.context_id(ctx)] = ctx
            self._reply_context(export, ctx)
        self._meta_export = export.name
        self._reply(Rep.ACK)

    def _reply_context(self, export: ExportInfo, ctx: str) -> None:
        payload = wire.META_CONTEXT_ID.pack(export.context_id(ctx)) + ctx.encode()
        self._reply(Rep.META_CONTEXT, payload)


def _take_string(data: bytes, pos: int) -> tuple[str, int]:
    """A 32-bit length-prefixed UTF-8 string at ``pos``; returns it and the next position."""
    if pos + 4 > len(data):
        raise _Bad("truncated string length")
    (n,) = wire.STRING_LENGTH.unpack_from(data, pos)
    pos += 4
    if n > MAX_STRING:
        raise _Bad("string too long")
    if pos + n > len(data):
        raise _Bad("truncated string")
    try:
        s = data[pos : pos + n].decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("string is not UTF-8") from None
    return s, pos + n


def _match(export: ExportInfo, queries: list[str], listing: bool) -> list[str]:
    """Contexts of ``export`` selected by ``queries`` (namespace wildcards only in LIST)."""
    if not queries:
        return list(export.contexts) if listing else []
    out: list[str] = []
    for q in queries:
        for ctx in export.contexts:
            hit = q == ctx or (listing and q.endswith(":") and ctx.startswith(q))
            if hit and ctx not in out:
                out.append(ctx)
    return out
