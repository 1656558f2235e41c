"""Bulk scanning of L2 tables: a whole table's run decomposition with array operations
that run in C (numpy), instead of one Python step per entry.

A table's guest span (``l2_size`` clusters) is cut into maximal runs ``(start, length,
state, host)`` with the meaning of :mod:`nbdqcow.qcow2.mapping`: ``start`` is the byte
offset inside the span, ``host`` the host offset of the run's first byte for states with
a host cluster, the raw L2 entry for COMPRESSED (one run per compressed cluster) and 0
otherwise.  Entries that break the format (unaligned host offsets, impossible
subcluster bitmaps) are listed with the byte range they cover and the message
:func:`nbdqcow.qcow2.mapping.iter_runs` reports for them.

The definition is the one of :mod:`nbdqcow.qcow2.entries` (``std_type``, ``sc_type``,
``bitmap_valid``); tests/unit/test_scan.py checks the two against each other on random
tables.  numpy is imported by whoever imports this module: the server imports it lazily,
on the first request that covers a large range (start-up stays fast).
"""

from __future__ import annotations

import weakref
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.entries import SC, bitmap_valid, sc_type
from nbdqcow.qcow2.geometry import Geometry

U64 = npt.NDArray[np.uint64]

_OFF = np.uint64(L.L2E_OFFSET_MASK)
_COMP = np.uint64(L.QCOW_OFLAG_COMPRESSED)
_COPIED = np.uint64(L.QCOW_OFLAG_COPIED)
_ZERO = np.uint64(L.QCOW_OFLAG_ZERO)
_LOW32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_STATES = tuple(SC)
_HOST_STATES = (int(SC.ZERO_ALLOC), int(SC.NORMAL), int(SC.UNALLOCATED_ALLOC))


@dataclass
class TableRuns:
    """One table's runs (parallel lists, ordered, covering the whole span) and its
    invalid entries ``(start, end, message)`` in the order they are reported."""

    starts: list[int]
    lengths: list[int]
    states: list[SC]
    hosts: list[int]
    invalid: list[tuple[int, int, str]] = field(default_factory=list)


def words_of(table: array[int] | bytes | U64) -> U64:
    """The table as a uint64 array (a view: no copy for ``array('Q')``)."""
    if isinstance(table, np.ndarray):
        return table.astype(np.uint64, copy=False)
    return np.frombuffer(table, dtype=np.uint64)


def allocated_mask(e: U64, has_data_file: bool) -> npt.NDArray[np.bool_]:
    """Entries that own a host cluster (offset, or COPIED with an external data file)."""
    alloc: npt.NDArray[np.bool_] = (e & _OFF) != 0
    if has_data_file:
        alloc |= (e & _COPIED) != 0
    return alloc


def _runs(pos: U64, lens: U64, state: npt.NDArray[np.int8], hval: U64,
          span: int) -> TableRuns:
    """Merge consecutive pieces (contiguous by construction) into maximal runs."""
    has_host = np.isin(state, _HOST_STATES)
    same = state[1:] == state[:-1]
    same &= state[1:] != int(SC.COMPRESSED)
    same &= ~has_host[1:] | (hval[1:] == hval[:-1] + lens[:-1])
    first = np.flatnonzero(np.concatenate(([True], ~same)))
    starts = pos[first]
    ends = np.append(starts[1:], np.uint64(span))
    return TableRuns(
        starts=starts.tolist(),
        lengths=(ends - starts).tolist(),
        states=[_STATES[s] for s in state[first].tolist()],
        hosts=hval[first].tolist(),
    )


def scan_l2(table: array[int] | bytes | U64, geo: Geometry, has_data_file: bool) -> TableRuns:
    """The run decomposition of one L2 table (standard or extended)."""
    w = words_of(table)
    cs = geo.cluster_size
    span = geo.l2_size * cs
    if not w.any():
        return TableRuns([0], [span], [SC.UNALLOCATED_PLAIN], [0])
    if geo.extended_l2:
        return _scan_extended(w, geo, has_data_file)
    e = w[: geo.l2_size]
    host = e & _OFF
    comp = (e & _COMP) != 0
    alloc = allocated_mask(e, has_data_file)
    zero = (e & _ZERO) != 0
    state = np.where(zero, np.where(alloc, int(SC.ZERO_ALLOC), int(SC.ZERO_PLAIN)),
                     np.where(alloc, int(SC.NORMAL), int(SC.UNALLOCATED_PLAIN)))
    state = np.where(comp, int(SC.COMPRESSED), state).astype(np.int8)
    has_host = ~comp & alloc
    hval = np.where(has_host, host, np.where(comp, e, np.uint64(0)))
    idx = np.arange(len(e), dtype=np.uint64)
    out = _runs(idx * np.uint64(cs), np.full(len(e), cs, dtype=np.uint64), state, hval, span)
    bad = np.flatnonzero(has_host & ((host & np.uint64(cs - 1)) != 0))
    out.invalid = [(i * cs, (i + 1) * cs, f"L2 entry {ent:#x} has an unaligned host offset")
                   for i, ent in zip(bad.tolist(), e[bad].tolist(), strict=True)]
    return out


