"""The shared buffer pool and the leases that return READ buffers to it."""

from __future__ import annotations

from nbdqcow.nbd.buffers import POOL_MIN, BufferPool, Leases


def test_pool_reuses_exact_lengths_only() -> None:
    pool = BufferPool(max_bytes=4 * POOL_MIN)
    a = pool.take(POOL_MIN)
    pool.give(a)
    assert pool.idle_bytes == POOL_MIN
    assert pool.take(POOL_MIN + 1) is not a  # another length: a fresh buffer
    assert pool.take(POOL_MIN) is a
    assert pool.idle_bytes == 0


def test_pool_bounds_idle_bytes_and_skips_small_buffers() -> None:
    pool = BufferPool(max_bytes=2 * POOL_MIN)
    for _ in range(5):
        pool.give(bytearray(POOL_MIN))
    assert pool.idle_bytes == 2 * POOL_MIN
    pool.give(bytearray(100))
    assert pool.idle_bytes == 2 * POOL_MIN
    small = pool.take(100)
    assert len(small) == 100


def test_leases_return_buffers_only_when_unreferenced() -> None:
    pool = BufferPool()
    leases = Leases(pool)
    buf = pool.take(POOL_MIN)
    view = memoryview(buf)[:10]  # as a transport holding the data it has not sent
    leases.add(buf)
    del buf
    leases.reclaim()
    assert len(leases) == 1 and pool.idle_bytes == 0
    view.release()
    del view
    leases.reclaim()
    assert len(leases) == 0 and pool.idle_bytes == POOL_MIN


def test_leases_keep_order_and_a_bound() -> None:
    pool = BufferPool()
    leases = Leases(pool)
    held = [bytearray(POOL_MIN) for _ in range(Leases.LIMIT + 5)]
    for b in held:
        leases.add(b)
    assert len(leases) == Leases.LIMIT  # the oldest are forgotten, not kept forever
    assert pool.idle_bytes == 0
