"""Where the dispatcher runs WRITEs: large ones on the event loop when they only copy into
the page cache, in the writer thread after a slow one, with FUA, or with O_DIRECT."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from nbdqcow.block.driver import Capabilities
from nbdqcow.nbd.constants import Cmd, CmdFlag
from nbdqcow.nbd.handshake import Negotiated
from nbdqcow.nbd.transmission import Request
from nbdqcow.server import dispatch
from nbdqcow.server.dispatch import INLINE_LIMIT, SLOW_SPAN, Dispatcher
from nbdqcow.server.exports import Export
from nbdqcow.server.flow import FlowControl

MiB = 1 << 20


class Driver:
    """A bytearray image that records the thread each write ran in."""

    caps = Capabilities(writable=True, flush=True)

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.threads: list[str] = []
        self.delay = 0.0
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> None:
        self.threads.append(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        self.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1


class Transport:
    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def _dispatcher(cache: str, drv: Driver, replies: list[object]) -> Dispatcher:
    loop = asyncio.get_running_loop()
    export = Export("", drv, cache=cache)  # type: ignore[arg-type]
    neg = Negotiated(export.info())
    flow = FlowControl(Transport())  # type: ignore[arg-type]
    return Dispatcher(export, neg, replies.append, flow, loop)


def _write(cookie: int, offset: int, data: bytes, flags: int = 0) -> Request:
    return Request(int(Cmd.WRITE), flags, cookie, offset, len(data), bytearray(data))


async def _settle(replies: list[object], n: int) -> None:
    for _ in range(500):
        if len(replies) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(replies)} of {n} replies")


@pytest.mark.parametrize("cache", ["writeback", "unsafe"])
def test_large_write_runs_on_the_event_loop(cache: str) -> None:
    async def main() -> None:
        drv, replies = Driver(8 * MiB), []  # type: ignore[var-annotated]
        d = _dispatcher(cache, drv, replies)
        data = bytes(range(256)) * (MiB // 256)
        d.handle(_write(1, MiB, data))
        assert len(replies) == 1  # answered right here, before any await
        assert drv.threads == [threading.current_thread().name]
        assert drv.data[MiB : 2 * MiB] == data

    asyncio.run(main())


@pytest.mark.parametrize("cache", ["none", "writethrough", "directsync"])
def test_large_write_waits_in_a_thread_where_it_may_wait_for_the_disk(cache: str) -> None:
    async def main() -> None:
        drv, replies = Driver(8 * MiB), []  # type: ignore[var-annotated]
        d = _dispatcher(cache, drv, replies)
        d.handle(_write(1, 0, b"\1" * INLINE_LIMIT))
        assert replies == []  # handed to the writer thread
        await _settle(replies, 1)
        assert drv.threads and drv.threads[0] != threading.current_thread().name

    asyncio.run(main())


def test_fua_write_goes_to_the_writer_thread() -> None:
    async def main() -> None:
        drv, replies = Driver(8 * MiB), []  # type: ignore[var-annotated]
        d = _dispatcher("writeback", drv, replies)
        d.handle(_write(1, 0, b"\2" * MiB, int(CmdFlag.FUA)))
        assert replies == []
        await _settle(replies, 1)
        assert drv.threads[0] != threading.current_thread().name
        assert drv.flushes == 1  # no native FUA: emulated by a flush

    asyncio.run(main())


def test_after_a_slow_write_the_next_ones_go_to_the_writer_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatch, "SLOW_WRITE_NS", 1_000_000)

    async def main() -> None:
        drv, replies = Driver(8 * MiB), []  # type: ignore[var-annotated]
        d = _dispatcher("writeback", drv, replies)
        me = threading.current_thread().name
        drv.delay = 0.005  # waited (as dirty-page throttling would make it)
        d.handle(_write(1, 0, b"\3" * INLINE_LIMIT))
        drv.delay = 0.0
        assert len(replies) == 1 and drv.threads == [me]
        for i in range(SLOW_SPAN):
            d.handle(_write(2 + i, INLINE_LIMIT * (i % 8), b"\4" * INLINE_LIMIT))
        await _settle(replies, 1 + SLOW_SPAN)
        assert all(t != me for t in drv.threads[1:])
        d.handle(_write(99, 0, b"\5" * INLINE_LIMIT))  # the span is over: back on the loop
        assert len(replies) == 2 + SLOW_SPAN and drv.threads[-1] == me
        assert drv.data[:INLINE_LIMIT] == b"\5" * INLINE_LIMIT

    asyncio.run(main())


def test_overlapping_writes_keep_arrival_order_across_loop_and_thread() -> None:
    async def main() -> None:
        drv, replies = Driver(8 * MiB), []  # type: ignore[var-annotated]
        d = _dispatcher("writeback", drv, replies)
        drv.delay = 0.05
        d.handle(_write(1, 0, b"\6" * MiB, int(CmdFlag.FUA)))  # writer thread, slow
        drv.delay = 0.0
        d.handle(_write(2, MiB // 2, b"\7" * MiB))  # overlaps: must land after it
        assert replies == []
        await _settle(replies, 2)
        assert drv.data[: MiB // 2] == b"\6" * (MiB // 2)
        assert drv.data[MiB // 2 : MiB // 2 + MiB] == b"\7" * MiB

    asyncio.run(main())
