"""The server-wide memory budget (nbdqcow/server/budget.py): no I/O."""

from __future__ import annotations

import pytest

from nbdqcow.server.budget import Account, MemoryBudget

MiB = 1 << 20


def _acct(log: list[str], name: str) -> Account:
    return Account(lambda: log.append(name))


def test_grants_under_the_limit_and_queues_over_it() -> None:
    log: list[str] = []
    b = MemoryBudget(100 * MiB)
    a, c = _acct(log, "a"), _acct(log, "c")
    assert b.take(a, 60 * MiB)
    assert not b.take(c, 60 * MiB)  # 120 > 100: c waits, nothing charged
    assert b.used == 60 * MiB and c.held == 0 and c.want == 60 * MiB
    b.give(a, 60 * MiB)
    assert log == ["c"] and c.held == 60 * MiB and b.used == 60 * MiB
    assert b.peak == 60 * MiB


def test_never_over_the_limit() -> None:
    b = MemoryBudget(64 * MiB)
    accts = [Account() for _ in range(10)]
    for acct in accts:
        b.take(acct, 32 * MiB)
        assert b.used <= b.limit
    assert sum(x.held for x in accts) == 64 * MiB == b.used


def test_fair_share_a_holder_does_not_take_the_others_part() -> None:
    """A client that keeps what it holds (it does not read its replies) cannot take more
    than its share while another one wants budget."""
    log: list[str] = []
    b = MemoryBudget(128 * MiB)
    flood, good = _acct(log, "flood"), _acct(log, "good")
    assert b.take(flood, 32 * MiB)
    assert b.take(flood, 32 * MiB)  # alone: its share is everything
    assert b.take(good, 4 * MiB)  # share now 64 MiB each: the good client gets its part
    # the flooder is at its share (64 of 128 / 2): it waits, even though bytes are free
    assert not b.take(flood, 32 * MiB)
    assert b.take(good, 4 * MiB)  # and the good client is not held up behind it
    assert log == []
    b.give(good, 8 * MiB)  # the good client holds nothing now: the flooder's turn
    assert log == ["flood"] and flood.held == 96 * MiB


def test_holding_nothing_may_take_one_request_larger_than_the_share() -> None:
    b = MemoryBudget(64 * MiB)
    accts = [Account() for _ in range(4)]
    assert b.take(accts[0], MiB)
    assert b.take(accts[1], MiB)
    assert b.take(accts[2], 48 * MiB)  # share 21 MiB, but it holds nothing: one request


def test_order_kept_for_a_large_waiter() -> None:
    log: list[str] = []
    b = MemoryBudget(64 * MiB)
    a, big, small = _acct(log, "a"), _acct(log, "big"), _acct(log, "small")
    assert b.take(a, 40 * MiB)
    assert not b.take(big, 48 * MiB)
    assert not b.take(small, MiB)  # fits, but would overtake the large waiter
    b.give(a, 40 * MiB)
    assert log == ["big", "small"]


def test_close_gives_everything_back_at_once() -> None:
    log: list[str] = []
    b = MemoryBudget(64 * MiB)
    gone, waiting = _acct(log, "gone"), _acct(log, "waiting")
    assert b.take(gone, 64 * MiB)
    assert not b.take(waiting, 32 * MiB)
    b.close(gone)
    assert gone.held == 0 and log == ["waiting"] and b.used == 32 * MiB
    b.close(waiting)
    assert b.used == 0
    b.give(waiting, 32 * MiB)  # late releases of a closed account change nothing
    assert b.used == 0


def test_one_wish_at_a_time() -> None:
    b = MemoryBudget(8 * MiB)
    a = Account()
    assert b.take(a, 8 * MiB)
    assert not b.take(a, 8 * MiB)
    with pytest.raises(RuntimeError):
        b.take(a, MiB)
