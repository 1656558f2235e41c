"""nbdqcow.nbdclient against real servers: qemu-nbd (the reference) and ``nbdqcow serve``.

Oracles are independent of the client: images are prepared with qemu-img/qemu-io, block
status is compared with ``qemu-img map --output=json``, and data written through the
client is read back from the image file with ``qemu-img convert`` after the server stops.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import json
import os
import random
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbdqcow.errors import RemoteError, RemoteProtocolError
from nbdqcow.nbd.constants import (
    BASE_ALLOCATION,
    QEMU_ALLOCATION_DEPTH,
    StateFlag,
    TransmissionFlag,
)
from nbdqcow.nbdclient import Client, SyncClient, connect, list_exports, list_meta_contexts
from tests.tooling import require_tool, wait_ready

MiB = 1 << 20
SIZE = 16 * MiB
CONTEXTS = (BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH)


def _nbdqcow_serve_available() -> bool:
    try:
        return importlib.util.find_spec("nbdqcow.cli.serve") is not None
    except ImportError:
        return False


SERVERS = [
    "qemu-nbd",
    pytest.param(
        "nbdqcow",
        marks=pytest.mark.skipif(
            not _nbdqcow_serve_available(),
            reason="nbdqcow serve (nbdqcow.cli.serve) not written yet",
        ),
    ),
]


def _qemu_img(*args: str) -> str:
    require_tool("qemu-img")
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def _qemu_io(image: Path, fmt: str, *commands: str) -> None:
    require_tool("qemu-io")
    argv = ["qemu-io", "-f", fmt]
    for cmd in commands:
        argv += ["-c", cmd]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One running server process; ``uri`` to reach it."""

    def __init__(self, proc: subprocess.Popen[bytes], uri: str) -> None:
        self.proc = proc
        self.uri = uri

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