def _scan_extended(w: U64, geo: Geometry, has_data_file: bool) -> TableRuns:
    cs = geo.cluster_size
    scs = geo.subcluster_size
    n = geo.l2_size
    span = n * cs
    e = w[0 : 2 * n : 2]
    bm = w[1 : 2 * n : 2]
    host = e & _OFF
    comp = (e & _COMP) != 0
    alloc = allocated_mask(e, has_data_file)
    abits = bm & _LOW32
    zbits = bm >> _S32
    # whole clusters of one state (the usual case) stay one piece each
    none = (abits == 0) & (zbits == 0)
    all_data = (abits == _LOW32) & (zbits == 0)
    all_zero = (abits == 0) & (zbits == _LOW32)
    mixed = ~comp & ~(none | all_data | all_zero)
    cstate = np.where(none, np.where(alloc, int(SC.UNALLOCATED_ALLOC), int(SC.UNALLOCATED_PLAIN)),
                      np.where(all_zero, np.where(alloc, int(SC.ZERO_ALLOC), int(SC.ZERO_PLAIN)),
                               np.where(alloc, int(SC.NORMAL), int(SC.INVALID))))
    cstate = np.where(comp, int(SC.COMPRESSED), cstate)
    spc = geo.subclusters_per_cluster
    rep = np.where(mixed, spc, 1)
    cl = np.repeat(np.arange(n), rep)
    first_piece = np.cumsum(rep) - rep
    k = (np.arange(len(cl)) - np.repeat(first_piece, rep)).astype(np.uint64)
    pm = mixed[cl]
    a = (abits[cl] >> k) & np.uint64(1)
    z = (zbits[cl] >> k) & np.uint64(1)
    pal = alloc[cl]
    sstate = np.where(a != 0, np.where((z != 0) | ~pal, int(SC.INVALID), int(SC.NORMAL)),
                      np.where(z != 0,
                               np.where(pal, int(SC.ZERO_ALLOC), int(SC.ZERO_PLAIN)),
                               np.where(pal, int(SC.UNALLOCATED_ALLOC),
                                        int(SC.UNALLOCATED_PLAIN))))
    state = np.where(pm, sstate, cstate[cl]).astype(np.int8)
    lens = np.where(pm, np.uint64(scs), np.uint64(cs)).astype(np.uint64)
    pos = cl.astype(np.uint64) * np.uint64(cs) + k * np.uint64(scs)
    has_host = np.isin(state, _HOST_STATES)
    hval = np.where(has_host, host[cl] + k * np.uint64(scs),
                    np.where(state == int(SC.COMPRESSED), e[cl], np.uint64(0)))
    out = _runs(pos, lens, state, hval, span)
    bad = (comp & (bm != 0)) | (~comp & (((abits & zbits) != 0) | ((abits != 0) & ~alloc)
                                        | ((host & np.uint64(cs - 1)) != 0)))
    for i in np.flatnonzero(bad).tolist():
        out.invalid.extend(_ext_invalid(int(e[i]), int(bm[i]), i, geo, has_data_file))
    return out


def _ext_invalid(e: int, bm: int, i: int, geo: Geometry,
                 has_data_file: bool) -> list[tuple[int, int, str]]:
    """The problems of extended entry ``i``, in the order iter_runs reports them."""
    cs = geo.cluster_size
    scs = geo.subcluster_size
    out: list[tuple[int, int, str]] = []
    lo, hi = i * cs, (i + 1) * cs
    if not bitmap_valid(e, bm, has_data_file):
        out.append((lo, hi, f"invalid extended L2 entry {e:#x} bitmap {bm:#x}"))
    if e & L.QCOW_OFLAG_COMPRESSED:
        return out
    if (e & L.L2E_OFFSET_MASK) & (cs - 1):
        out.append((lo, hi, f"L2 entry {e:#x} has an unaligned host offset"))
    for sc in range(geo.subclusters_per_cluster):
        if sc_type(e, bm, sc, has_data_file) is SC.INVALID:
            out.append((lo + sc * scs, lo + (sc + 1) * scs,
                        f"invalid subcluster state in L2 entry {e:#x}"))
    return out


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
        tr = scan_l2(table, self.geo, self.has_data_file)
        self._entries[key] = (weakref.ref(table), raw, tr)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return tr
