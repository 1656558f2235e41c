"""Validate every request once, call the driver, answer.

All checks (command, flags, read-only, range, size) happen here before any driver
call; exceptions become NBD errors through the one table in :mod:`nbdqcow.errors`.
What a driver lacks is emulated here: FUA as a flush, WRITE_ZEROES as writes.

Small requests run inline on the event loop; large ones (and anything that syncs)
run in a worker thread.  Requests that overlap a deferred one (where either writes)
wait for it, so overlapping writes take effect in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from nbdqcow.block.cachestat import cached
from nbdqcow.block.driver import BlockDriver, DirtyBitmapSource, DirtyRun, Extent
from nbdqcow.block.zeros import ZERO_CHUNK, ZEROS, ZEROV
from nbdqcow.errors import (
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_ENOTSUP,
    NBD_EOVERFLOW,
    NBD_EPERM,
    NbdqcowError,
    NowaitUnsupported,
    WouldBlock,
    nbd_errno,
)
from nbdqcow.nbd.buffers import POOL, POOL_MIN
from nbdqcow.nbd.constants import (
    MAX_REQUEST,
    NBD_STATE_DIRTY,
    QEMU_ALLOCATION_DEPTH,
    Cmd,
    CmdFlag,
    StateFlag,
)
from nbdqcow.nbd.handshake import Negotiated
from nbdqcow.nbd.transmission import ReplyEncoder, Request
from nbdqcow.server.exports import Export
from nbdqcow.server.flow import FlowControl
from nbdqcow.server.ringio import LoopRing, ring_for
from nbdqcow.server.stats import LATENCY_CLASS, N_CMDS, now_ns
from nbdqcow.server.workers import WORKERS, WRITER

log = logging.getLogger("nbdqcow.server")

Buffer = bytes | bytearray | memoryview
Reply = list[Buffer]


class Leased(list[Buffer]):
    """A reply whose data lives in ``buf``, a pooled buffer: the connection gives it
    back to the pool once the transport has sent it."""

    __slots__ = ("buf",)

    def __init__(self, bufs: Reply, buf: bytearray) -> None:
        super().__init__(bufs)
        self.buf = buf

#: requests smaller than this run inline on the event loop
INLINE_LIMIT = 256 * 1024
#: larger READs are first tried on the event loop with data from the page cache only
#: (RWF_NOWAIT), and go to a worker thread when that would wait for the disk: on warm
#: data the thread hop (and the GIL hand-offs it takes) costs more than the copy
NOWAIT_MAX = 4 * 1024 * 1024
#: after this many misses in a row (cold data, O_DIRECT) stop trying for a while
NOWAIT_MISSES = 4
NOWAIT_PAUSE = 64
#: a small READ answered on the event loop that took longer than this waited for the
#: disk: the next small READs try the page cache only (RWF_NOWAIT) and go to a worker
#: thread when they would wait, so that cold reads reach the disk with the client's
#: queue depth instead of one at a time
COLD_READ_NS = 150_000
#: small READs served that way after the last one that missed the page cache
COLD_SPAN = 256
#: WRITEs of at least INLINE_LIMIT bytes also run on the event loop when they only copy
#: into the page cache (cache=writeback/unsafe, no FUA): handing them to the writer
#: thread cost a quarter of the server's CPU per byte (GIL hand-offs, wake-ups), more
#: than the copy it moved off the loop.  A write that took longer than SLOW_WRITE_NS
#: waited (dirty-page throttling, a lock): the next SLOW_SPAN large writes go to the
#: writer thread, then the loop tries again
BIG_WRITE_CACHES = frozenset({"writeback", "unsafe"})
#: larger WRITEs still go to the writer thread: the hop costs little against their copy,
#: and the event loop must not stop for milliseconds while other clients wait
BIG_WRITE_MAX = NOWAIT_MAX
SLOW_WRITE_NS = 4_000_000
SLOW_SPAN = 64
#: with io_uring, after a miss only every this many cold READs tries the page cache
#: first (the others go straight to the ring, whose workers serve cached data too): the
#: try costs a system call and an exception, and nearly every cold read misses (main
#: thread CPU per cold 4k read: 35-36 us without tries, 38-41 with every 4th, 36-47
#: with every one)
COLD_PROBE_EVERY = 8
#: structured READs at least this large look for holes through block status (smaller
#: ones are read and sent as one hole when they are all zeroes)
HOLE_SCAN_MIN = INLINE_LIMIT
#: BLOCK_STATUS over more than this runs in a worker thread
BLOCK_STATUS_INLINE = 8 * 1024 * 1024
#: descriptors of one dirty-bitmap reply at most (qemu's cap too); the rest of the range
#: is left to the client's next request, as the NBD spec allows
MAX_BITMAP_RUNS = 128 * 1024
_EVERYTHING = 1 << 64
#: NBD_CMD_CACHE copies backing data up in pieces of this size
COPY_ON_READ_CHUNK = 1 << 20
#: small structured READs whose data holds a zero sector ask block status for holes
SECTOR = 512
ZEROS_SECTOR = bytes(SECTOR)

_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_DF = int(CmdFlag.DF)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_READ = int(Cmd.READ)
_WRITER_CMDS = frozenset({int(Cmd.WRITE), int(Cmd.WRITE_ZEROES), int(Cmd.TRIM)})
_HOLE = int(StateFlag.HOLE)
_ZERO = int(StateFlag.ZERO)


def _with_data(reply: Reply, data: bytes | bytearray) -> Reply:
    """``reply`` as it goes out: Leased when ``data`` is a pooled buffer."""
    return Leased(reply, data) if isinstance(data, bytearray) else reply


def copy_on_read(drv: BlockDriver, off: int, n: int) -> None:
    """NBD_CMD_CACHE on a writable export, as qemu-nbd does it (copy-on-read): what
    [off, off+n) reads through the backing chain is written into the image itself, so
    later reads no longer go down the chain (zeros as a zero write: qemu-nbd 7.2 writes
    clusters full of zeros).  Ranges the image holds already are left alone; so is an
    image without a backing file."""
    pos, end = off, off + n
    while pos < end:
        for e in drv.block_status(pos, end - pos):
            s, t = max(e.start, pos), min(e.start + e.length, end)
            if t <= s:
                continue
            if e.depth > 0:  # from a backing file, or from none below one
                for p in range(s, t, COPY_ON_READ_CHUNK):
                    k = min(COPY_ON_READ_CHUNK, t - p)
                    data = drv.pread(p, k)
                    if drv.caps.write_zeroes and is_zero(data):
                        drv.write_zeroes(p, k, False, False)
                    else:
                        drv.pwrite(data, p)
            pos = t
            if pos >= end:
                break


def is_zero(data: Buffer) -> bool:
    """True when every byte of ``data`` is zero (memcmp speed, no copy of bytes)."""
    n = len(data)
    if n == 0:
        return True
    if isinstance(data, memoryview):
        whole = data.obj
        data = whole if isinstance(whole, bytes | bytearray) and len(whole) == n else data.tobytes()
    # most data is not zero: three probes settle it before any full comparison
    if data[0] or data[n - 1] or data[n >> 1]:
        return False
    for pos in range(0, n, ZERO_CHUNK):
        k = min(ZERO_CHUNK, n - pos)
        if not data.startswith(ZEROS if k == ZERO_CHUNK else _zeros(k), pos):
            return False
    return True


def holds_zero_sector(data: bytes | bytearray) -> bool:
    """True when ``data`` holds SECTOR zero bytes in a row, anywhere.  Such a run covers
    a position that is a multiple of SECTOR, so one zero byte among those positions is
    needed first: a 100 ns check that spares most reads of real data the full search
    (2-6 us on 4 KiB)."""
    return 0 in data[::SECTOR] and data.find(ZEROS_SECTOR) >= 0


_zero_cache: dict[int, bytes] = {}


def _zeros(k: int) -> bytes:
    z = _zero_cache.get(k)
    if z is None:
        if len(_zero_cache) >= 32:
            _zero_cache.clear()
        z = _zero_cache[k] = bytes(k)
    return z


def _allocation_flags(e: Extent) -> int:
    # HOLE means "a write here may allocate (or fail with ENOSPC)": a run whose host
    # space is kept (Extent.reserved, the preserve policy) is no hole even when zero
    return (0 if e.data or e.reserved else _HOLE) | (_ZERO if e.zero else 0)


def _depth_flags(e: Extent) -> int:
    return e.allocation_depth


def _dirty_flags(r: DirtyRun) -> int:
    return NBD_STATE_DIRTY if r.dirty else 0


class _Run(Protocol):
    @property
    def start(self) -> int: ...
    @property
    def length(self) -> int: ...


R = TypeVar("R", bound=_Run)


def descriptors(
    extents: Sequence[R], offset: int, length: int, status: Callable[[R], int],
    req_one: bool,
) -> list[tuple[int, int]]:
    """(length, flags) descriptors covering [offset, offset+length), equal neighbours merged."""
    end = offset + length
    out: list[list[int]] = []
    pos = offset
    for e in extents:
        s = max(e.start, pos)
        t = min(e.start + e.length, end)
        if t <= s:
            continue
        if s > pos:  # a gap the driver left out: report it as plain data
            out.append([s - pos, 0])
        f = status(e)
        if out and out[-1][1] == f:
            out[-1][0] += t - s
        else:
            out.append([t - s, f])
        pos = t
    if not out:
        out.append([length, 0])
    if req_one:
        out = out[:1]
    return [(n, f) for n, f in out]


def _uncorked(fn: Callable[[], None]) -> None:
    fn()


def _run_all(fns: list[Callable[[], None]]) -> None:
    for f in fns:
        f()


class _RingRef:
    """The loop's io_uring, looked up on first use (most connections never need it)."""

    __slots__ = ("loop", "ring", "looked")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ring: LoopRing | None = None
        self.looked = False

    def get(self) -> LoopRing | None:
        if not self.looked:
            self.looked = True
            self.ring = ring_for(self.loop)
        return self.ring