ServerFactory = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Factory: start qemu-nbd or nbdqcow serve on an image; all stopped at teardown."""
    started: list[Server] = []

    def start(
        kind: str,
        image: Path,
        fmt: str = "qcow2",
        *extra: str,
        tcp: bool = False,
        export: str = "",
    ) -> Server:
        sock = tmp_path / f"s{len(started)}.sock"
        port = _free_port() if tcp else None
        where = ["-b", "127.0.0.1", "-p", str(port)] if tcp else ["-k", str(sock)]
        opts = ["-f", fmt, "-t", "-x", export, *where, *extra, str(image)]
        if kind == "qemu-nbd":
            argv = [require_tool("qemu-nbd"), *opts]
        else:
            argv = [sys.executable, "-m", "nbdqcow", "serve", *opts]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        server = Server(
            proc,
            f"nbd://127.0.0.1:{port}/{export}" if tcp else f"nbd+unix:///{export}?socket={sock}",
        )
        started.append(server)
        wait_ready(proc, None if tcp else sock, port)
        return server

    try:
        yield start
    finally:
        for s in started:
            s.stop()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """16 MiB qcow2 (64 KiB clusters): 0xab at 1 MiB (1 MiB), 0xcd at 5 MiB+4 KiB (8 KiB)."""
    path = tmp_path / "disk.qcow2"
    _qemu_img("create", "-f", "qcow2", str(path), str(SIZE))
    _qemu_io(path, "qcow2", "write -P 0xab 1M 1M", "write -P 0xcd 5124k 8k")
    return path


def _model() -> bytearray:
    m = bytearray(SIZE)
    m[MiB : 2 * MiB] = b"\xab" * MiB
    m[5124 * 1024 : 5132 * 1024] = b"\xcd" * 8192
    return m


def _image_bytes(path: Path, fmt: str = "qcow2") -> bytes:
    raw = path.with_suffix(".raw")
    _qemu_img("convert", "-f", fmt, "-O", "raw", str(path), str(raw))
    return raw.read_bytes()


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


# --- handshake ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SERVERS)
def test_handshake_info_and_list(kind: str, image: Path, start_server: ServerFactory) -> None:
    srv = start_server(kind, image, "qcow2", "-D", "the disk", export="disk")

    async def go() -> None:
        exports = await list_exports(srv.uri)
        assert ("disk", "the disk") in exports
        c = await connect(srv.uri)
        try:
            assert c.size == SIZE
            assert c.export_name == "disk"
            assert c.structured and not c.extended
            for flag in (
                TransmissionFlag.HAS_FLAGS,
                TransmissionFlag.SEND_FLUSH,
                TransmissionFlag.SEND_FUA,
            ):
                assert c.can(flag)
            assert not c.can(TransmissionFlag.READ_ONLY)
            assert c.block_sizes is not None
            assert c.block_sizes.minimum <= c.block_sizes.preferred <= c.block_sizes.maximum
            assert c.block_sizes.maximum >= MiB
            assert c.contexts.keys() == {BASE_ALLOCATION}
        finally:
            await c.disconnect()

    _run(go())


@pytest.mark.parametrize("kind", SERVERS)
def test_unknown_export_refused(kind: str, image: Path, start_server: ServerFactory) -> None:
    srv = start_server(kind, image, export="disk")

    async def go() -> None:
        with pytest.raises(RemoteError) as info:
            await connect(srv.uri, export="nope")
        assert info.value.code & (1 << 31)  # an NBD_REP_ERR_*
        c = await connect(srv.uri)  # the server still serves others
        await c.disconnect()

    _run(go())


@pytest.mark.parametrize("kind", SERVERS)
def test_meta_contexts_listed_and_selected(
    kind: str, image: Path, start_server: ServerFactory
) -> None:
    srv = start_server(kind, image, "qcow2", "-A")

    async def go() -> None:
        names = await list_meta_contexts(srv.uri)
        assert set(CONTEXTS) <= set(names)
        assert await list_meta_contexts(srv.uri, ["qemu:allocation-depth"]) == [
            QEMU_ALLOCATION_DEPTH
        ]
        c = await connect(srv.uri, meta_contexts=CONTEXTS)
        assert c.contexts.keys() == set(CONTEXTS)
        assert len(set(c.contexts.values())) == 2
        await c.disconnect()

    _run(go())


@pytest.mark.parametrize("kind", SERVERS)
def test_extended_headers_optional(kind: str, image: Path, start_server: ServerFactory) -> None:
    """Asking for extended headers never breaks a connection: it falls back when refused."""
    srv = start_server(kind, image)

    async def go() -> None:
        c = await connect(srv.uri, extended=True, meta_contexts=CONTEXTS[:1])
        try:
            assert c.structured
            # qemu-nbd 7.2 does not speak extended headers; nbdqcow does
            assert c.extended == (kind == "nbdqcow")
            data = await c.pread(MiB - 4096, 8192)
            assert data == bytes(4096) + b"\xab" * 4096
            status = await c.block_status(0, 4 * MiB)
            assert sum(length for length, _ in status[BASE_ALLOCATION]) >= 4 * MiB
            await c.write_zeroes(MiB, 4096)
            assert await c.pread(MiB, 4096) == bytes(4096)
        finally:
            await c.disconnect()

    _run(go())


# --- data -----------------------------------------------------------------------------------
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("kind", SERVERS)
def test_reads_match_image(
    kind: str, structured: bool, image: Path, start_server: ServerFactory
) -> None:
    srv = start_server(kind, image)
    model = _model()

    async def go() -> None:
        c = await connect(srv.uri, structured=structured)
        try:
            assert c.structured == structured
            for off, length in (
                (0, 4096),
                (MiB - 512, 1024),
                (5 * MiB, 64 * 1024),
                (0, 4 * MiB),
                (SIZE - 1, 1),
            ):
                assert await c.pread(off, length) == model[off : off + length], (off, length)
        finally:
            await c.disconnect()

    _run(go())


@pytest.mark.parametrize("kind", SERVERS)
def test_every_write_command_lands_in_image(
    kind: str, image: Path, start_server: ServerFactory
) -> None:
    srv = start_server(kind, image, "qcow2", "--discard=unmap")
    model = _model()

    async def go() -> None:
        c = await connect(srv.uri)
        try:
            await c.pwrite(b"\x11" * 65536, 3 * MiB)
            model[3 * MiB : 3 * MiB + 65536] = b"\x11" * 65536
            await c.pwrite(b"\x22" * 1000, 3 * MiB + 100, fua=True)
            model[3 * MiB + 100 : 3 * MiB + 1100] = b"\x22" * 1000
            await c.write_zeroes(MiB + 4096, 8192)
            model[MiB + 4096 : MiB + 12288] = bytes(8192)
            await c.write_zeroes(MiB + 65536, 65536, no_hole=True)
            model[MiB + 65536 : MiB + 131072] = bytes(65536)
            await c.trim(MiB + 4 * 65536, 2 * 65536)  # content after trim is unspecified
            model[MiB + 4 * 65536 : MiB + 6 * 65536] = await c.pread(MiB + 4 * 65536, 2 * 65536)
            await c.cache(0, MiB)
            await c.flush()
            assert await c.pread(0, 4 * MiB) == model[: 4 * MiB]
        finally:
            await c.disconnect()

    _run(go())
    srv.stop()
    assert _image_bytes(image) == bytes(model)
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("kind", SERVERS)
def test_many_requests_in_flight(kind: str, image: Path, start_server: ServerFactory) -> None:
    """256 concurrent mixed requests; replies (possibly out of order) matched by cookie."""
    srv = start_server(kind, image)
    model = _model()
    rng = random.Random(7)

    async def go() -> None:
        c = await connect(srv.uri)
        try:
            # disjoint writes in flight together, each block its own pattern
            blocks = rng.sample(range(SIZE // 4096), 128)
            await asyncio.gather(*(c.pwrite(bytes([b % 251 + 1]) * 4096, b * 4096) for b in blocks))
            for b in blocks:
                model[b * 4096 : (b + 1) * 4096] = bytes([b % 251 + 1]) * 4096
            reads = [
                (rng.randrange(0, SIZE - 65536), rng.choice((512, 4096, 65536))) for _ in range(256)
            ]
            results = await asyncio.gather(*(c.pread(o, n) for o, n in reads))
            for (o, n), got in zip(reads, results, strict=True):
                assert got == model[o : o + n]
            assert c.in_flight == 0
        finally:
            await c.disconnect()

    _run(go())


@pytest.mark.parametrize("kind", SERVERS)
def test_two_connections_see_each_other(
    kind: str, image: Path, start_server: ServerFactory
) -> None:
    srv = start_server(kind, image, "qcow2", "-e", "2", tcp=True)

    async def go() -> None:
        a = await connect(srv.uri)
        b = await connect(srv.uri)
        try:
            await a.pwrite(b"\x5a" * 4096, 8 * MiB, fua=True)
            await a.flush()
            assert await b.pread(8 * MiB, 4096) == b"\x5a" * 4096
        finally:
            await a.disconnect()
            await b.disconnect()

    _run(go())


# --- block status ------------------------------------------------------------------------------
def _qemu_map(path: Path) -> list[dict[str, object]]:
    return list(json.loads(_qemu_img("map", "--output=json", str(path))))


def _expand(extents: list[tuple[int, int]], start: int, unit: int) -> list[int]:
    """Per-unit flags from a list of (length, flags), starting at ``start``."""
    out: list[int] = []
    for length, flags in extents:
        assert length > 0 and length % 512 == 0
        out += [flags] * (length // unit)
    return out


@pytest.mark.parametrize("kind", SERVERS)
def test_block_status_matches_qemu_img_map(
    kind: str, tmp_path: Path, start_server: ServerFactory
) -> None:
    base = tmp_path / "base.qcow2"
    _qemu_img("create", "-f", "qcow2", str(base), str(SIZE))
    _qemu_io(base, "qcow2", "write -P 1 0 2M", "write -z 6M 1M")
    top = tmp_path / "top.qcow2"
    _qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    _qemu_io(top, "qcow2", "write -P 2 1M 2M", "write -z 8M 512k")
    unit = 64 * 1024
    want_alloc = [0] * (SIZE // unit)
    want_depth = [0] * (SIZE // unit)
    for e in _qemu_map(top):
        start, length = int(str(e["start"])), int(str(e["length"]))
        flags = (0 if e["data"] else StateFlag.HOLE) | (StateFlag.ZERO if e["zero"] else 0)
        depth = int(str(e["depth"])) + 1 if e["present"] else 0
        for u in range(start // unit, (start + length) // unit):
            want_alloc[u] = int(flags)
            want_depth[u] = depth
    assert 2 in want_depth and 1 in want_depth and 0 in want_depth  # the fixture is what we think
    srv = start_server(kind, top, "qcow2", "-A")

    async def go() -> None:
        c = await connect(srv.uri, meta_contexts=CONTEXTS)
        try:
            got_alloc: list[int] = []
            got_depth: list[int] = []
            pos = 0
            while pos < SIZE:
                status = await c.block_status(pos, SIZE - pos)
                alloc, depth = status[BASE_ALLOCATION], status[QEMU_ALLOCATION_DEPTH]
                got_alloc += _expand(alloc, pos, unit)
                got_depth += _expand(depth, pos, unit)
                pos += min(sum(n for n, _ in alloc), sum(n for n, _ in depth))
                got_alloc, got_depth = got_alloc[: pos // unit], got_depth[: pos // unit]
            # qemu-img map reports holes in the top layer over backing data as data; the NBD
            # base:allocation flags of a hole-free region are 0.
            assert got_alloc == want_alloc
            assert got_depth == want_depth
            one = await c.block_status(MiB + 512, 4 * MiB, req_one=True)
            for name in CONTEXTS:
                assert len(one[name]) == 1
                assert 0 < one[name][0][0] <= 4 * MiB
        finally:
            await c.disconnect()

    _run(go())


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SERVERS)
def test_error_replies(kind: str, image: Path, start_server: ServerFactory) -> None:
    srv = start_server(kind, image)

    async def go() -> None:
        c = await connect(srv.uri)
        try:
            with pytest.raises(RemoteError) as info:
                await c.pread(SIZE, 4096)
            assert info.value.code == errno.EINVAL
            with pytest.raises(RemoteError) as info:
                await c.pwrite(b"x" * 4096, SIZE - 2048)
            # the spec says ENOSPC; qemu-nbd 7.2 answers EINVAL
            expect = {errno.ENOSPC, errno.EINVAL} if kind == "qemu-nbd" else {errno.ENOSPC}
            assert info.value.code in expect
            with pytest.raises(RemoteError) as info:
                await c.request(0, 0, 512, flags=1 << 9)  # READ with an unknown flag
            assert info.value.code == errno.EINVAL
            # an error reply leaves the connection usable
            assert await c.pread(MiB, 512) == b"\xab" * 512
        finally:
            await c.disconnect()

    _run(go())


@pytest.mark.parametrize("kind", SERVERS)
def test_read_only_export(kind: str, image: Path, start_server: ServerFactory) -> None:
    srv = start_server(kind, image, "qcow2", "-r")
    with SyncClient(srv.uri) as c:
        assert c.flags & TransmissionFlag.READ_ONLY
        assert c.pread(MiB, 4) == b"\xab" * 4
        with pytest.raises(RemoteError) as info:
            c.pwrite(b"x" * 512, 0)
        expect = {errno.EPERM, errno.EINVAL} if kind == "qemu-nbd" else {errno.EPERM}
        assert info.value.code in expect
        assert c.pread(0, 512) == bytes(512)


@pytest.mark.parametrize("kind", SERVERS)
def test_fast_zero_answer(kind: str, image: Path, start_server: ServerFactory) -> None:
    """FAST_ZERO either succeeds (and zeroes) or fails with ENOTSUP and changes nothing."""
    srv = start_server(kind, image, "qcow2", "--discard=unmap")
    with SyncClient(srv.uri) as c:
        if not c.flags & TransmissionFlag.SEND_FAST_ZERO:
            pytest.skip("server does not advertise FAST_ZERO")
        try:
            c.write_zeroes(MiB, 65536, fast_zero=True)
            assert c.pread(MiB, 65536) == bytes(65536)
        except RemoteError as e:
            assert e.code == errno.ENOTSUP
            assert c.pread(MiB, 65536) == b"\xab" * 65536


@pytest.mark.parametrize("kind", SERVERS)
def test_raw_export_over_tcp(kind: str, tmp_path: Path, start_server: ServerFactory) -> None:
    raw = tmp_path / "disk.raw"
    data = os.urandom(2 * MiB)
    raw.write_bytes(data)
    srv = start_server(kind, raw, "raw", tcp=True)
    with SyncClient(srv.uri) as c:
        assert c.size == 2 * MiB
        assert c.pread(12345, 70000) == data[12345 : 12345 + 70000]
        c.pwrite(b"\xee" * 512, 4096, fua=True)
    srv.stop()
    assert raw.read_bytes()[4096 : 4096 + 512] == b"\xee" * 512


@pytest.mark.parametrize("kind", SERVERS)
def test_disconnect_waits_for_in_flight(
    kind: str, image: Path, start_server: ServerFactory
) -> None:
    srv = start_server(kind, image)

    async def go() -> None:
        c: Client = await connect(srv.uri)
        tasks = [asyncio.ensure_future(c.pread(i * 65536, 65536)) for i in range(32)]
        await asyncio.sleep(0)
        await c.disconnect()
        results = await asyncio.gather(*tasks)
        assert b"".join(results) == bytes(_model()[: 32 * 65536])
        with pytest.raises(ConnectionError):
            await c.pread(0, 512)

    _run(go())


@pytest.mark.parametrize("kind", [p for p in SERVERS if p != "qemu-nbd"])
def test_extended_headers_64bit_lengths(
    kind: str, tmp_path: Path, start_server: ServerFactory
) -> None:
    """With extended headers a single WRITE_ZEROES / TRIM / BLOCK_STATUS spans > 4 GiB."""
    big = tmp_path / "big.qcow2"
    gib = 1 << 30
    _qemu_img("create", "-f", "qcow2", str(big), str(8 * gib))
    _qemu_io(big, "qcow2", "write -P 0x61 1G 64k", "write -P 0x62 6G 64k")
    srv = start_server(kind, big, "qcow2", "--discard=unmap")

    async def go() -> None:
        c = await connect(srv.uri, extended=True)
        try:
            assert c.extended and c.size == 8 * gib
            assert await c.pread(gib, 4) == b"aaaa"
            await c.write_zeroes(0, 5 * gib)  # length needs more than 32 bits
            assert await c.pread(gib, 65536) == bytes(65536)
            assert await c.pread(6 * gib, 4) == b"bbbb"
            status = await c.block_status(0, 8 * gib)
            extents = status[BASE_ALLOCATION]
            assert extents[0][1] & StateFlag.ZERO
            covered, pos = 0, 0
            for length, flags in extents:
                if pos <= 6 * gib < pos + length:
                    assert not flags & StateFlag.ZERO  # the data at 6 GiB is not zero
                pos += length
                covered += length
            assert covered > 0
            await c.trim(0, 6 * gib + 65536)
            await c.flush()
        finally:
            await c.disconnect()

    _run(go())


# --- a scripted server: out-of-order replies, chunk splitting, violations ----------------------
async def _scripted_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int
) -> None:
    """Minimal fixed-newstyle server side, written from doc/proto.md with plain struct."""
    writer.write(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3))
    await reader.readexactly(4)
    while True:
        _, opt, length = struct.unpack(">QII", await reader.readexactly(16))
        await reader.readexactly(length)

        def rep(kind: int, data: bytes = b"", opt: int = opt) -> None:
            writer.write(struct.pack(">QIII", 0x3E889045565A9, opt, kind, len(data)) + data)

        if opt == 8:  # STRUCTURED_REPLY
            rep(1)
        elif opt == 10:  # SET_META_CONTEXT: context id 7 for base:allocation
            rep(4, struct.pack(">I", 7) + b"base:allocation")
            rep(1)
        elif opt == 7:  # GO
            rep(3, struct.pack(">HQH", 0, size, 1 | 4 | 8))
            rep(1)
            return
        else:
            rep((1 << 31) + 1)


def _chunk(flags: int, rtype: int, cookie: int, payload: bytes) -> bytes:
    return struct.pack(">IHHQI", 0x668E33EF, flags, rtype, cookie, len(payload)) + payload


async def _serve_script(path: Path, script: Callable[..., object]) -> asyncio.Server:
    """A unix-socket server that handshakes, then runs ``script(reader, writer)``."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await _scripted_handshake(r, w, MiB)
            await script(r, w)  # type: ignore[misc]
            await w.drain()
        finally:
            w.close()

    return await asyncio.start_unix_server(handle, str(path))


