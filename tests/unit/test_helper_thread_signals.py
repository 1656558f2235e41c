"""Helper threads never take SIGTERM/SIGINT (the server's event loop holds them off while
it ends; taken by a helper thread with the default action they would kill the process),
whichever thread starts them."""

from __future__ import annotations

import asyncio
import signal
import threading

from nbdqcow.block.writebehind import _Thread
from nbdqcow.server.workers import Workers

STOP = {signal.SIGTERM, signal.SIGINT}


def _mask() -> set[signal.Signals]:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_write_behind_thread_blocks_stop_signals() -> None:
    assert not STOP & _mask()  # started from a thread that takes them
    seen: list[set[signal.Signals]] = []
    done = threading.Event()

    def kick(start: int, length: int) -> None:
        seen.append(_mask())
        done.set()

    _Thread().put(kick, 0, 1)
    assert done.wait(10)
    assert STOP <= seen[0]


def test_worker_threads_block_stop_signals() -> None:
    assert not STOP & _mask()
    loop = asyncio.new_event_loop()
    try:
        fut: asyncio.Future[set[signal.Signals]] = loop.create_future()
        Workers(max_threads=2).submit(_mask, fut.set_result, loop)
        assert STOP <= loop.run_until_complete(asyncio.wait_for(fut, 10))
    finally:
        loop.close()
