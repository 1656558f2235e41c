"""TableCache (qcow2/cache.py): eviction never loses a table that exists only in memory."""

from __future__ import annotations

from array import array

from nbdqcow.qcow2.cache import TableCache


def test_new_table_survives_eviction_when_every_other_table_is_dirty() -> None:
    # Regression: insert_new used to mark the table dirty only after inserting it; with
    # every cached table dirty, the insertion's eviction took the new (not yet dirty)
    # table as its "clean" victim and dropped it unwritten (a later lookup then read an
    # L2 table past the end of the file and marked the image corrupt).
    stored: dict[int, array[int]] = {}
    hooks: list[int] = []
    cache = TableCache(4, lambda off: array("Q", stored[off]),
                       lambda off, t: stored.__setitem__(off, array("Q", t)),
                       lambda: hooks.append(len(stored)))
    for off in range(4):
        cache.insert_new(off, array("Q", [off]))
    cache.insert_new(4, array("Q", [44]))
    assert hooks, "evicting a dirty table must run the dependency hook first"
    assert cache.get(4)[0] == 44
    assert {off: t[0] for off, t in stored.items()} == {0: 0, 1: 1, 2: 2, 3: 3, 4: 44}
    cache.write_back()
    assert stored[4][0] == 44


def test_a_held_table_evicted_meanwhile_keeps_its_modification() -> None:
    # Regression: a caller takes a (clean) table, loads others (the cache evicts the
    # held one), modifies the held array and marks it dirty: the modification must be
    # written back and later lookups must see it, not a stale reload from the file.
    stored = {off: array("Q", [off]) for off in range(10)}
    cache = TableCache(4, lambda off: array("Q", stored[off]),
                       lambda off, t: stored.__setitem__(off, array("Q", t)))
    held = cache.get(0)
    for off in range(1, 6):
        cache.get(off)
    assert 0 not in cache
    assert cache.get(0) is held  # still the caller's array, not a reload
    for off in range(6, 10):
        cache.get(off)
    held[0] = 1000
    cache.mark_dirty(0)
    assert cache.get(0)[0] == 1000
    cache.write_back()
    assert stored[0][0] == 1000


def test_a_table_just_loaded_is_not_its_own_eviction_victim() -> None:
    # Regression: with every other table dirty, get() of a new table evicted the table
    # it had just loaded (the only clean one) and handed out an uncached array.
    stored = {off: array("Q", [off]) for off in range(5)}
    cache = TableCache(4, lambda off: array("Q", stored[off]),
                       lambda off, t: stored.__setitem__(off, array("Q", t)))
    for off in range(4):
        cache.get(off)[0] += 100
        cache.mark_dirty(off)
    t = cache.get(4)
    assert 4 in cache and cache.get(4) is t
