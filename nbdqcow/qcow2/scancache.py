"""A small LRU of bulk L2 scans (nbdqcow.qcow2.scan), kept apart so that importing it
costs nothing: numpy comes in with the first scan."""

from __future__ import annotations

import weakref
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING

from nbdqcow.qcow2.geometry import Geometry

if TYPE_CHECKING:
    from nbdqcow.qcow2.scan import TableRuns


class ScanCache:
    """Run decompositions of recently scanned tables, LRU, at most ``capacity``.

    An entry is used only for the very table object it was made from, and only while
    that table still holds the bytes it was scanned with (a copy is kept and compared:
    a few microseconds), so tables changed in place are rescanned."""

    def __init__(self, geo: Geometry, has_data_file: bool, capacity: int = 64) -> None:
        self.geo = geo
        self.has_data_file = has_data_file
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[weakref.ref[array[int]], bytes, TableRuns]] = (
            OrderedDict())

    def runs(self, table: array[int]) -> TableRuns:
        key = id(table)
        hit = self._entries.get(key)
        raw = table.tobytes()
        if hit is not None and hit[0]() is table and hit[1] == raw:
            self._entries.move_to_end(key)
            return hit[2]
        from nbdqcow.qcow2.scan import scan_l2

        tr = scan_l2(table, self.geo, self.has_data_file)
        self._entries[key] = (weakref.ref(table), raw, tr)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return tr