def _read_requests(n: int) -> Callable[[asyncio.StreamReader], object]:
    async def read(reader: asyncio.StreamReader) -> list[tuple[int, int, int, int]]:
        out = []
        for _ in range(n):
            _, _, cmd, cookie, off, length = struct.unpack(">IHHQQI", await reader.readexactly(28))
            out.append((cmd, cookie, off, length))
        return out

    return read


def test_scripted_out_of_order_chunks_matched_by_cookie(tmp_path: Path) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        reqs = await _read_requests(4)(r)  # type: ignore[misc]
        (_, c1, o1, n1), (_, c2, o2, n2), (_, c3, _, _), (_, c4, _, _) = reqs
        # replies in reverse order, chunks of one read interleaved with another's
        w.write(_chunk(1, 5, c4, struct.pack(">IIIII", 7, 4096, 3, 8192, 0)))  # block status
        w.write(_chunk(0, 1, c2, struct.pack(">Q", o2 + 4) + b"B" * (n2 - 4)))
        w.write(_chunk(0, (1 << 15) + 1, c3, struct.pack(">IH", 5, 3) + b"bad"))
        w.write(_chunk(0, 2, c1, struct.pack(">QI", o1 + n1 // 2, n1 // 2)))  # second half hole
        w.write(_chunk(1, 1, c2, struct.pack(">Q", o2) + b"AAAA"))
        w.write(_chunk(1, 0, c3, b""))
        w.write(_chunk(1, 1, c1, struct.pack(">Q", o1) + b"x" * (n1 // 2)))
        await asyncio.sleep(0.1)

    async def go() -> None:
        sock = tmp_path / "scripted.sock"
        server = await _serve_script(sock, script)
        c = await connect(f"nbd+unix:///?socket={sock}")
        t1 = asyncio.ensure_future(c.pread(0, 1024))
        t2 = asyncio.ensure_future(c.pread(4096, 512))
        t3 = asyncio.ensure_future(c.pread(8192, 512))
        t4 = asyncio.ensure_future(c.block_status(0, 12288))
        assert await t1 == b"x" * 512 + bytes(512)
        assert await t2 == b"AAAA" + b"B" * 508
        with pytest.raises(RemoteError) as info:
            await t3
        assert info.value.code == errno.EIO and "bad" in str(info.value)
        assert await t4 == {BASE_ALLOCATION: [(4096, 3), (8192, 0)]}
        await c.close()
        server.close()

    _run(go())


@pytest.mark.parametrize("violation", ["unknown-cookie", "overlap", "bad-magic"])
def test_scripted_protocol_violations(tmp_path: Path, violation: str) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ((_, c1, o1, _), (_, c2, _, _)) = await _read_requests(2)(r)  # type: ignore[misc]
        if violation == "unknown-cookie":
            w.write(_chunk(1, 0, 0xFFFF, b""))
        elif violation == "overlap":
            w.write(_chunk(0, 1, c1, struct.pack(">Q", o1) + b"a" * 300))
            w.write(_chunk(1, 2, c1, struct.pack(">QI", o1 + 200, 312)))
            w.write(_chunk(1, 0, c2, b""))
        else:
            w.write(struct.pack(">IIQ", 0x12345678, 0, c1))
        await asyncio.sleep(0.1)

    async def go() -> None:
        sock = tmp_path / "scripted.sock"
        server = await _serve_script(sock, script)
        c = await connect(f"nbd+unix:///?socket={sock}")
        results = await asyncio.gather(c.pread(0, 512), c.flush(), return_exceptions=True)
        if violation == "overlap":
            # only the broken reply fails; the connection stays usable for the rest
            assert isinstance(results[0], RemoteProtocolError) and results[1] is None
        else:
            assert all(isinstance(x, RemoteProtocolError) for x in results), results
            with pytest.raises(ConnectionError):
                await c.pread(0, 512)
        await c.close()
        server.close()

    _run(go())
