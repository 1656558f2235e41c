"""Metadata cache: cluster-sized tables (L2 tables, refcount blocks) kept as arrays in
an LRU, with dirty tracking and a flush dependency (qcow2.txt is silent here; this is the
engine's write-ordering rule): before a dirty table of this cache is written, the
``before_store`` hook runs (for L2 tables it writes and syncs the refcount side first).

Eviction is invisible to callers that still hold a table: an evicted (clean) table a
caller keeps using stays the cache's table for that offset (a weak reference finds it
again) -- a later ``get`` returns that same array, and ``mark_dirty`` after modifying it
puts it back -- so a modification made through a held table is never lost to a reload.
"""

from __future__ import annotations

import weakref
from array import array
from collections import OrderedDict
from collections.abc import Callable

Loader = Callable[[int], "array[int]"]
Storer = Callable[[int, "array[int]"], None]


class TableCache:
    def __init__(
        self,
        capacity: int,
        load: Loader,
        store: Storer,
        before_store: Callable[[], None] | None = None,
    ) -> None:
        self.capacity = max(4, capacity)
        self._load = load
        self._store = store
        self._before_store = before_store
        self._tables: OrderedDict[int, array[int]] = OrderedDict()
        self._dirty: set[int] = set()
        # evicted tables somebody still holds (weakly referenced: gone when released)
        self._ghosts: weakref.WeakValueDictionary[int, array[int]] = (
            weakref.WeakValueDictionary())

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    def get(self, offset: int) -> array[int]:
        t = self._tables.get(offset)
        if t is not None:
            self._tables.move_to_end(offset)
            return t
        t = self._ghosts.pop(offset, None)
        if t is None:
            t = self._load(offset)
        self._insert(offset, t)
        return t

    def in_memory(self, offset: int) -> bool:
        """True when ``get(offset)`` would not read the file."""
        return offset in self._tables or offset in self._ghosts

    def get_cached(self, offset: int) -> array[int] | None:
        """The table if it is cached (no load, no LRU update): for hot paths."""
        return self._tables.get(offset)

    def insert_new(self, offset: int, table: array[int]) -> None:
        """A table that exists only in memory so far (dirty).  Marked dirty before it
        enters the LRU: inserting may evict, and a table not yet marked would look like
        a clean victim and be dropped without ever reaching the file."""
        self._dirty.add(offset)
        self._insert(offset, table)

    def mark_dirty(self, offset: int) -> None:
        if offset not in self._tables:
            # evicted while the caller modified it: the caller's array goes back in
            t = self._ghosts.pop(offset, None)
            if t is None:
                raise KeyError(f"table at {offset:#x} marked dirty but not cached")
            self._dirty.add(offset)
            self._insert(offset, t)
            return
        self._dirty.add(offset)

    def is_dirty(self, offset: int) -> bool:
        return offset in self._dirty

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def drop(self, offset: int) -> None:
        """Forget a table whose cluster is being freed (never written back)."""
        self._tables.pop(offset, None)
        self._ghosts.pop(offset, None)
        self._dirty.discard(offset)

    def _insert(self, offset: int, table: array[int]) -> None:
        self._tables[offset] = table
        while len(self._tables) > self.capacity:
            self._evict_one(keep=offset)

    def _evict_one(self, keep: int) -> None:
        """Drop the least recently used clean table -- never ``keep``, the table being
        inserted, which the caller is about to use (and may modify) -- or, when every
        other table is dirty, write them all back first."""
        for off in self._tables:
            if off != keep and off not in self._dirty:
                self._ghosts[off] = self._tables.pop(off)
                return
        off = next(o for o in self._tables if o != keep)
        self.write_back()
        self._ghosts[off] = self._tables.pop(off)

    def write_back(self) -> bool:
        """Write every dirty table (after the dependency hook).  True if anything was written."""
        if not self._dirty:
            return False
        if self._before_store is not None:
            self._before_store()
        for off in sorted(self._dirty):
            self._store(off, self._tables[off])
        self._dirty.clear()
        return True

    def clear(self) -> None:
        self._tables.clear()
        self._ghosts.clear()
        self._dirty.clear()
