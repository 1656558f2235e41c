"""Worker threads for blocking engine calls, lighter than run_in_executor.

Each job is a function and a completion callback: the thread runs the function and
hands its result to the event loop with one ``call_soon_threadsafe``.  No
concurrent.futures Future, no condition variable, no asyncio Task per request: on
1 MiB writes that machinery (and the GIL hand-offs it takes) cost about as much as the
copy itself.  One pool serves every connection and loop of the process.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

from nbdqcow.block.signals import block_stop_signals

#: threads at most (cold reads from a disk overlap up to this many; qemu-nbd's pool
#: has 64 too); started only when a job finds no idle thread
MAX_THREADS = 64

Job = tuple[Callable[[], Any], Callable[[Any], None], asyncio.AbstractEventLoop]

class Workers:
    """Threads started on demand, up to ``max_threads``; daemon threads."""

    def __init__(self, max_threads: int = MAX_THREADS) -> None:
        self.max_threads = max_threads
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0
        self._lock = threading.Lock()

    def submit(
        self, fn: Callable[[], Any], done: Callable[[Any], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Run ``fn()`` in a thread, then ``done(result)`` on ``loop``.  ``fn`` must not
        raise (wrap it); ``done`` is dropped if the loop is closed by then."""
        self._jobs.put((fn, done, loop))
        if self._idle == 0 and self._threads < self.max_threads:
            with self._lock:
                if self._threads < self.max_threads:
                    self._threads += 1
                    threading.Thread(target=self._work, name="nbdqcow-worker",
                                     daemon=True).start()

    def _work(self) -> None:
        block_stop_signals()
        jobs = self._jobs
        while True:
            self._idle += 1
            fn, done, loop = jobs.get()
            self._idle -= 1
            result = fn()
            try:
                loop.call_soon_threadsafe(done, result)
            except RuntimeError:  # the loop is closed: nobody waits for the answer
                pass
            # an idle thread must not keep its last job (and the reply buffer it made,
            # up to 64 MiB) alive until its next job
            del fn, done, loop, result


WORKERS = Workers()
#: large writes go through one thread of their own: writes to one file serialise on its
#: inode lock anyway, and a single writer avoids the threads that would sleep on that
#: lock and the GIL hand-offs between them (1M sequential writes: 25-40% faster, paired
#: runs)
WRITER = Workers(max_threads=1)
