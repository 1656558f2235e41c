"""Per-connection flow control: caps on in-flight requests and bytes, back-pressure.

Reading from a client pauses when it has too many requests (or bytes) in flight, or
when the transport's write buffer is over its high-water mark (a client that does not
read its replies); it resumes when both are back under their limits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

MAX_REQUESTS = 64
MAX_BYTES = 4 * 1024 * 1024
WRITE_HIGH_WATER = 2 * 1024 * 1024
WRITE_LOW_WATER = 512 * 1024


class FlowControl:
    """Counts in-flight work of one connection and pauses/resumes its reading."""

    def __init__(
        self,
        transport: asyncio.Transport,
        max_requests: int = MAX_REQUESTS,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.transport = transport
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self.write_paused = False
        self.read_paused = False
        self.stopped = False  # reading stopped for good (DISC, shutdown)
        self.backlog = 0  # requests parsed but not started yet (over the caps)
        self.on_capacity: Callable[[], None] | None = None
        self.idle = asyncio.Event()
        self.idle.set()
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    @property
    def saturated(self) -> bool:
        """No new request may start now (caps reached, or the client is not reading)."""
        return (
            self.write_paused
            or self.requests >= self.max_requests
            or self.bytes >= self.max_bytes
        )

    def _want_pause(self) -> bool:
        return self.stopped or self.write_paused or self.backlog > 0 or self.saturated

    def _update(self) -> None:
        # idle (DISC and shutdown wait for it): nothing in flight and nothing backlogged
        # -- the backlog may also empty through requests answered inline, with no finish()
        if self.requests == 0 and not self.backlog:
            self.idle.set()
        rt = self.transport
        if rt.is_closing():
            return
        want = self._want_pause()
        if want and not self.read_paused:
            self.read_paused = True
            rt.pause_reading()
        elif not want and self.read_paused:
            self.read_paused = False
            rt.resume_reading()

    def start(self, nbytes: int) -> None:
        """A request will complete later (thread or waiting)."""
        self.requests += 1
        self.bytes += nbytes
        self.idle.clear()
        self._update()

    def finish(self, nbytes: int) -> None:
        self.requests -= 1
        self.bytes -= nbytes
        if self.backlog and not self.saturated and self.on_capacity is not None:
            self.on_capacity()
        self._update()

    def update(self) -> None:
        """Pause or resume reading as the counts now say (after the backlog changed)."""
        self._update()

    def stop(self) -> None:
        """Stop reading for good."""
        self.stopped = True
        self._update()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.backlog and not self.saturated and self.on_capacity is not None:
            self.on_capacity()
        self._update()
