"""Per-connection flow control: caps on in-flight requests and bytes, back-pressure.

Reading from a client pauses when it has too many requests (or bytes) in flight, when
the transport's write buffer is over its high-water mark (a client that does not read
its replies), or while it waits for the server's memory budget (budget.py: large WRITE
payloads and READ replies are charged there); it resumes when all are back under their
limits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nbdqcow.server.budget import Account, MemoryBudget

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
        budget: MemoryBudget | None = None,
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
        self.budget = budget
        self.account = Account(self._granted)
        self.granted = 0  # bytes the budget granted to the wish, not yet taken by charge()
        self.queued = 0  # charged reply bytes handed to a transport over its high water
        self.parked = False  # the request decoder waits for budget for a WRITE payload
        self._wish = 0
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    @property
    def saturated(self) -> bool:
        """No new request may start now (caps reached, or the client is not reading)."""
        return (
            self.write_paused
            or self.requests >= self.max_requests
            or self.bytes >= self.max_bytes
            or self.waiting
        )

    @property
    def waiting(self) -> bool:
        """A wish for budget is pending."""
        return self.account.want > 0

    def _want_pause(self) -> bool:
        return (self.stopped or self.write_paused or self.backlog > 0 or self.parked
                or self.saturated)

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
        self._capacity()
        self._update()

    def _capacity(self) -> None:
        if (self.backlog or self.parked) and not self.saturated and self.on_capacity is not None:
            self.on_capacity()

    # --- the memory budget -------------------------------------------------------------
    def charge(self, n: int) -> bool:
        """Charge ``n`` buffered bytes to this connection.  False: not now (the wish is
        queued, reading pauses; ``on_capacity`` runs once it is granted: ask again with
        the same ``n``)."""
        budget = self.budget
        if budget is None or n <= 0:
            return True
        if self.granted:
            got, self.granted = self.granted, 0
            if got == n:
                return True
            budget.give(self.account, got)  # granted for another wish: not this one
        if self.waiting:
            return False
        self._wish = n
        if budget.take(self.account, n):
            return True
        self._update()
        return False

    def _granted(self) -> None:
        """The budget charged the pending wish: it waits for charge() to take it."""
        self.granted = self._wish
        self._capacity()
        self._update()

    def release(self, n: int) -> None:
        """``n`` charged bytes are no longer buffered."""
        if self.budget is not None and n > 0:
            self.budget.give(self.account, n)

    def sent(self, n: int) -> None:
        """A reply holding ``n`` charged bytes was handed to the transport: they stay
        charged while the transport holds more than its high-water mark."""
        if n <= 0 or self.budget is None:
            return
        if self.write_paused:
            self.queued += n
        else:
            self.budget.give(self.account, n)

    def close(self) -> None:
        """The connection is gone: everything it held goes back to the budget now."""
        self.granted = self.queued = 0
        self.parked = False
        if self.budget is not None:
            self.budget.close(self.account)

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
        if self.queued:
            queued, self.queued = self.queued, 0
            self.release(queued)
        self._capacity()
        self._update()
