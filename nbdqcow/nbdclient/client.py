"""An asyncio NBD client: fixed newstyle handshake, GO with block sizes, structured
replies, meta contexts, optional extended headers, every transmission command, many
requests in flight matched by cookie.

The protocol itself (encoding and decoding) is in :mod:`nbdqcow.nbd.client`; this
module only moves bytes and keeps track of requests.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Sequence
from types import TracebackType

from nbdqcow.errors import RemoteError, RemoteProtocolError
from nbdqcow.nbd import client as codec
from nbdqcow.nbd.constants import (
    BASE_ALLOCATION,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from nbdqcow.nbdclient.uri import NbdAddress, parse_uri

STREAM_LIMIT = 8 * 1024 * 1024  # reader buffer before the transport is paused
MAX_OPTION_REPLY = 16 * 1024 * 1024  # refuse absurd option replies
MAX_CHUNK = 64 * 1024 * 1024  # refuse absurd reply chunks

Extents = codec.Extents


class _Pending:
    """One request waiting for its reply."""

    __slots__ = (
        "cmd",
        "flags",
        "offset",
        "length",
        "future",
        "assembler",
        "extents",
        "error",
        "data",
    )

    def __init__(
        self, cmd: int, flags: int, offset: int, length: int, future: asyncio.Future[object]
    ) -> None:
        self.cmd = cmd
        self.flags = flags
        self.offset = offset
        self.length = length
        self.future = future
        self.assembler: codec.ReadAssembler | None = None
        self.extents: dict[int, Extents] | None = None
        self.error: RemoteError | None = None
        self.data: bytes | bytearray | None = None


class Client:
    """A connected NBD client in the transmission phase.  Create with :func:`connect`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._cookies = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None
        self._disconnecting = False
        self.server_flags = HandshakeFlag(0)
        self.export_name = ""
        self.description = ""
        self.size = 0
        self.flags = TransmissionFlag(0)
        self.block_sizes: codec.BlockSizes | None = None
        self.structured = False
        self.extended = False
        self.contexts: dict[str, int] = {}
        self._context_names: dict[int, str] = {}

    # --- handshake ---------------------------------------------------------------------
    async def _greet(self) -> None:
        greeting = await self._reader.readexactly(codec.GREETING_SIZE)
        self.server_flags = codec.parse_greeting(greeting)
        self._writer.write(codec.build_client_flags(codec.client_flags(self.server_flags)))

    async def option(self, option: Opt | int, payload: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; return every (reply type, payload) up to the final one.

        The final reply is ACK or an error; errors are returned, not raised.
        """
        self._writer.write(codec.build_option(option, payload))
        await self._writer.drain()
        replies: list[tuple[int, bytes]] = []
        while True:
            head = codec.parse_option_reply_header(
                await self._reader.readexactly(codec.OPTION_REPLY_HEADER.size)
            )
            if head.option != int(option):
                raise RemoteProtocolError(f"reply to option {head.option}, expected {int(option)}")
            if head.length > MAX_OPTION_REPLY:
                raise RemoteProtocolError(f"option reply of {head.length} bytes")
            data = await self._reader.readexactly(head.length) if head.length else b""
            replies.append((head.reply, data))
            if head.reply == Rep.ACK or head.is_error:
                return replies

    async def _starttls(self, addr: NbdAddress) -> None:
        """NBD_OPT_STARTTLS, then the TLS handshake; later options go encrypted."""
        from nbdqcow.tls.client import uri_session
        from nbdqcow.tls.layer import upgrade_streams

        replies = await self.option(Opt.STARTTLS)
        reply, data = replies[-1]
        if reply != Rep.ACK:
            raise codec.option_error(codec.OptionReply(Opt.STARTTLS, reply, len(data)), data)
        session = uri_session(certificates=addr.tls_certificates, psk_file=addr.tls_psk_file,
                              username=addr.tls_username, verify_peer=addr.tls_verify_peer,
                              hostname=addr.host)
        self._reader, self._writer = await upgrade_streams(self._reader, self._writer,
                                                           session, STREAM_LIMIT)

    @staticmethod
    def _check(option: Opt, replies: list[tuple[int, bytes]]) -> None:
        reply, data = replies[-1]
        if reply != Rep.ACK:
            raise codec.option_error(codec.OptionReply(option, reply, len(data)), data)

    async def _negotiate_headers(self, structured: bool, extended: bool) -> None:
        if extended:
            replies = await self.option(Opt.EXTENDED_HEADERS)
            if replies[-1][0] == Rep.ACK:
                self.extended = self.structured = True
                return
        if structured:
            replies = await self.option(Opt.STRUCTURED_REPLY)
            self.structured = replies[-1][0] == Rep.ACK

    async def _set_meta_contexts(self, export: str, queries: Sequence[str]) -> None:
        replies = await self.option(
            Opt.SET_META_CONTEXT, codec.meta_context_payload(export, queries)
        )
        self._check(Opt.SET_META_CONTEXT, replies)
        for reply, data in replies[:-1]:
            if reply == Rep.META_CONTEXT:
                ctx_id, name = codec.parse_meta_context(data)
                self.contexts[name] = ctx_id
                self._context_names[ctx_id] = name

    async def _go(self, export: str) -> None:
        payload = codec.info_request_payload(export, (Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION))
        replies = await self.option(Opt.GO, payload)
        if replies[-1][0] == Rep.ERR_UNSUP:
            await self._export_name(export)
            return
        self._check(Opt.GO, replies)
        got_export = False
        for reply, data in replies[:-1]:
            if reply != Rep.INFO:
                continue
            kind, value = codec.parse_info(data)
            if isinstance(value, codec.ExportInfo):
                self.size, self.flags = value
                got_export = True
            elif isinstance(value, codec.BlockSizes):
                self.block_sizes = value
            elif kind == Info.NAME and isinstance(value, str):
                self.export_name = value
            elif kind == Info.DESCRIPTION and isinstance(value, str):
                self.description = value
        if not got_export:
            raise RemoteProtocolError("GO acknowledged without NBD_INFO_EXPORT")

    async def _export_name(self, export: str) -> None:
        self._writer.write(codec.build_export_name(export))
        await self._writer.drain()
        n = codec.EXPORT_NAME_REPLY.size
        if not self.server_flags & HandshakeFlag.NO_ZEROES:
            n += codec.EXPORT_NAME_PADDING
        self.size, self.flags = codec.parse_export_name_reply(await self._reader.readexactly(n))

    def _start(self) -> None:
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    # --- transmission: replies ---------------------------------------------------------
    async def _read_loop(self) -> None:
        reader = self._reader
        prefix_size = codec.EXTENDED_REPLY.size if self.extended else codec.REPLY_PREFIX_SIZE
        try:
            while True:
                try:
                    head = await reader.readexactly(prefix_size)
                except asyncio.IncompleteReadError as e:
                    if not e.partial and not self._pending:
                        raise ConnectionResetError("server closed the connection") from None
                    raise
                size = codec.reply_header_size(head)
                if size > len(head):
                    head += await reader.readexactly(size - len(head))
                h = codec.parse_reply_header(head, self.extended)
                p = self._pending.get(h.cookie)
                if p is None:
                    raise RemoteProtocolError(f"reply for unknown cookie {h.cookie}")
                if h.simple:
                    if h.error:
                        p.error = codec.remote_error(h.error)
                    elif p.cmd == Cmd.READ:
                        if self.structured:  # the data length would be a guess
                            raise RemoteProtocolError("simple reply with data to a READ")
                        p.data = await reader.readexactly(p.length)
                    self._complete(h.cookie, p)
                    continue
                if h.length > MAX_CHUNK:
                    raise RemoteProtocolError(f"reply chunk of {h.length} bytes")
                payload = await reader.readexactly(h.length) if h.length else b""
                self._chunk(p, h.type, payload)
                if h.done:
                    self._complete(h.cookie, p)
        except asyncio.CancelledError:
            self._fail_all(ConnectionAbortedError("client closed"))
            raise
        except (OSError, EOFError, asyncio.IncompleteReadError, RemoteProtocolError) as e:
            exc: BaseException = e
            if isinstance(e, asyncio.IncompleteReadError):
                exc = ConnectionResetError("server closed the connection mid-reply")
            self._fail_all(exc)

    def _chunk(self, p: _Pending, rtype: int, payload: bytes) -> None:
        if (
            rtype == ReplyType.OFFSET_DATA
            or rtype == ReplyType.OFFSET_HOLE
            or (rtype == codec.OFFSET_HOLE_EXT_TYPE)
        ):
            if p.assembler is None:
                raise RemoteProtocolError(f"read chunk in reply to command {p.cmd}")
            if rtype == ReplyType.OFFSET_DATA:
                off, data = codec.parse_offset_data(payload)
                p.assembler.data(off, data)
            else:
                p.assembler.hole(*codec.parse_offset_hole(payload, rtype))
        elif rtype == ReplyType.BLOCK_STATUS or rtype == ReplyType.BLOCK_STATUS_EXT:
            if p.extents is None:
                raise RemoteProtocolError(f"block status chunk in reply to command {p.cmd}")
            if (rtype == ReplyType.BLOCK_STATUS_EXT) != self.extended:
                raise RemoteProtocolError("block status chunk type does not match header style")
            ctx, extents = codec.parse_block_status(payload, rtype)
            if ctx not in self._context_names or ctx in p.extents:
                raise RemoteProtocolError(f"block status for unexpected context {ctx}")
            p.extents[ctx] = extents
        elif codec.is_error_type(rtype):
            code, message, _ = codec.parse_error_chunk(payload, rtype)
            if p.assembler is not None:
                p.assembler.fail(code, message)
            if p.error is None:
                p.error = codec.remote_error(code, message)
        elif rtype != ReplyType.NONE:
            raise RemoteProtocolError(f"unknown reply chunk type {rtype}")

    def _complete(self, cookie: int, p: _Pending) -> None:
        del self._pending[cookie]
        if p.future.done():
            return
        if p.error is not None:
            p.future.set_exception(p.error)
            return
        try:
            if p.assembler is not None:
                p.future.set_result(p.assembler.finish())
            elif p.extents is not None:
                req_one = bool(p.flags & CmdFlag.REQ_ONE)
                for extents in p.extents.values():
                    codec.check_extents(extents, p.length, req_one)
                p.future.set_result(p.extents)
            else:
                p.future.set_result(p.data if p.extents is None else p.extents)
        except RemoteProtocolError as e:
            p.future.set_exception(e)

    def _fail_all(self, exc: BaseException) -> None:
        self._dead = exc
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(exc)
        self._pending.clear()

    # --- transmission: requests --------------------------------------------------------
    def _send(
        self,
        cmd: int,
        flags: int,
        offset: int,
        length: int,
        payload: bytes | bytearray | memoryview | None,
    ) -> _Pending:
        if self._dead is not None:
            raise ConnectionResetError(f"connection is gone: {self._dead}")
        if self._disconnecting:
            raise ConnectionAbortedError("disconnect in progress")
        cookie = next(self._cookies)
        p = _Pending(cmd, flags, offset, length, asyncio.get_running_loop().create_future())
        if cmd == Cmd.READ and self.structured:
            p.assembler = codec.ReadAssembler(offset, length)
        elif cmd == Cmd.BLOCK_STATUS:
            p.extents = {}
        self._pending[cookie] = p
        self._writer.write(codec.build_request(cmd, flags, cookie, offset, length, self.extended))
        if payload is not None:
            self._writer.write(payload)
        return p

    async def request(
        self,
        cmd: Cmd | int,
        offset: int = 0,
        length: int = 0,
        flags: CmdFlag | int = 0,
        payload: bytes | bytearray | memoryview | None = None,
    ) -> object:
        """Send any request (flags unchecked) and wait for its reply.

        Returns the data of a READ, the extents {context id: [(length, flags)]} of a
        BLOCK_STATUS, else None; raises :class:`RemoteError` on an error reply.
        """
        p = self._send(int(cmd), int(flags), offset, length, payload)
        await self._writer.drain()
        return await p.future

    async def pread(self, offset: int, length: int, flags: CmdFlag | int = 0) -> bytes | bytearray:
        data = await self.request(Cmd.READ, offset, length, flags)
        assert isinstance(data, bytes | bytearray)
        return data

    async def pwrite(
        self,
        data: bytes | bytearray | memoryview,
        offset: int,
        fua: bool = False,
        flags: CmdFlag | int = 0,
    ) -> None:
        flags = int(flags) | (CmdFlag.FUA if fua else 0)
        await self.request(Cmd.WRITE, offset, len(data), flags, data)

    async def flush(self) -> None:
        await self.request(Cmd.FLUSH)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.request(Cmd.TRIM, offset, length, CmdFlag.FUA if fua else 0)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        no_hole: bool = False,
        fast_zero: bool = False,
        fua: bool = False,
    ) -> None:
        flags = (
            (CmdFlag.NO_HOLE if no_hole else 0)
            | (CmdFlag.FAST_ZERO if fast_zero else 0)
            | (CmdFlag.FUA if fua else 0)
        )
        await self.request(Cmd.WRITE_ZEROES, offset, length, flags)

    async def cache(self, offset: int, length: int) -> None:
        await self.request(Cmd.CACHE, offset, length)

    async def block_status(
        self, offset: int, length: int, req_one: bool = False, flags: CmdFlag | int = 0
    ) -> dict[str, Extents]:
        """Extents [(length, flags)] for every negotiated meta context, by name."""
        flags = int(flags) | (CmdFlag.REQ_ONE if req_one else 0)
        raw = await self.request(Cmd.BLOCK_STATUS, offset, length, flags)
        assert isinstance(raw, dict)
        return {self._context_names[ctx]: ext for ctx, ext in raw.items()}

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def can(self, flag: TransmissionFlag) -> bool:
        return bool(self.flags & flag)

    async def disconnect(self) -> None:
        """Wait for what is in flight, send NBD_CMD_DISC, and close."""
        if self._pending:
            await asyncio.gather(
                *(p.future for p in self._pending.values()), return_exceptions=True
            )
        if self._dead is None and not self._disconnecting:
            self._disconnecting = True
            try:
                self._writer.write(codec.build_request(Cmd.DISC, 0, 0, 0, 0, self.extended))
                await self._writer.drain()
            except OSError:
                pass
        await self.close()

    async def close(self) -> None:
        """Close the socket without NBD_CMD_DISC (a hard disconnect)."""
        self._disconnecting = True
        if self._reader_task is not None and not self._reader_task.done():
            self._reader_task.cancel()
            try:
                await self._reader_task
            except asyncio.CancelledError:
                pass
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        if t is None:
            await self.disconnect()
        else:
            await self.close()


async def open_stream(addr: NbdAddress) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if addr.socket is not None:
        return await asyncio.open_unix_connection(addr.socket, limit=STREAM_LIMIT)
    return await asyncio.open_connection(addr.host, addr.port, limit=STREAM_LIMIT)


async def connect(
    uri: str | NbdAddress,
    *,
    export: str | None = None,
    structured: bool = True,
    meta_contexts: Iterable[str] = (BASE_ALLOCATION,),
    extended: bool = False,
) -> Client:
    """Connect, negotiate and enter transmission.

    ``structured``: ask for structured replies (needed for meta contexts and holes).
    ``meta_contexts``: the contexts to select for BLOCK_STATUS (when structured).
    ``extended``: ask for extended headers first, falling back when refused.
    """
    addr = parse_uri(uri) if isinstance(uri, str) else uri
    name = addr.export if export is None else export
    reader, writer = await open_stream(addr)
    client = Client(reader, writer)
    try:
        await client._greet()
        if addr.tls:
            await client._starttls(addr)
        await client._negotiate_headers(structured, extended)
        queries = list(meta_contexts)
        if client.structured and queries:
            await client._set_meta_contexts(name, queries)
        await client._go(name)
        if not client.export_name:
            client.export_name = name
    except BaseException:
        client._writer.close()
        raise
    client._start()
    return client


async def _options_session(uri: str | NbdAddress) -> Client:
    addr = parse_uri(uri) if isinstance(uri, str) else uri
    reader, writer = await open_stream(addr)
    client = Client(reader, writer)
    try:
        await client._greet()
        if addr.tls:
            await client._starttls(addr)
    except BaseException:
        client._writer.close()
        raise
    return client


async def _abort(client: Client) -> None:
    try:
        await client.option(Opt.ABORT)
    except (OSError, asyncio.IncompleteReadError):
        pass
    await client.close()


async def list_exports(uri: str | NbdAddress) -> list[tuple[str, str]]:
    """NBD_OPT_LIST: [(export name, description)]."""
    client = await _options_session(uri)
    try:
        replies = await client.option(Opt.LIST)
        Client._check(Opt.LIST, replies)
        return [codec.parse_server(d) for r, d in replies[:-1] if r == Rep.SERVER]
    finally:
        await _abort(client)


async def list_meta_contexts(
    uri: str | NbdAddress, queries: Sequence[str] = (), export: str | None = None
) -> list[str]:
    """NBD_OPT_LIST_META_CONTEXT (after STRUCTURED_REPLY): context names the server has."""
    addr = parse_uri(uri) if isinstance(uri, str) else uri
    client = await _options_session(addr)
    try:
        Client._check(Opt.STRUCTURED_REPLY, await client.option(Opt.STRUCTURED_REPLY))
        name = addr.export if export is None else export
        payload = codec.meta_context_payload(name, queries)
        replies = await client.option(Opt.LIST_META_CONTEXT, payload)
        Client._check(Opt.LIST_META_CONTEXT, replies)
        return [codec.parse_meta_context(d)[1] for r, d in replies[:-1] if r == Rep.META_CONTEXT]
    finally:
        await _abort(client)
