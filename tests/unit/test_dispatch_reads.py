"""Where the dispatcher runs small READs after one that was slow (cold data): the page
cache first, a worker thread on a miss -- unless the file system cannot tell (tmpfs)."""

from __future__ import annotations

import asyncio
import threading

from dispatchfakes import Driver, dispatcher, read, settle

from nbdqcow.server import dispatch
from nbdqcow.server.dispatch import COLD_SPAN

MiB = 1 << 20


def _run(nowait: bool) -> tuple[list[str], int]:
    async def main() -> tuple[list[str], int]:
        drv, replies = Driver(MiB), []  # type: ignore[var-annotated]
        drv.nowait = nowait
        drv.data[:] = bytes(range(256)) * (MiB // 256)
        d = dispatcher("writeback", drv, replies)
        drv.delay = 0.002  # slower than COLD_READ_NS: cold from now on
        d.handle(read(1, 0, 4096))
        drv.delay = 0.0
        assert len(replies) == 1 and d._cold == COLD_SPAN
        for i in range(2, 6):
            d.handle(read(i, 4096 * i, 4096))
            await settle(replies, i)
        return drv.threads, d._cold

    return asyncio.run(main())


def test_cold_reads_try_the_page_cache_first() -> None:
    threads, cold = _run(nowait=True)
    me = threading.current_thread().name
    assert threads == [me] * 5  # every later read came from the page cache, here
    assert cold == COLD_SPAN - 4


def test_without_rwf_nowait_one_read_goes_to_a_thread_then_reads_stay_here() -> None:
    threads, cold = _run(nowait=False)
    me = threading.current_thread().name
    # the first read after the slow one cannot ask the page cache: a thread reads it;
    # the rest are read on the event loop again (timed), not all sent to threads
    assert threads[0] == me and threads[1] != me
    assert threads[2:] == [me] * 3
    assert cold == 0
    assert dispatch.COLD_READ_NS < 2_000_000
