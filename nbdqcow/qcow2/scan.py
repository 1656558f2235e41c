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

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from nbdqcow.qcow2 import l2masks as M
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.entries import HAS_HOST, SC, bitmap_valid, sc_type, std_type
from nbdqcow.qcow2.geometry import Geometry

if TYPE_CHECKING:  # numpy.typing costs an import ~10 ms: for the type checker only
    import numpy.typing as npt

    U64 = npt.NDArray[np.uint64]
    Pieces = tuple[U64, U64, npt.NDArray[np.int8], U64]  # pos, length, state, host value

_STATES = tuple(SC)


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
    alloc: npt.NDArray[np.bool_] = (e & M.OFF) != 0
    if has_data_file:
        alloc |= (e & M.COPIED) != 0
    return alloc


def _has_host(state: npt.NDArray[np.int8]) -> npt.NDArray[np.bool_]:
    out: npt.NDArray[np.bool_] = (
        (state == int(SC.NORMAL)) | (state == int(SC.ZERO_ALLOC))
        | (state == int(SC.UNALLOCATED_ALLOC)))
    return out


def _runs(pieces: Pieces, span: int) -> TableRuns:
    """Merge consecutive pieces (ordered, contiguous) into maximal runs."""
    pos, lens, state, hval = pieces
    has_host = _has_host(state)
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


def _with_gaps(pieces: Pieces, idx: npt.NDArray[np.intp], n: int, cs: int) -> Pieces:
    """Add the unallocated stretches between the clusters ``idx`` (sorted) that
    ``pieces`` describe: the entries of the table left out because they are zero."""
    gap_start = np.concatenate(([0], idx + 1))
    gap_len = np.concatenate((idx, [n])) - gap_start
    keep = gap_len > 0
    if not keep.any():
        return pieces
    gpos = gap_start[keep].astype(np.uint64) * np.uint64(cs)
    glen = gap_len[keep].astype(np.uint64) * np.uint64(cs)
    zeros = np.zeros(len(gpos), dtype=np.uint64)
    pos = np.concatenate((pieces[0], gpos))
    order = np.argsort(pos, kind="stable")
    return (pos[order], np.concatenate((pieces[1], glen))[order],
            np.concatenate((pieces[2], zeros.astype(np.int8)))[order],
            np.concatenate((pieces[3], zeros))[order])


#: tables with at most this many non-zero entries are classified one entry at a time
#: (numpy's per-call cost is higher than a few Python steps)
FEW = 24


def scan_l2(table: array[int] | bytes | U64, geo: Geometry, has_data_file: bool,
            few: int = FEW) -> TableRuns:
    """The run decomposition of one L2 table (standard or extended).  Only the clusters
    whose entry is not zero are classified: a sparse table costs what its data costs."""
    w = words_of(table)
    cs = geo.cluster_size
    n = geo.l2_size
    span = n * cs
    if geo.extended_l2:
        e = w[0 : 2 * n : 2]
        bm = w[1 : 2 * n : 2]
        idx = np.flatnonzero((e | bm) != 0)
    else:
        e = w[:n]
        bm = None
        idx = np.flatnonzero(e != 0)
    if not len(idx):
        return TableRuns([0], [span], [SC.UNALLOCATED_PLAIN], [0])
    if len(idx) <= few:
        return _scan_few(e, bm, idx.tolist(), geo, has_data_file)
    dense = len(idx) == n
    ent = e if dense else e[idx]
    if bm is None:
        pieces, bad = _std_pieces(ent, idx, cs, has_data_file)
        invalid = [(i * cs, (i + 1) * cs, f"L2 entry {x:#x} has an unaligned host offset")
                   for i, x in zip(idx[bad].tolist(), ent[bad].tolist(), strict=True)]
    else:
        bms = bm if dense else bm[idx]
        pieces, bad = _ext_pieces(ent, bms, idx, geo, has_data_file)
        invalid = []
        for i, x, b in zip(idx[bad].tolist(), ent[bad].tolist(), bms[bad].tolist(), strict=True):
            invalid.extend(_ext_invalid(x, b, i, geo, has_data_file))
    if not dense:
        pieces = _with_gaps(pieces, idx, n, cs)
    out = _runs(pieces, span)
    out.invalid = invalid
    return out


