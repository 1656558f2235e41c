"""Cold reads through io_uring on the event loop (see :mod:`nbdqcow.block.uring`).

One ring per event loop, made on the first read that needs it.  Reads queued while the
loop handles a batch of requests go to the kernel with one system call at the end of
that batch (``call_soon``); the ring's descriptor is watched with ``add_reader``, so
completions run as ordinary loop callbacks.  Where io_uring cannot be used (or
``NBDQCOW_URING=0`` is set) :func:`ring_for` returns None and cold reads use worker
threads.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from nbdqcow.block.uring import Ring, open_ring

#: reads in flight per loop at most (beyond that, worker threads take them)
RING_ENTRIES = 256
#: seconds between looks at a busy ring that does not signal
WATCH_S = 0.25


class LoopRing:
    """A ring driven by one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ring: Ring) -> None:
        self.loop = loop
        self.ring = ring
        self._submit_soon = False
        self._after: list[Callable[[], None]] = []
        self._watch: asyncio.TimerHandle | None = None
        loop.add_reader(ring.fileno(), self._reap)

    def read(self, fd: int, buf: bytearray, offset: int, done: Callable[[int], None]) -> bool:
        """Start reading ``len(buf)`` bytes of ``fd`` at ``offset`` into ``buf``;
        ``done(result)`` (bytes read or -errno) runs on the loop.  False when the ring
        is full (nothing started)."""
        if not self.ring.read(fd, buf, offset, done):
            return False
        if not self._submit_soon:
            self._submit_soon = True
            self.loop.call_soon(self._submit)
        if self._watch is None:
            self._watch = self.loop.call_later(WATCH_S, self._look)
        return True

    def _look(self) -> None:
        """Insurance: while reads are in flight, look at the ring now and then even if
        the eventfd said nothing."""
        self._watch = None
        self._reap()
        if self.ring.busy and self._watch is None:
            self._watch = self.loop.call_later(WATCH_S, self._look)

    def _submit(self) -> None:
        self._submit_soon = False
        self.ring.submit()

    def after_reap(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the completions found now have all run (a connection
        answers them in one write)."""
        self._after.append(fn)

    def _reap(self) -> None:
        try:
            self.ring.reap()
        finally:
            after, self._after = self._after, []
            for fn in after:
                fn()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        try:
            self.loop.remove_reader(self.ring.fileno())
        except (RuntimeError, ValueError):  # the loop is closed already
            pass
        self.ring.close()


_rings: dict[int, tuple[asyncio.AbstractEventLoop, LoopRing | None]] = {}


def _enabled() -> bool:
    return os.environ.get("NBDQCOW_URING", "1") not in ("0", "no", "off")


def ring_for(loop: asyncio.AbstractEventLoop) -> LoopRing | None:
    """The ring of ``loop`` (made now if needed), or None where io_uring is unusable."""
    got = _rings.get(id(loop))
    if got is not None and got[0] is loop:
        return got[1]
    for key, (other, lr) in list(_rings.items()):  # loops closed since: free their rings
        if other.is_closed():
            del _rings[key]
            if lr is not None:
                lr.close()
    ring = open_ring(RING_ENTRIES) if _enabled() else None
    lr = LoopRing(loop, ring) if ring is not None else None
    _rings[id(loop)] = (loop, lr)
    return lr


def close_ring(loop: asyncio.AbstractEventLoop) -> None:
    """Free ``loop``'s ring (waits for the reads still in flight)."""
    got = _rings.pop(id(loop), None)
    if got is not None and got[1] is not None:
        got[1].close()
