"""One memory budget for the whole server: buffered request and reply bytes.

Every large buffer a connection makes the server hold is charged here first: a WRITE
payload from the moment its header arrives until the write is done, a READ reply from
before it is read until its bytes have left the transport (the client read them).
A connection whose charge cannot be granted now waits (its reading pauses: nothing of it
is buffered meanwhile) and is granted in arrival order as bytes come back.

Fair share: while several connections hold or want budget, one that already holds more
than ``limit / (connections)`` gets nothing more until it drops back (a client that does
not read its replies keeps what it holds, but cannot take the others' share).  A
connection that holds nothing may always take one request when the bytes are free, so a
request larger than a share still goes through.  Grants that would stop at a waiter
blocked by the global limit keep the order (a large request is not overtaken for ever);
waiters blocked only by their share are passed over.

Requests smaller than :data:`CHARGE_MIN` are not charged: a connection's small replies are
bounded by its transport's write high-water mark and its in-flight caps (flow.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

#: requests at least this large are charged (the pooled-buffer size: smaller ones come
#: from malloc's heap and are bounded per connection by flow control)
CHARGE_MIN = 256 * 1024
#: the default limit (``--max-buffer``)
DEFAULT_LIMIT = 128 * 1024 * 1024


class Account:
    """One connection's part of the budget."""

    __slots__ = ("held", "want", "on_grant")

    def __init__(self, on_grant: Callable[[], None] | None = None) -> None:
        self.held = 0  # bytes charged now
        self.want = 0  # bytes waited for (0: not waiting)
        self.on_grant = on_grant  # called (on the event loop) when ``want`` was granted


class MemoryBudget:
    """Bytes buffered across all connections, under ``limit``; event-loop only."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit <= 0:
            raise ValueError("the memory budget must be positive")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._users: set[Account] = set()  # holding or waiting
        self._waiters: deque[Account] = deque()

    def share(self) -> int:
        return self.limit // max(1, len(self._users))

    def _fits(self, acct: Account, n: int) -> bool:
        return acct.held == 0 or acct.held + n <= self.share()

    def take(self, acct: Account, n: int) -> bool:
        """Charge ``n`` bytes to ``acct`` now (True), or queue the wish (False: ``on_grant``
        is called once the bytes are charged)."""
        if acct.want:
            raise RuntimeError("one wish at a time")
        acct.want = n
        self._users.add(acct)
        self._waiters.append(acct)
        self._wake(acct)
        return not acct.want

    def give(self, acct: Account, n: int) -> None:
        """``n`` bytes of ``acct`` are no longer held."""
        n = min(n, acct.held)
        if n <= 0:
            return
        acct.held -= n
        self.used -= n
        if not acct.held and not acct.want:
            self._users.discard(acct)
        if self._waiters:
            self._wake()

    def close(self, acct: Account) -> None:
        """The connection is gone: everything it held goes back at once."""
        if acct.want:
            acct.want = 0
            try:
                self._waiters.remove(acct)
            except ValueError:
                pass
        acct.on_grant = None
        self.used -= acct.held
        acct.held = 0
        self._users.discard(acct)
        if self._waiters:
            self._wake()

    def _wake(self, caller: Account | None = None) -> None:
        """Grant what fits, in order; then tell the granted (but ``caller``, which learns
        it from take()'s result).  Callbacks run last: they may call take()/give()."""
        waiters = self._waiters
        granted: list[Account] = []
        for acct in list(waiters):
            n = acct.want
            if self.used + n > self.limit:
                if acct.held == 0:
                    break  # keep the order: later ones must not overtake it for ever
                continue
            if not self._fits(acct, n):
                continue  # over its share: the others go first
            waiters.remove(acct)
            acct.want = 0
            acct.held += n
            self.used += n
            if acct is not caller:
                granted.append(acct)
        self.peak = max(self.peak, self.used)
        for acct in granted:
            if acct.on_grant is not None:
                acct.on_grant()

    @property
    def waiting(self) -> int:
        return len(self._waiters)