def _scan_few(e: U64, bm: U64 | None, idx: list[int], geo: Geometry,
              has_data_file: bool) -> TableRuns:
    """scan_l2 for a table with few non-zero entries: those one by one, the rest gaps."""
    cs, scs = geo.cluster_size, geo.subcluster_size
    out = TableRuns([], [], [], [])
    starts, lengths, states, hosts = out.starts, out.lengths, out.states, out.hosts

    def add(pos: int, n: int, t: SC, h: int) -> None:
        if states:
            pt = states[-1]
            if (pt is t and t is not SC.COMPRESSED
                    and (t not in HAS_HOST or hosts[-1] + lengths[-1] == h)):
                lengths[-1] += n
                return
        starts.append(pos)
        lengths.append(n)
        states.append(t)
        hosts.append(h)

    prev = 0
    ents = e[idx].tolist()
    bms = bm[idx].tolist() if bm is not None else [0] * len(idx)
    for i, x, b in zip(idx, ents, bms, strict=True):
        if i > prev:
            add(prev * cs, (i - prev) * cs, SC.UNALLOCATED_PLAIN, 0)
        prev = i + 1
        if bm is None:
            t = std_type(x, has_data_file)
            h = x & L.L2E_OFFSET_MASK
            if t in HAS_HOST:
                if h & (cs - 1):
                    out.invalid.append((i * cs, (i + 1) * cs,
                                        f"L2 entry {x:#x} has an unaligned host offset"))
                add(i * cs, cs, t, h)
            else:
                add(i * cs, cs, t, x if t is SC.COMPRESSED else 0)
            continue
        out.invalid.extend(_ext_invalid(x, b, i, geo, has_data_file))
        if x & L.QCOW_OFLAG_COMPRESSED:
            add(i * cs, cs, SC.COMPRESSED, x)
            continue
        h = x & L.L2E_OFFSET_MASK
        for sc in range(geo.subclusters_per_cluster):
            t = sc_type(x, b, sc, has_data_file)
            add(i * cs + sc * scs, scs, t, h + sc * scs if t in HAS_HOST else 0)
    if prev < geo.l2_size:
        add(prev * cs, (geo.l2_size - prev) * cs, SC.UNALLOCATED_PLAIN, 0)
    return out


def _std_pieces(e: U64, idx: npt.NDArray[np.intp], cs: int,
                has_data_file: bool) -> tuple[Pieces, npt.NDArray[np.bool_]]:
    """One piece per standard entry; and which entries have an unaligned host offset."""
    host = e & M.OFF
    comp = (e & M.COMP) != 0
    alloc = allocated_mask(e, has_data_file)
    zero = (e & M.ZERO) != 0
    state = np.where(zero, np.where(alloc, int(SC.ZERO_ALLOC), int(SC.ZERO_PLAIN)),
                     np.where(alloc, int(SC.NORMAL), int(SC.UNALLOCATED_PLAIN)))
    state = np.where(comp, int(SC.COMPRESSED), state).astype(np.int8)
    has_host = ~comp & alloc
    hval = np.where(has_host, host, np.where(comp, e, np.uint64(0)))
    pos = idx.astype(np.uint64) * np.uint64(cs)
    bad = has_host & ((host & np.uint64(cs - 1)) != 0)
    return (pos, np.full(len(e), cs, dtype=np.uint64), state, hval), bad


def _ext_pieces(e: U64, bm: U64, idx: npt.NDArray[np.intp], geo: Geometry,
                has_data_file: bool) -> tuple[Pieces, npt.NDArray[np.bool_]]:
    """Pieces of extended entries: one per cluster whose subclusters are all in one
    state (the usual case), one per subcluster otherwise; and which entries are
    broken (see :func:`_ext_invalid`)."""
    cs = geo.cluster_size
    scs = geo.subcluster_size
    host = e & M.OFF
    comp = (e & M.COMP) != 0
    alloc = allocated_mask(e, has_data_file)
    abits = bm & M.LOW32
    zbits = bm >> M.S32
    none = (abits == 0) & (zbits == 0)
    all_data = (abits == M.LOW32) & (zbits == 0)
    all_zero = (abits == 0) & (zbits == M.LOW32)
    mixed = ~comp & ~(none | all_data | all_zero)
    cstate = np.where(none, np.where(alloc, int(SC.UNALLOCATED_ALLOC), int(SC.UNALLOCATED_PLAIN)),
                      np.where(all_zero, np.where(alloc, int(SC.ZERO_ALLOC), int(SC.ZERO_PLAIN)),
                               np.where(alloc, int(SC.NORMAL), int(SC.INVALID))))
    cstate = np.where(comp, int(SC.COMPRESSED), cstate)
    rep = np.where(mixed, geo.subclusters_per_cluster, 1)
    cl = np.repeat(np.arange(len(e)), rep)
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
    pos = idx[cl].astype(np.uint64) * np.uint64(cs) + k * np.uint64(scs)
    hval = np.where(_has_host(state), host[cl] + k * np.uint64(scs),
                    np.where(state == int(SC.COMPRESSED), e[cl], np.uint64(0)))
    bad = (comp & (bm != 0)) | (~comp & (((abits & zbits) != 0) | ((abits != 0) & ~alloc)
                                        | ((host & np.uint64(cs - 1)) != 0)))
    return (pos, lens, state, hval), bad


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
