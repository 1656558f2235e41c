"""Reusable large buffers for WRITE payloads and READ replies.

A fresh 1 MiB bytearray costs 256 page faults, each zeroing a page, the first time it
is written: for large requests that was a quarter of the server's CPU time.  Buffers
the server is done with go back to one pool, shared by every connection and thread,
and are handed out again to requests of exactly the same length (clients tend to use
one request size).  The pool keeps at most ``max_bytes`` of idle buffers.
"""

from __future__ import annotations

import sys
import threading
from collections import deque

#: smaller buffers come from malloc's heap cheaply: not pooled
POOL_MIN = 256 * 1024
POOL_MAX_BYTES = 16 * 1024 * 1024


class BufferPool:
    """Idle bytearrays by length; thread-safe."""

    def __init__(self, max_bytes: int = POOL_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._free: dict[int, list[bytearray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, length: int) -> bytearray:
        """A bytearray of exactly ``length`` bytes; its contents are undefined."""
        if length >= POOL_MIN:
            with self._lock:
                free = self._free.get(length)
                if free:
                    self._bytes -= length
                    return free.pop()
        return bytearray(length)

    def give(self, buf: bytearray) -> None:
        """Return ``buf``: the caller and everybody else are done with it."""
        n = len(buf)
        if n < POOL_MIN:
            return
        with self._lock:
            if self._bytes + n <= self.max_bytes:
                self._free.setdefault(n, []).append(buf)
                self._bytes += n

    @property
    def idle_bytes(self) -> int:
        return self._bytes


POOL = BufferPool()


class Leases:
    """Buffers handed to a transport: back to the pool once nothing refers to them.

    A transport keeps a reference to what it has not sent yet (uvloop holds the
    buffers it writes, asyncio copies them); when only this queue still refers to a
    buffer (CPython reference count), nobody reads it any more.
    """

    #: more outstanding than this: forget the oldest (the garbage collector frees it)
    LIMIT = 64

    def __init__(self, pool: BufferPool = POOL) -> None:
        self.pool = pool
        self._out: deque[bytearray] = deque()

    def add(self, buf: bytearray) -> None:
        self._out.append(buf)
        if len(self._out) > self.LIMIT:
            self._out.popleft()
        self.reclaim()

    def reclaim(self) -> None:
        out = self._out
        # 2: the deque's reference and getrefcount's argument
        while out and sys.getrefcount(out[0]) <= 2:
            self.pool.give(out.popleft())

    def __len__(self) -> int:
        return len(self._out)