class Dispatcher:
    """Handles the requests of one connection."""

    def __init__(
        self,
        export: Export,
        neg: Negotiated,
        send: Callable[[Reply], None],
        flow: FlowControl,
        loop: asyncio.AbstractEventLoop,
        send_file: Callable[[bytes, int, int, int], bool] | None = None,
        corked: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.export = export
        self.stats = export.stats
        export.stats.connections_total += 1
        self._timing: tuple[int, int] | None = None  # (latency class, start) of the request
        self._started: dict[asyncio.Future[None], tuple[int, int]] = {}  # deferred ones
        self.driver = export.driver
        self.caps = export.driver.caps
        self.size = export.driver.size
        self.enc = ReplyEncoder(neg.structured, neg.extended)
        self.structured = neg.structured or neg.extended
        self.contexts: list[tuple[int, Callable[[Extent], int]]] = []
        self.bitmaps: list[tuple[int, DirtyBitmapSource]] = []
        for cid, name in neg.contexts.items():
            bitmap = export.bitmap(name)
            if bitmap is not None:
                self.bitmaps.append((cid, bitmap))
            else:
                status = _depth_flags if name == QEMU_ALLOCATION_DEPTH else _allocation_flags
                self.contexts.append((cid, status))
        self.send = send
        self.send_file = send_file
        self.flow = flow
        self.loop = loop
        self.writable = export.writable
        self.disconnecting = False
        self.tasks: set[asyncio.Task[None]] = set()  # requests waiting for overlapping ones
        self.pending = 0  # requests started and not answered yet (waiting or in a thread)
        self._charge = 0  # budget bytes of the request being handled (handle() -> _run)
        self._nowait_misses = 0
        self._nowait_skip = 0
        self._cold = 0  # > 0: small READs try RWF_NOWAIT first (see COLD_READ_NS)
        self._big_inline = export.cache in BIG_WRITE_CACHES
        # drivers that can tell a write needs no allocation (qcow2, raw); others: thread
        self._in_place: Callable[[int, int], bool] | None = getattr(
            export.driver, "writes_in_place", None)
        self._slow = 0  # > 0: large WRITEs go to the writer thread (see SLOW_WRITE_NS)
        self._probe_in = 0  # cold READs to send to the ring before the next RWF_NOWAIT try
        self._ring: _RingRef | None = _RingRef(loop)  # None: no io_uring here
        self._ring_done: list[Callable[[], None]] = []  # completions not answered yet
        self._corked = corked or _uncorked
        df = _DF if self.structured else 0
        pl = _PAYLOAD_LEN if neg.extended else 0
        self._allowed: dict[int, int] = {
            Cmd.READ: _FUA | df,
            Cmd.WRITE: _FUA | pl,
            Cmd.FLUSH: _FUA,
            Cmd.TRIM: _FUA,
            Cmd.CACHE: _FUA,
            Cmd.WRITE_ZEROES: _FUA | _NO_HOLE | _FAST_ZERO,
            Cmd.BLOCK_STATUS: _FUA | _REQ_ONE,
            Cmd.DISC: _FUA,
        }
        self._table: dict[int, Callable[[Request], None]] = {
            Cmd.READ: self._read,
            Cmd.WRITE: self._write,
            Cmd.FLUSH: self._flush,
            Cmd.TRIM: self._trim,
            Cmd.CACHE: self._cache,
            Cmd.WRITE_ZEROES: self._write_zeroes,
            Cmd.BLOCK_STATUS: self._block_status,
            Cmd.DISC: self._disc,
        }

    # --- entry --------------------------------------------------------------------------
    def handle(self, req: Request, charge: int = 0) -> None:
        """Answer ``req``.  ``charge``: the memory-budget bytes it holds (its WRITE
        payload, or its READ reply); they go back when it is answered here, or travel
        with it when it runs later."""
        if charge:
            self._charge = charge
            try:
                self._handle(req)
            finally:
                if self._charge:  # answered here: its reply is with the transport now
                    self._settle(req.cmd, self._charge)
                    self._charge = 0
        else:
            self._handle(req)

    def _handle(self, req: Request) -> None:
        cmd = req.cmd
        handler = self._table.get(cmd)
        st = self.stats
        if handler is None:
            st.requests[N_CMDS - 1] += 1
            self._fail(req, NBD_EINVAL, f"unknown command {cmd}")
            return
        st.requests[cmd] += 1
        st.bytes[cmd] += req.length
        if req.flags & ~self._allowed[cmd]:
            self._fail(req, NBD_EINVAL, f"invalid flags {req.flags:#x} for command {cmd}")
            return
        cls = LATENCY_CLASS[cmd]
        if cls < 0:
            handler(req)
            return
        # latency: measured here when answered inline, else when it completes (_complete)
        t0 = now_ns()
        pending = self.pending
        self._timing = (cls, t0)
        try:
            handler(req)
        finally:
            self._timing = None
        if self.pending == pending:
            st.observe(cls, now_ns() - t0)

    def unlink(self) -> None:
        """The connection is gone: drop the table of bound methods (a reference cycle
        that would keep this object, and what it refers to, until a cyclic collection)."""
        self._table = {}

    def _settle(self, cmd: int, charge: int) -> None:
        if cmd == _READ:
            self.flow.sent(charge)  # charged until the transport has sent it
        else:
            self.flow.release(charge)  # a WRITE payload: done with

    def _fail(self, req: Request, code: int, msg: str) -> None:
        self.stats.error(code)
        self.send([self.enc.error(req.cookie, code, msg, req.offset)])

    def _error_reply(self, req: Request, exc: BaseException) -> Reply:
        if not isinstance(exc, NbdqcowError | OSError):
            log.error("request %d failed", req.cmd, exc_info=exc)
        code = nbd_errno(exc)
        self.stats.error(code)
        return [self.enc.error(req.cookie, code, str(exc), req.offset)]

    def _call(self, req: Request, fn: Callable[..., Reply], *args: object) -> Reply:
        """``fn(*args)``, or the error reply for what it raised."""
        try:
            return fn(*args)
        except Exception as e:
            return self._error_reply(req, e)

    def _run(
        self, req: Request, start: int, end: int, write: bool, fn: Callable[[], Reply],
        inline: bool, attempt: Callable[[], Reply | None] | None = None,
    ) -> None:
        """Answer ``req`` with ``fn()``: right here when ``inline``, else in a worker
        thread, after the requests it overlaps.  ``attempt``, when given, is tried here
        first and may raise WouldBlock (then ``fn`` runs in a thread)."""
        tracker = self.export.tracker
        waits = tracker.conflicts(start, end, write) if tracker.ops else []
        if not waits:
            if inline:
                self.send(self._call(req, fn))
                return
            if attempt is not None and self._try_nowait():
                try:
                    reply = attempt()
                except WouldBlock:
                    self._nowait_missed()
                except Exception as e:
                    self.send(self._error_reply(req, e))
                    return
                else:
                    self._nowait_misses = 0
                    if reply is not None:  # None: answered already (sendfile)
                        self.send(reply)
                    return
        fut: asyncio.Future[None] = self.loop.create_future()
        if self._timing is not None:
            self._started[fut] = self._timing
        tracker.add(start, end, write, fut)
        nbytes = req.length if req.cmd in (Cmd.READ, Cmd.WRITE) else 0
        charge, self._charge = self._charge, 0  # settled when it is answered
        self.flow.start(nbytes)
        self.pending += 1
        if waits:
            task = self.loop.create_task(
                self._after(waits, req, fn, inline, fut, nbytes, charge))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            self._start(req, fn, inline, fut, nbytes, charge)

    async def _after(
        self, waits: list[asyncio.Future[None]], req: Request, fn: Callable[[], Reply],
        inline: bool, fut: asyncio.Future[None], nbytes: int, charge: int,
    ) -> None:
        try:
            for w in waits:
                await w
        except BaseException:  # cancelled (shutdown): nothing will answer it
            self._complete(fut, nbytes, None, req.cmd, charge)
            raise
        self._start(req, fn, inline, fut, nbytes, charge)

    def _start(
        self, req: Request, fn: Callable[[], Reply], inline: bool, fut: asyncio.Future[None],
        nbytes: int, charge: int,
    ) -> None:
        cmd = req.cmd
        if inline:
            self._complete(fut, nbytes, self._call(req, fn), cmd, charge)
        elif cmd != _READ or not self._read_by_ring(req, fn, fut, nbytes, charge):
            self._in_thread(req, fn, fut, nbytes, charge)

    def _in_thread(
        self, req: Request, fn: Callable[[], Reply], fut: asyncio.Future[None], nbytes: int,
        charge: int,
    ) -> None:
        cmd = req.cmd
        lane = WRITER if cmd in _WRITER_CMDS else WORKERS
        lane.submit(lambda: self._call(req, fn),
                    lambda reply: self._complete(fut, nbytes, reply, cmd, charge),
                    self.loop)

    def _read_by_ring(
        self, req: Request, fn: Callable[[], Reply], fut: asyncio.Future[None], nbytes: int,
        charge: int,
    ) -> bool:
        """Speed trick (cold data): a READ that would wait for the disk goes to the
        loop's io_uring instead of a worker thread -- no thread hop, no GIL hand-off, and
        the disk sees every read the client has in flight.  Only a READ whose reply is
        one piece of data stored contiguously in one host file (``host_extent``); False
        (nothing started) otherwise, or where io_uring is unusable."""
        n = req.length
        if self._ring is None or n == 0 or (
                self.structured and n >= HOLE_SCAN_MIN and not req.flags & _DF
                and self.caps.block_status):
            return False
        ring = self._ring.get()
        if ring is None:
            self._ring = None
            return False
        try:
            ext = self.driver.host_extent(req.offset, n)
        except Exception:  # noqa: BLE001 - the usual path reports it
            return False
        if ext is None:
            return False
        buf = POOL.take(n)

        def answer() -> None:
            self._complete(fut, nbytes, self._call(req, self._reply_of, req, buf), _READ,
                           charge)

        def done(res: int) -> None:
            if res == n:
                if not self._ring_done:
                    ring.after_reap(self._answer_ring_reads)
                self._ring_done.append(answer)
            else:  # an error or a short read: the usual path says what happened
                POOL.give(buf)
                self._in_thread(req, fn, fut, nbytes, charge)

        if ring.read(ext[0], buf, ext[1], done):
            return True
        POOL.give(buf)
        return False

    def _answer_ring_reads(self) -> None:
        """The replies of the reads one look at the ring found done, in one write."""
        answers, self._ring_done = self._ring_done, []
        self._corked(lambda: _run_all(answers))

    def _complete(self, fut: asyncio.Future[None], nbytes: int, reply: Reply | None,
                  cmd: int = 0, charge: int = 0) -> None:
        self.pending -= 1
        timing = self._started.pop(fut, None)
        if timing is not None:
            self.stats.observe(timing[0], now_ns() - timing[1])
        try:
            if reply is not None:
                self.send(reply)
        finally:
            fut.set_result(None)
            self.export.tracker.remove(fut)
            if charge:
                self._settle(cmd, charge)
            self.flow.finish(nbytes)

    def _try_nowait(self) -> bool:
        if self._nowait_skip:
            self._nowait_skip -= 1
            return False
        return True

    def _nowait_missed(self) -> None:
        self._nowait_misses += 1
        if self._nowait_misses >= NOWAIT_MISSES:
            self._nowait_misses = 0
            self._nowait_skip = NOWAIT_PAUSE

    # --- commands -----------------------------------------------------------------------
    def _read(self, req: Request) -> None:
        off, n = req.offset, req.length
        if n > MAX_REQUEST:
            code = NBD_EOVERFLOW if req.flags & _DF else NBD_EINVAL
            self._fail(req, code, f"read of {n} bytes is larger than {MAX_REQUEST}")
            return
        if off + n > self.size:
            self._fail(req, NBD_EINVAL, "read past the end of the export")
            return
        read = self._read_structured if self.structured else self._read_simple
        if n < INLINE_LIMIT and not self.export.tracker.writes:  # the common case, directly
            self._read_small(req, read)
            return
        if n < INLINE_LIMIT and self._cold:  # cold data: never wait for the disk here
            self._run(req, off, off + n, False, lambda: read(req, False), False,
                      lambda: read(req, True))
            return

        def attempt() -> Reply | None:
            return None if self._read_spliced(req) else read(req, True)

        self._run(req, off, off + n, False, lambda: read(req, False), n < INLINE_LIMIT,
                  attempt if n <= NOWAIT_MAX else None)

    def _read_small(self, req: Request, read: Callable[[Request, bool], Reply]) -> None:
        """A small READ on the event loop.  Warm data: read right here.  After a read
        that waited for the disk (cold data): hand it to the io_uring (or a worker
        thread), trying the page cache first on every COLD_PROBE_EVERY-th only, so the
        loop never waits for the disk while other requests could be under way."""
        if not self._cold:
            t0 = now_ns()
            self.send(self._call(req, read, req, False))
            if now_ns() - t0 > COLD_READ_NS:
                self._cold = COLD_SPAN
            return
        off, n = req.offset, req.length
        if self._probe_in and self._ring is not None:
            self._probe_in -= 1  # most cold reads miss: straight to the ring, no probe
            self._run(req, off, off + n, False, lambda: read(req, False), False)
            return
        try:
            reply = read(req, True)
        except WouldBlock as e:
            # a file system that cannot tell cached data (tmpfs): every such read would
            # go to a thread; back to reading here (timed) after this one
            self._cold = 0 if isinstance(e, NowaitUnsupported) else COLD_SPAN
            self._probe_in = COLD_PROBE_EVERY - 1 if self._cold else 0
            self._run(req, off, off + n, False, lambda: read(req, False), False)
            return
        except Exception as e:
            reply = self._error_reply(req, e)
        self._cold -= 1
        self.send(reply)

    def _read_spliced(self, req: Request) -> bool:
        """Answer a large READ with sendfile(2) from the page cache when its data is
        stored contiguously and cached (no copy through Python at all)."""
        if self.send_file is None:
            return False
        off, n = req.offset, req.length
        ext = self.driver.host_extent(off, n)
        if ext is None or not cached(ext[0], ext[1], n):
            return False
        if self.structured:
            if not req.flags & _DF and self.caps.block_status and any(
                    e.zero for e in self.driver.block_status(off, n)):
                return False  # zero runs go out as holes: the usual path
            head = self.enc.data(req.cookie, off, n, True, off)
        else:
            head = self.enc.read_simple(req.cookie)
        return self.send_file(head, ext[0], ext[1], n)

    def _fetch(self, off: int, n: int, nowait: bool) -> bytes | bytearray:
        """The data of [off, off+n): fresh bytes when small, else a pooled buffer (its
        reply goes out as Leased).  A WouldBlock gives the pooled buffer straight back."""
        if n < POOL_MIN:
            if not nowait:
                return self.driver.pread(off, n)
            small = bytearray(n)
            self.driver.preadinto(off, memoryview(small), True)
            return small
        buf = POOL.take(n)
        try:
            self.driver.preadinto(off, memoryview(buf), nowait)
        except WouldBlock:
            POOL.give(buf)
            raise
        return buf

    def _reply_of(self, req: Request, data: bytes | bytearray) -> Reply:
        """The reply to ``req`` carrying ``data``, all of its range in one piece (a
        structured reply says "hole" instead when it is all zeroes, unless DF)."""
        if not self.structured:
            return _with_data([self.enc.read_simple(req.cookie), data], data)
        off, n = req.offset, req.length
        df = req.flags & _DF
        if not df and is_zero(data):
            if isinstance(data, bytearray):
                POOL.give(data)
            return [self.enc.hole(req.cookie, off, n, True, off)]
        if (not df and n >= 2 * SECTOR and self.caps.block_status
                and holds_zero_sector(data)):
            split = self._split_small(req, data)
            if split is not None:
                return split
        return _with_data([self.enc.data(req.cookie, off, n, True, off), data], data)

    def _read_simple(self, req: Request, nowait: bool) -> Reply:
        if not req.length:
            return [self.enc.read_simple(req.cookie)]
        return self._reply_of(req, self._fetch(req.offset, req.length, nowait))

    def _read_structured(self, req: Request, nowait: bool) -> Reply:
        enc, drv, cookie, off, n = self.enc, self.driver, req.cookie, req.offset, req.length
        df = bool(req.flags & _DF)
        if n == 0:
            return [enc.none(cookie, off)]
        if df or n < HOLE_SCAN_MIN or not self.caps.block_status:
            return self._reply_of(req, self._fetch(off, n, nowait))
        runs: list[list[int]] = []  # [start, length, zero]
        pos, end = off, off + n
        for e in drv.block_status(off, n):
            s, t = max(e.start, pos), min(e.start + e.length, end)
            if t <= s:
                continue
            z = 1 if e.zero else 0
            if runs and runs[-1][2] == z and runs[-1][0] + runs[-1][1] == s:
                runs[-1][1] += t - s
            else:
                runs.append([s, t - s, z])
            pos = t
        if pos < end:
            runs.append([pos, end - pos, 0])
        out: Reply = []
        last = len(runs) - 1
        buf = POOL.take(n)  # n >= HOLE_SCAN_MIN: pooled
        mv = memoryview(buf)
        try:
            for i, (s, length, z) in enumerate(runs):
                if z:
                    out.append(enc.hole(cookie, s, length, i == last, off))
                else:
                    piece = mv[s - off : s - off + length]
                    drv.preadinto(s, piece, nowait)
                    out.append(enc.data(cookie, s, length, i == last, off))
                    out.append(piece)
        except WouldBlock:
            POOL.give(buf)  # nothing was sent: the views into it die with this reply
            raise
        return Leased(out, buf)

    def _split_small(self, req: Request, data: bytes | bytearray) -> Reply | None:
        """A small structured READ whose data has a zero sector: its zero runs (by block
        status, and all-zero in the data read) go out as holes, its data as data chunks,
        in offset order, as qemu-nbd sends them.  None when it is all data."""
        enc, cookie, off, n = self.enc, req.cookie, req.offset, req.length
        mv = memoryview(data)
        runs: list[tuple[int, int, bool]] = []  # start (relative), end, hole
        try:
            extents = self.driver.block_status(off, n)
        except Exception:  # noqa: BLE001 - the data was read: send it as one chunk
            return None
        for e in extents:
            s, t = max(e.start - off, 0), min(e.start + e.length - off, n)
            if t <= s:
                continue
            hole = e.zero and is_zero(mv[s:t])
            if runs and runs[-1][2] == hole and runs[-1][1] == s:
                runs[-1] = (runs[-1][0], t, hole)
            else:
                runs.append((s, t, hole))
        if runs and runs[-1][1] < n:
            runs.append((runs[-1][1], n, False))
        if len(runs) < 2:
            return None
        out: Reply = []
        last = len(runs) - 1
        for i, (s, t, hole) in enumerate(runs):
            if hole:
                out.append(enc.hole(cookie, off + s, t - s, i == last, off))
            else:
                out.append(enc.data(cookie, off + s, t - s, i == last, off))
                out.append(mv[s:t])
        return _with_data(out, data)

    def _check_write(self, req: Request) -> bool:
        if not self.writable:
            self._fail(req, NBD_EPERM, "export is read-only")
            return False
        if req.offset + req.length > self.size:
            self._fail(req, NBD_ENOSPC, "write past the end of the export")
            return False
        return True

    def _fua(self, req: Request) -> bool:
        return bool(req.flags & _FUA) or self.export.writethrough

    def _write(self, req: Request) -> None:
        data = req.payload
        if data is None:
            self._fail(req, NBD_EINVAL, f"write of {req.length} bytes is larger than {MAX_REQUEST}")
            return
        if not self._check_write(req):
            return
        off, n = req.offset, req.length
        fua = self._fua(req)
        native = self.caps.native_fua
        drv, enc, cookie = self.driver, self.enc, req.cookie
        detect = self.export.detect_zeroes != "off"

        def fn() -> Reply:
            if detect and is_zero(data):
                self._zero(off, n, self.export.detect_zeroes == "unmap"
                           and self.export.discard == "unmap", False)
                if fua:
                    drv.flush()
            else:
                drv.pwrite(data, off, fua and native)
                if isinstance(data, bytearray):
                    POOL.give(data)  # the driver keeps no reference to it
                if fua and not native:
                    drv.flush()
            return [enc.ok(cookie, off)]

        if n < INLINE_LIMIT or fua or not self._write_here(off, n):
            self._run(req, off, off + n, True, fn, n < INLINE_LIMIT and not fua)
            return

        def timed() -> Reply:
            t0 = now_ns()
            try:
                return fn()
            finally:
                if now_ns() - t0 > SLOW_WRITE_NS:
                    self._slow = SLOW_SPAN

        self._run(req, off, off + n, True, timed, True)

    def _write_here(self, off: int, n: int) -> bool:
        """A large WRITE without FUA: on the event loop when it only copies into the
        page cache (the driver says it needs no allocation: an allocating write may
        have to sync metadata), up to BIG_WRITE_MAX bytes, unless a recent one there
        was slow (then SLOW_SPAN go to the writer thread)."""
        probe = self._in_place
        if not self._big_inline or n > BIG_WRITE_MAX or probe is None:
            return False
        if self._slow:
            self._slow -= 1
            return False
        return probe(off, n)

    def _zero(self, off: int, n: int, may_unmap: bool, fast: bool) -> None:
        drv = self.driver
        if self.caps.write_zeroes:
            drv.write_zeroes(off, n, may_unmap, fast)
            return
        pos, end = off, off + n
        while pos < end:
            k = min(ZERO_CHUNK, end - pos)
            drv.pwrite(ZEROV[:k], pos)
            pos += k

    def _write_zeroes(self, req: Request) -> None:
        if not self._check_write(req):
            return
        fast = bool(req.flags & _FAST_ZERO)
        if fast and not (self.caps.write_zeroes and self.caps.fast_zero):
            self._fail(req, NBD_ENOTSUP, "cannot write zeroes quickly")
            return
        off, n = req.offset, req.length
        may_unmap = not req.flags & _NO_HOLE and self.export.discard == "unmap"
        fua = self._fua(req)
        drv, enc, cookie = self.driver, self.enc, req.cookie

        def fn() -> Reply:
            if n:
                self._zero(off, n, may_unmap, fast)
            if fua:
                drv.flush()
            return [enc.ok(cookie, off)]

        self._run(req, off, off + n, True, fn, n < INLINE_LIMIT and not fua)

    def _trim(self, req: Request) -> None:
        if not self._check_write(req):
            return
        off, n = req.offset, req.length
        fua = self._fua(req)
        drv, enc, cookie = self.driver, self.enc, req.cookie
        do_it = n > 0 and self.export.can_trim  # --discard=ignore: answered, no effect

        def fn() -> Reply:
            if do_it:
                drv.discard(off, n)
            if fua:
                drv.flush()
            return [enc.ok(cookie, off)]

        self._run(req, off, off + n, True, fn, n < INLINE_LIMIT and not fua)

    def _flush(self, req: Request) -> None:
        if req.offset or req.length:
            self._fail(req, NBD_EINVAL, "flush offset and length must be zero")
            return
        drv, enc, cookie = self.driver, self.enc, req.cookie
        if not self.writable or self.export.cache == "unsafe":
            self.send([enc.ok(cookie)])
            return

        def fn() -> Reply:
            drv.flush()
            return [enc.ok(cookie)]

        self._run(req, 0, _EVERYTHING, True, fn, False)

    def _cache(self, req: Request) -> None:
        off, n = req.offset, req.length
        if off + n > self.size:
            self._fail(req, NBD_EINVAL, "cache request past the end of the export")
            return
        if not (self.writable and self.caps.block_status and n):
            self.send([self.enc.ok(req.cookie, off)])
            return
        drv, enc, cookie = self.driver, self.enc, req.cookie

        def fn() -> Reply:
            copy_on_read(drv, off, n)
            return [enc.ok(cookie, off)]

        # ordered like a write: a client write to the range is never undone by it
        self._run(req, off, off + n, True, fn, False)

    def _block_status(self, req: Request) -> None:
        off, n = req.offset, req.length
        if not self.contexts and not self.bitmaps:
            self._fail(req, NBD_EINVAL, "no metadata context was negotiated")
            return
        if n == 0 or off + n > self.size:
            self._fail(req, NBD_EINVAL, "block status range is empty or past the end")
            return
        req_one = bool(req.flags & _REQ_ONE)
        enc, drv, caps, cookie = self.enc, self.driver, self.caps, req.cookie
        contexts, bitmaps = self.contexts, self.bitmaps

        def fn() -> Reply:
            answers: list[tuple[int, list[tuple[int, int]]]] = []
            if contexts:
                if caps.block_status:
                    extents = drv.block_status(off, n)
                else:
                    extents = [Extent(off, n, True, True, False, 0, None)]
                answers += [(cid, descriptors(extents, off, n, status, req_one))
                            for cid, status in contexts]
            for cid, bitmap in bitmaps:
                runs = bitmap.dirty_runs(off, n, 1 if req_one else MAX_BITMAP_RUNS)
                answers.append((cid, descriptors(runs, off, n, _dirty_flags, req_one)))
            last = len(answers) - 1
            return [enc.block_status(cookie, cid, descs, i == last, off)
                    for i, (cid, descs) in enumerate(answers)]

        self._run(req, off, off + n, False, fn, n <= BLOCK_STATUS_INLINE)

    def _disc(self, req: Request) -> None:
        self.disconnecting = True
