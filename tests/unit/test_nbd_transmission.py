"""Request framing, reply encoders and request validation, without sockets.

Expected wire bytes are written with plain ``struct`` and the spec's magic numbers.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import struct
import time
from typing import Any

import pytest

from nbdqcow.block.driver import Capabilities, Extent
from nbdqcow.errors import RemoteProtocolError, WouldBlock
from nbdqcow.nbd.handshake import Negotiated
from nbdqcow.nbd.transmission import ReplyEncoder, Request, RequestDecoder
from nbdqcow.server.dispatch import NOWAIT_MISSES, Dispatcher, descriptors, is_zero
from nbdqcow.server.exports import Export

REQ_MAGIC = 0x25609513
EXT_REQ_MAGIC = 0x21E41C71
SIMPLE = 0x67446698
STRUCT = 0x668E33EF
EXT_REPLY = 0x6E8A278C
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, BSTAT = range(8)


def req(cmd: int, offset: int = 0, length: int = 0, cookie: int = 7, flags: int = 0,
        payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, offset, length) + payload


# --- decoder ---------------------------------------------------------------------------------
def test_decode_simple_requests() -> None:
    d = RequestDecoder()
    out = d.feed(req(READ, 4096, 512, cookie=1) + req(FLUSH, cookie=2))
    assert out == [Request(READ, 0, 1, 4096, 512, None), Request(FLUSH, 0, 2, 0, 0, None)]
    assert d.idle


def test_decode_write_payload_split_everywhere() -> None:
    stream = req(WRITE, 10, 5, payload=b"hello") + req(READ, 0, 1, cookie=9)
    for cut in range(1, len(stream)):
        d = RequestDecoder()
        out = d.feed(stream[:cut]) + d.feed(stream[cut:])
        assert [(r.cmd, r.cookie, bytes(r.payload) if r.payload is not None else None)
                for r in out] == [(WRITE, 7, b"hello"), (READ, 9, None)]


def test_large_write_received_into_its_own_buffer() -> None:
    d = RequestDecoder(buffer_size=4096)
    data = bytes(range(256)) * 1024  # 256 KiB
    stream = req(WRITE, 0, len(data), payload=data) + req(DISC)
    out: list[Request] = []
    pos = 0
    sizes = set()
    while pos < len(stream):
        buf = d.get_buffer()
        sizes.add(len(buf))
        k = min(len(buf), len(stream) - pos, 10000)
        buf[:k] = stream[pos : pos + k]
        pos += k
        out += d.buffer_updated(k)
    assert out[0].payload == data and out[1].cmd == DISC
    assert max(sizes) >= len(data) - 4096  # the payload buffer was offered directly


def test_oversized_write_is_discarded_and_connection_survives() -> None:
    d = RequestDecoder(max_payload=1024)
    out = d.feed(req(WRITE, 0, 5000, payload=bytes(5000)) + req(READ, 0, 1, cookie=3))
    assert out[0].cmd == WRITE and out[0].payload is None and out[0].length == 5000
    assert out[1].cookie == 3


def test_bad_magic_is_a_protocol_error() -> None:
    d = RequestDecoder()
    with pytest.raises(RemoteProtocolError):
        d.feed(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 0, 0, 0))
    with pytest.raises(RemoteProtocolError):
        d.feed(req(READ))


def test_extended_requests() -> None:
    d = RequestDecoder(extended=True)
    big = 5 << 32
    stream = struct.pack(">IHHQQQ", EXT_REQ_MAGIC, 0, TRIM, 1, 0, big)
    stream += struct.pack(">IHHQQQ", EXT_REQ_MAGIC, 0x20, WRITE, 2, 8, 3) + b"abc"
    out = d.feed(stream)
    assert out[0] == Request(TRIM, 0, 1, 0, big, None)
    assert out[1].payload == b"abc"
    with pytest.raises(RemoteProtocolError):
        RequestDecoder(extended=True).feed(req(READ) + req(READ))


# --- encoders -------------------------------------------------------------------------------
def test_simple_replies() -> None:
    e = ReplyEncoder()
    assert e.ok(5) == struct.pack(">IIQ", SIMPLE, 0, 5)
    assert e.error(5, 22, "bad") == struct.pack(">IIQ", SIMPLE, 22, 5)
    assert e.read_simple(6) == struct.pack(">IIQ", SIMPLE, 0, 6)


def test_structured_chunks() -> None:
    e = ReplyEncoder(structured=True)
    assert e.data(1, 4096, 100, True) == struct.pack(">IHHQIQ", STRUCT, 1, 1, 1, 108, 4096)
    assert e.hole(1, 0, 512, False) == struct.pack(">IHHQIQI", STRUCT, 0, 2, 1, 12, 0, 512)
    assert e.none(3) == struct.pack(">IHHQI", STRUCT, 1, 0, 3, 0)
    err = e.error(4, 28, "full")
    assert err == struct.pack(">IHHQI", STRUCT, 1, 32769, 4, 10) + struct.pack(">IH", 28, 4) + b"full"
    bs = e.block_status(9, 2, [(4096, 3), (512, 0)], True)
    assert bs == struct.pack(">IHHQI", STRUCT, 1, 5, 9, 20) + struct.pack(">IIIII", 2, 4096, 3, 512, 0)
    # with structured replies, non-data commands may still use simple replies
    assert e.ok(2) == struct.pack(">IIQ", SIMPLE, 0, 2)


def test_extended_chunks() -> None:
    e = ReplyEncoder(extended=True)
    assert e.ok(2, 100) == struct.pack(">IHHQQQ", EXT_REPLY, 1, 0, 2, 100, 0)
    assert e.data(1, 4096, 100, True, 4096) == struct.pack(
        ">IHHQQQQ", EXT_REPLY, 1, 1, 1, 4096, 108, 4096)
    bs = e.block_status(9, 1, [(1 << 40, 3)], True, 0)
    assert bs == struct.pack(">IHHQQQ", EXT_REPLY, 1, 6, 9, 0, 24) + struct.pack(
        ">IIQQ", 1, 1, 1 << 40, 3)


# --- helpers of dispatch --------------------------------------------------------------------
def test_is_zero() -> None:
    assert is_zero(bytes(3 << 20))
    assert not is_zero(bytes(3 << 20) + b"\1")
    assert is_zero(b"")


def test_descriptors_merge_clip_and_req_one() -> None:
    ext = [Extent(0, 4096, True, True, False, 0, 0), Extent(4096, 4096, True, True, False, 0, 1),
           Extent(8192, 8192, False, False, True, 0, None)]
    flags = lambda e: (0 if e.data else 1) | (2 if e.zero else 0)  # noqa: E731
    assert descriptors(ext, 1000, 10000, flags, False) == [(7192, 0), (2808, 3)]
    assert descriptors(ext, 1000, 10000, flags, True) == [(7192, 0)]
    assert descriptors([], 0, 10, flags, False) == [(10, 0)]


# --- dispatcher against an in-memory driver --------------------------------------------------
class MemDriver:
    def __init__(self, size: int, writable: bool = True) -> None:
        self.data = bytearray(size)
        self._caps = Capabilities(writable=writable, flush=True, discard=True,
                                  write_zeroes=True, block_status=True)
        self.flushes = 0
        self.cold = False  # nowait reads raise WouldBlock
        self.extent_fd = -1  # host_extent: guest offset = position in this file
        self.nowait_calls: list[bool] = []

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def caps(self) -> Capabilities:
        return self._caps

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def preadinto(self, offset: int, buf: memoryview, nowait: bool = False) -> None:
        self.nowait_calls.append(nowait)
        if nowait and self.cold:
            raise WouldBlock("not in the page cache")
        buf[:] = self.data[offset : offset + len(buf)]

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> None:
        self.data[offset : offset + len(data)] = data
        if self.extent_fd >= 0:  # host_extent promises the file holds the guest's data
            os.pwrite(self.extent_fd, data, offset)

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        return None if self.extent_fd < 0 else (self.extent_fd, offset)

    def flush(self) -> None:
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                     fast: bool = False) -> None:
        self.data[offset : offset + length] = bytes(length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, True, True, False, 0, None)]

    def close(self) -> None:
        pass


class FakeFlow:
    def start(self, n: int) -> None:
        pass

    def finish(self, n: int) -> None:
        pass


def run_requests(requests: list[Request], *, writable: bool = True, structured: bool = False,
                 contexts: dict[int, str] | None = None, size: int = 1 << 20,
                 drv: MemDriver | None = None,
                 send_file: Any = None) -> tuple[list[bytes], MemDriver]:
    drv = drv or MemDriver(size, writable)
    export = Export("", drv, readonly=not writable, discard="unmap")
    neg = Negotiated(export.info(), structured=structured, contexts=contexts or {})
    sent: list[bytes] = []

    async def main() -> None:
        d = Dispatcher(export, neg, lambda bufs: sent.append(b"".join(bytes(b) for b in bufs)),
                       FakeFlow(), asyncio.get_running_loop(),  # type: ignore[arg-type]
                       send_file)
        for r in requests:
            d.handle(r)
        while d.pending:
            await asyncio.sleep(0.001)

    asyncio.run(main())
    return sent, drv


def simple_errors(sent: list[bytes]) -> list[int]:
    return [struct.unpack_from(">IIQ", s)[1] for s in sent]


@pytest.mark.parametrize("request_, code", [
    (Request(READ, 0, 1, (1 << 20) - 10, 11, None), errno.EINVAL),  # read past end
    (Request(WRITE, 0, 1, (1 << 20) - 1, 2, b"ab"), errno.ENOSPC),  # write past end
    (Request(ZEROES, 0, 1, 1 << 20, 1, None), errno.ENOSPC),
    (Request(READ, 0, 1, 0, 64 << 20, None), errno.EINVAL),  # over the max payload
    (Request(WRITE, 0, 1, 0, 64 << 20, None), errno.EINVAL),  # discarded oversize write
    (Request(READ, 0x2, 1, 0, 1, None), errno.EINVAL),  # NO_HOLE on READ
    (Request(WRITE, 0x8, 1, 0, 1, b"a"), errno.EINVAL),  # REQ_ONE on WRITE
    (Request(READ, 0x4, 1, 0, 1, None), errno.EINVAL),  # DF without structured replies
    (Request(READ, 0x100, 1, 0, 1, None), errno.EINVAL),  # unknown flag
    (Request(42, 0, 1, 0, 1, None), errno.EINVAL),  # unknown command
    (Request(FLUSH, 0, 1, 1, 0, None), errno.EINVAL),  # flush with an offset
    (Request(BSTAT, 0, 1, 0, 512, None), errno.EINVAL),  # no context negotiated
    (Request(CACHE, 0, 1, 1 << 20, 1, None), errno.EINVAL),
])
def test_invalid_requests(request_: Request, code: int) -> None:
    sent, drv = run_requests([request_])
    assert simple_errors(sent) == [code]
    assert not any(drv.data)


@pytest.mark.parametrize("cmd", [WRITE, TRIM, ZEROES])
def test_read_only_export_is_eperm(cmd: int) -> None:
    payload = b"x" if cmd == WRITE else None
    sent, _ = run_requests([Request(cmd, 0, 1, 0, 1, payload)], writable=False)
    assert simple_errors(sent) == [errno.EPERM]


def test_fast_zero_without_fast_driver_is_enotsup() -> None:
    sent, _ = run_requests([Request(ZEROES, 0x10, 1, 0, 4096, None)])
    assert simple_errors(sent) == [95]


def test_writes_reads_and_fua_flush() -> None:
    big = bytes(range(256)) * 2048  # 512 KiB with FUA: runs in the writer thread
    sent, drv = run_requests([
        Request(WRITE, 1, 1, 0, len(big), big),
        Request(WRITE, 1, 2, 100, 3, b"abc"),  # overlaps the pending big write: waits for it
        Request(READ, 0, 3, 98, 6, None),
    ])
    assert simple_errors(sent) == [0, 0, 0]
    assert sent[2][16:] == big[98:100] + b"abc" + big[103:104]
    assert drv.data[100:103] == b"abc" and drv.flushes == 2


@pytest.mark.parametrize("cold", [False, True])
@pytest.mark.parametrize("structured", [False, True])
def test_large_reads_try_the_page_cache_then_a_thread(cold: bool, structured: bool) -> None:
    drv = MemDriver(4 << 20)
    drv.data[:] = bytes(range(256)) * (len(drv.data) // 256)
    drv.cold = cold
    n = 512 * 1024
    sent, _ = run_requests([Request(READ, 0x4 if structured else 0, 1, 4096, n, None)],
                           structured=structured, drv=drv)
    assert sent[0][-n:] == drv.data[4096:4096 + n]
    # warm: answered on the event loop; cold: the nowait try missed, a thread read it
    assert drv.nowait_calls == ([True, False] if cold else [True])


@pytest.mark.parametrize("structured", [False, True])
def test_large_cached_reads_go_out_with_sendfile(tmp_path: Any, structured: bool) -> None:
    drv = MemDriver(4 << 20)
    drv.data[:] = os.urandom(len(drv.data))
    path = tmp_path / "host"
    path.write_bytes(drv.data)  # just written: in the page cache
    drv.extent_fd = os.open(path, os.O_RDWR)
    calls: list[tuple[bytes, int, int, int]] = []

    def send_file(head: bytes, fd: int, pos: int, n: int) -> bool:
        calls.append((head, fd, pos, n))
        return True

    n = 512 * 1024
    try:
        sent, _ = run_requests([
            Request(READ, 0, 1, 4096, n, None),  # sent with sendfile
            Request(WRITE, 1, 2, 3 << 20, n, bytes(n)),  # FUA, in a thread: pending...
            Request(READ, 0, 3, (3 << 20) + 100, n, None),  # ...so this one waits, copied
            Request(READ, 0, 4, 100, 1000, None),  # small: copied inline
        ], structured=structured, drv=drv, send_file=send_file)
    finally:
        os.close(drv.extent_fd)
    assert [(fd, pos, k) for _, fd, pos, k in calls] == [(drv.extent_fd, 4096, n)]
    head = calls[0][0]
    if structured:  # one OFFSET_DATA chunk with DONE, for the whole request
        assert struct.unpack(">IHHQIQ", head) == (STRUCT, 1, 1, 1, n + 8, 4096)
    else:
        assert struct.unpack(">IIQ", head) == (SIMPLE, 0, 1)
    assert len(sent) == 3  # the write and the two copied reads
    big = [s for s in sent if len(s) > n]  # the read that waited saw the write's zeros
    assert len(big) == 1 and big[0][-n:] == bytes(n - 100) + drv.data[(3 << 20) + n:][:100]


def test_cold_reads_stop_the_nowait_tries_for_a_while() -> None:
    drv = MemDriver(4 << 20)
    drv.cold = True
    n = 256 * 1024
    reqs = [Request(READ, 0, i, i * n, n, None) for i in range(NOWAIT_MISSES + 3)]
    sent, _ = run_requests(reqs, drv=drv)
    assert simple_errors(sent) == [0] * len(reqs)
    assert drv.nowait_calls.count(True) == NOWAIT_MISSES
    assert drv.nowait_calls.count(False) == len(reqs)


class SlowDriver(MemDriver):
    """A driver whose plain reads wait like a disk would."""

    def pread(self, offset: int, length: int) -> bytes:
        time.sleep(0.002)
        return super().pread(offset, length)


@pytest.mark.parametrize("structured", [False, True])
def test_small_reads_after_one_that_waited_go_to_threads(structured: bool) -> None:
    """Warm small reads are read on the event loop without a nowait try; once one has
    waited for the disk, the next ones try the page cache only and go to a thread on a
    miss (and still return the right data)."""
    drv = SlowDriver(1 << 20)
    drv.data[:] = bytes(range(256)) * (len(drv.data) // 256)
    drv.cold = True
    reqs = [Request(READ, 0, i, 4096 * i + 1, 4000, None) for i in range(6)]
    sent, _ = run_requests(reqs, structured=structured, drv=drv)
    assert len(sent) == len(reqs)
    for s in sent:
        cookie = struct.unpack_from(">Q", s, 8 if structured else 8)[0]
        off = 4096 * cookie + 1
        assert s[-4000:] == drv.data[off:off + 4000]
    assert drv.nowait_calls.count(True) >= 1  # the reads after the first slow one
    warm = MemDriver(1 << 20)
    run_requests(reqs, structured=structured, drv=warm)
    assert warm.nowait_calls == []  # warm: plain reads on the loop, no nowait tries


def test_structured_read_of_zeroes_is_a_hole() -> None:
    sent, _ = run_requests([Request(READ, 0, 1, 4096, 4096, None)], structured=True)
    magic, flags, rtype, cookie, length, offset, hole = struct.unpack(">IHHQIQI", sent[0])
    assert (magic, flags, rtype, length, offset, hole) == (STRUCT, 1, 2, 12, 4096, 4096)


def test_structured_read_df_sends_one_data_chunk() -> None:
    sent, _ = run_requests([Request(READ, 0x4, 1, 0, 4096, None)], structured=True)
    magic, flags, rtype, cookie, length, offset = struct.unpack_from(">IHHQIQ", sent[0])
    assert (rtype, flags, length) == (1, 1, 4096 + 8) and len(sent[0]) == 28 + 4096


def test_block_status_one_chunk_per_context() -> None:
    ctx = {1: "base:allocation", 2: "qemu:allocation-depth"}
    sent, _ = run_requests([Request(BSTAT, 0, 1, 0, 8192, None)], structured=True, contexts=ctx)
    msg = sent[0]
    first = struct.unpack_from(">IHHQI", msg)
    assert first[1] == 0 and first[2] == 5
    assert struct.unpack_from(">III", msg, 20) == (1, 8192, 0)  # data: no flags
    second = struct.unpack_from(">IHHQI", msg, 32)
    assert second[1] == 1
    assert struct.unpack_from(">III", msg, 52) == (2, 8192, 1)  # depth 1: this image


# --- the asyncio protocol with a fake transport: flow control and back-pressure --------------
class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.reading = True
        self.closing = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.out.append(bytes(data))

    def writelines(self, bufs: Any) -> None:
        self.out.append(b"".join(bytes(b) for b in bufs))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.aborted = self.closing = True

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FakeServer:
    tls = None
    handshake_limit = 10.0

    def __init__(self, export: Export) -> None:
        self.export = export
        self.budget = None  # no memory budget

    def export_infos(self) -> list[Any]:
        return [self.export.info()]

    def export_by_name(self, name: str) -> Export:
        return self.export

    def lookup_info(self, name: str) -> Any:
        return self.export.info()

    def admit(self, proto: Any) -> bool:
        proto.start()
        return True

    def release(self, proto: Any) -> None:
        pass

    def negotiated(self, proto: Any) -> None:
        pass


def _feed(proto: Any, data: bytes) -> None:
    while data:
        buf = proto.get_buffer(-1)
        k = min(len(buf), len(data))
        buf[:k] = data[:k]
        data = data[k:]
        proto.buffer_updated(k)


def _go() -> bytes:
    opt = struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0)
    return struct.pack(">I", 3) + opt


def test_protocol_backlogs_requests_while_the_client_does_not_read() -> None:
    from nbdqcow.server.protocol import NbdProtocol

    async def main() -> None:
        drv = MemDriver(1 << 20)
        proto = NbdProtocol(FakeServer(Export("", drv)))  # type: ignore[arg-type]
        t = FakeTransport()
        proto.connection_made(t)  # type: ignore[arg-type]
        _feed(proto, _go())
        assert proto.dispatcher is not None
        t.out.clear()
        proto.pause_writing()  # the client stopped reading its replies
        _feed(proto, b"".join(req(READ, i * 4096, 4096, cookie=i) for i in range(10)))
        assert t.out == [] and len(proto.backlog) == 10 and not t.reading
        proto.resume_writing()
        assert proto.backlog == collections.deque() and t.reading
        replies = b"".join(t.out)
        assert len(replies) == 10 * (16 + 4096)
        cookies = [struct.unpack_from(">IIQ", replies, i * 4112)[2] for i in range(10)]
        assert cookies == list(range(10))

    asyncio.run(main())


def test_protocol_bad_magic_disconnects_only_that_client() -> None:
    from nbdqcow.server.protocol import NbdProtocol

    async def main() -> None:
        drv = MemDriver(1 << 20)
        proto = NbdProtocol(FakeServer(Export("", drv)))  # type: ignore[arg-type]
        t = FakeTransport()
        proto.connection_made(t)  # type: ignore[arg-type]
        _feed(proto, _go() + struct.pack(">IHHQQI", 0xBAD, 0, 0, 1, 0, 0))
        assert t.aborted

    asyncio.run(main())


def test_protocol_disc_waits_for_in_flight_requests() -> None:
    from nbdqcow.server.protocol import NbdProtocol

    async def main() -> None:
        drv = MemDriver(4 << 20)
        proto = NbdProtocol(FakeServer(Export("", drv)))  # type: ignore[arg-type]
        t = FakeTransport()
        proto.connection_made(t)  # type: ignore[arg-type]
        _feed(proto, _go())
        t.out.clear()
        big = b"\x07" * (1 << 20)  # large: runs in a worker thread
        _feed(proto, req(WRITE, 0, len(big), cookie=5, payload=big) + req(DISC, cookie=6))
        assert not t.closing  # the write is still in flight
        for _ in range(200):
            if t.closing:
                break
            await asyncio.sleep(0.01)
        assert t.closing
        assert struct.unpack(">IIQ", t.out[-1]) == (SIMPLE, 0, 5)
        assert drv.data[: 1 << 20] == big

    asyncio.run(main())
