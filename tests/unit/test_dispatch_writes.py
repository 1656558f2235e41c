"""Where the dispatcher runs WRITEs: large ones on the event loop when they only copy into
the page cache, in the writer thread after a slow one, with FUA, or with O_DIRECT."""

from __future__ import annotations

import asyncio
import threading

import pytest
from dispatchfakes import Driver, dispatcher, settle, write

from nbdqcow.nbd.constants import CmdFlag
from nbdqcow.server import dispatch
from nbdqcow.server.dispatch import BIG_WRITE_MAX, INLINE_LIMIT, SLOW_SPAN

MiB = 1 << 20


@pytest.mark.parametrize("cache", ["writeback", "unsafe"])
def test_large_write_runs_on_the_event_loop(cache: str) -> None:
    async def main() -> None:
        drv, replies = Driver(8 * MiB), []  # type: ignore[var-annotated]
        d = dispatcher(cache, drv, replies)
        data = bytes(range(256)) * (MiB // 256)
        d.handle(write(1, MiB, data))
        assert len(replies) == 1  # answered right here, before any await
        assert drv.threads == [threading.current_thread().name]
        assert drv.data[MiB : 2 * MiB] == data

    asyncio.run(main())


@pytest.mark.parametrize("cache", ["none", "writethrough", "directsync"])
def test_large_write_waits_in_a_thread_where_it_may_wait_for_the_disk(cache: str) -> None:
    async def main() -> None:
        drv, replies = Driver(8 * MiB), []  # type: ignore[var-annotated]
        d = dispatcher(cache, drv, replies)
        d.handle(write(1, 0, b"\1" * INLINE_LIMIT))
        assert replies == []  # handed to the writer thread
        await settle(replies, 1)
        assert drv.threads and drv.threads[0] != threading.current_thread().name

    asyncio.run(main())


def test_very_large_write_goes_to_the_writer_thread() -> None:
    async def main() -> None:
        drv, replies = Driver(2 * BIG_WRITE_MAX), []  # type: ignore[var-annotated]
        d = dispatcher("writeback", drv, replies)
        d.handle(write(1, 0, b"\1" * BIG_WRITE_MAX))  # the largest one on the loop
        assert len(replies) == 1
        d.handle(write(2, 0, b"\2" * (BIG_WRITE_MAX + 1)))  # the loop must not stop long
        assert len(replies) == 1
        await settle(replies, 2)
        me = threading.current_thread().name
        assert drv.threads[0] == me and drv.threads[1] != me
        assert drv.data[: BIG_WRITE_MAX + 1] == b"\2" * (BIG_WRITE_MAX + 1)

    asyncio.run(main())


def test_allocating_write_goes_to_the_writer_thread() -> None:
    async def main() -> None:
        drv, replies = Driver(8 * MiB), []  # type: ignore[var-annotated]
        drv.in_place = False  # it would allocate (and may sync metadata)
        d = dispatcher("writeback", drv, replies)
        d.handle(write(1, 0, b"\3" * MiB))
        assert replies == []
        await settle(replies, 1)
        assert drv.threads[0] != threading.current_thread().name

    asyncio.run(main())


def test_fua_write_goes_to_the_writer_thread() -> None:
    async def main() -> None:
        drv, replies = Driver(8 * MiB), []  # type: ignore[var-annotated]
        d = dispatcher("writeback", drv, replies)
        d.handle(write(1, 0, b"\2" * MiB, int(CmdFlag.FUA)))
        assert replies == []
        await settle(replies, 1)
        assert drv.threads[0] != threading.current_thread().name
        assert drv.flushes == 1  # no native FUA: emulated by a flush

    asyncio.run(main())


def test_after_a_slow_write_the_next_ones_go_to_the_writer_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatch, "SLOW_WRITE_NS", 1_000_000)

    async def main() -> None:
        drv, replies = Driver(8 * MiB), []  # type: ignore[var-annotated]
        d = dispatcher("writeback", drv, replies)
        me = threading.current_thread().name
        drv.delay = 0.005  # waited (as dirty-page throttling would make it)
        d.handle(write(1, 0, b"\3" * INLINE_LIMIT))
        drv.delay = 0.0
        assert len(replies) == 1 and drv.threads == [me]
        for i in range(SLOW_SPAN):
            d.handle(write(2 + i, INLINE_LIMIT * (i % 8), b"\4" * INLINE_LIMIT))
        await settle(replies, 1 + SLOW_SPAN)
        assert all(t != me for t in drv.threads[1:])
        d.handle(write(99, 0, b"\5" * INLINE_LIMIT))  # the span is over: back on the loop
        assert len(replies) == 2 + SLOW_SPAN and drv.threads[-1] == me
        assert drv.data[:INLINE_LIMIT] == b"\5" * INLINE_LIMIT

    asyncio.run(main())


def test_overlapping_writes_keep_arrival_order_across_loop_and_thread() -> None:
    async def main() -> None:
        drv, replies = Driver(8 * MiB), []  # type: ignore[var-annotated]
        d = dispatcher("writeback", drv, replies)
        drv.delay = 0.05
        d.handle(write(1, 0, b"\6" * MiB, int(CmdFlag.FUA)))  # writer thread, slow
        drv.delay = 0.0
        d.handle(write(2, MiB // 2, b"\7" * MiB))  # overlaps: must land after it
        assert replies == []
        await settle(replies, 2)
        assert drv.data[: MiB // 2] == b"\6" * (MiB // 2)
        assert drv.data[MiB // 2 : MiB // 2 + MiB] == b"\7" * MiB

    asyncio.run(main())
