"""Write-behind: hand a host file's streamed ranges to the disk while writing goes on.

A client that copies an image (nbdcopy, qemu-img convert, dd) writes it front to back
and ends with a FLUSH.  Left alone, the kernel keeps every written page dirty in the page
cache until that fsync (its background writeback starts only past ``dirty_background``,
10% of memory), so the fsync then writes the whole image while the client waits: for a
1 GiB copy about as long as the copy itself.  Here, once a CHUNK-aligned range of a
file has been written completely (sequential writes fill one chunk after the other), a
background thread starts its writeback (sync_file_range WRITE: no waiting, no
durability promise -- FLUSH still syncs), so the disk works during the copy and the
final fsync finds little left.  Random writes seldom fill a whole chunk, and small ones
(metadata, 4 KiB guest writes) are not counted at all: they stay with the kernel's own
writeback.  Only the order in which the kernel may write dirty pages changes, which it
is free to choose anyway: no crash state is new.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from nbdqcow.block.signals import block_stop_signals

#: ranges handed to the disk: aligned chunks of the host file, once fully written
CHUNK = 32 * 1024 * 1024
#: writes smaller than this are not counted
MIN_WRITE = 64 * 1024
#: chunks waiting for the thread at most (more: the disk is behind; the kernel's own
#: writeback and the final fsync take the rest)
MAX_QUEUED = 8
#: a chunk kicked less than this many seconds ago (and not synced since) is not kicked
#: again: rewritten over and over, it is left to the kernel and the next sync, so no
#: page is written back more often than the kernel's own dirty expiry (30 s) would
COOLDOWN = 30.0

Kick = Callable[[int, int], None]


class _Thread:
    """One daemon thread for the process: starts the writeback of queued ranges."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Kick, int, int]] = queue.SimpleQueue()
        self.queued = 0
        self._lock = threading.Lock()
        self._started = False

    def put(self, kick: Kick, start: int, length: int) -> None:
        with self._lock:
            if self.queued >= MAX_QUEUED:
                return
            self.queued += 1
            if not self._started:
                self._started = True
                threading.Thread(target=self._work, name="nbdqcow-writebehind",
                                 daemon=True).start()
        self.jobs.put((kick, start, length))

    def _work(self) -> None:
        # a server's SIGTERM/SIGINT belong to its event loop's thread (which holds them
        # off while it ends): with the default action one taken here kills the process
        block_stop_signals()
        while True:
            kick, start, length = self.jobs.get()
            try:
                kick(start, length)
            except OSError:
                pass  # a hint only: the next sync reports real errors
            finally:
                with self._lock:
                    self.queued -= 1
            del kick


_THREAD = _Thread()


class WriteBehind:
    """Counts the bytes written into each chunk of one file; a full chunk is kicked --
    once between two syncs, or again after COOLDOWN seconds: a client that rewrites the
    same range over and over without a flush (a benchmark, a scratch area) would else
    have it written to the disk over and over, for nothing."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self._filled: dict[int, int] = {}
        self._kicked: dict[int, float] = {}  # chunk -> when it was kicked

    def synced(self) -> None:
        """Everything written so far is on the disk: chunks may be kicked again."""
        self._kicked.clear()

    def wrote(self, offset: int, n: int, kick: Kick) -> None:
        """``n`` bytes were written at ``offset`` (the caller skips small writes);
        ``kick(start, length)`` starts the writeback of a full chunk (in the thread)."""
        chunk, filled = self.chunk, self._filled
        end = offset + n
        c = offset // chunk
        while offset < end:
            top = (c + 1) * chunk
            k = min(end, top) - offset
            got = filled.get(c, 0) + k
            if got >= chunk:
                filled.pop(c, None)
                now = time.monotonic()
                if now - self._kicked.get(c, -COOLDOWN) >= COOLDOWN:
                    self._kicked[c] = now
                    _THREAD.put(kick, c * chunk, chunk)
            else:
                filled[c] = got
            offset += k
            c += 1
        if len(filled) > 4096:  # scattered large writes: forget the oldest counts
            for key in list(filled)[:2048]:
                del filled[key]
