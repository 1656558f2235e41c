"""Guest -> host runs (qcow2.txt "Cluster mapping", "Extended L2 Entries").

One generator serves read, write and block status: it walks L1/L2 (and subcluster
bitmaps) and yields maximal runs ``(guest_offset, length, state, host)`` where ``host``
is the host byte offset for states with a host cluster, the raw L2 entry for COMPRESSED,
and 0 otherwise.

A range that covers many clusters of a table takes the table's run decomposition from
the bulk scanner (:mod:`nbdqcow.qcow2.scan`, imported on first use: it brings numpy);
a short range walks its few entries one by one.  Both give the same runs.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.entries import HAS_HOST, SC, bitmap_valid, sc_type, std_type
from nbdqcow.qcow2.geometry import Geometry

if TYPE_CHECKING:
    from nbdqcow.qcow2.scan import TableRuns
    from nbdqcow.qcow2.scancache import ScanCache

Run = tuple[int, int, SC, int]
#: ranges of at least this many clusters of one table are scanned in bulk (nbdqcow.qcow2.scan)
BULK_MIN_CLUSTERS = 64
_NOT_PLAIN = L.QCOW_OFLAG_COMPRESSED | L.QCOW_OFLAG_ZERO


def iter_runs(
    geo: Geometry,
    l2_for_read: Callable[[int], array[int] | None],
    offset: int,
    length: int,
    has_data_file: bool,
    on_invalid: Callable[[str], None],
    cache: ScanCache | None = None,
    bulk_min: int = BULK_MIN_CLUSTERS,
) -> Iterator[Run]:
    """Maximal runs of [offset, offset+length).  ``cache`` keeps bulk scans of tables
    for later calls; ``bulk_min``: clusters of one table from which the bulk scanner
    is used (0: always)."""
    cb = geo.cluster_bits
    l1_shift = geo.l2_bits + cb
    end = offset + length
    pos = offset
    cur_start = cur_len = cur_host = 0
    cur_state: SC | None = None

    while pos < end:
        l1i = pos >> l1_shift
        base = l1i << l1_shift
        span_end = min(end, base + (1 << l1_shift))
        table = l2_for_read(l1i)
        pieces: list[Run] | Iterator[Run]
        if table is None:
            pieces = [(pos, span_end - pos, SC.UNALLOCATED_PLAIN, 0)]
        elif ((span_end - 1) >> cb) - (pos >> cb) + 1 >= bulk_min:
            if cache is not None:
                tr = cache.runs(table)
            else:
                from nbdqcow.qcow2.scan import scan_l2

                tr = scan_l2(table, geo, has_data_file)
            pieces = _bulk_pieces(tr, base, pos, span_end, on_invalid)
        else:
            pieces = _entry_pieces(geo, table, pos, span_end, has_data_file, on_invalid)
        for start, n, t, h in pieces:
            if (
                cur_state is t
                and t is not SC.COMPRESSED
                and cur_start + cur_len == start
                and (t not in HAS_HOST or cur_host + cur_len == h)
            ):
                cur_len += n
                continue
            if cur_state is not None:
                yield (cur_start, cur_len, cur_state, cur_host)
            cur_start, cur_len, cur_state, cur_host = start, n, t, h
        pos = span_end
    if cur_state is not None:
        yield (cur_start, cur_len, cur_state, cur_host)


def _bulk_pieces(tr: TableRuns, base: int, pos: int, span_end: int,
                 on_invalid: Callable[[str], None]) -> list[Run]:
    """The runs of a scanned table clipped to [pos, span_end) (absolute offsets), after
    reporting the invalid entries that range touches."""
    lo, hi = pos - base, span_end - base
    for s, e, why in tr.invalid:
        if s < hi and e > lo:
            on_invalid(why)
    starts, lengths, states, hosts = tr.starts, tr.lengths, tr.states, tr.hosts
    i = bisect_right(starts, lo) - 1
    out: list[Run] = []
    while i < len(starts) and starts[i] < hi:
        s = starts[i]
        t = states[i]
        a = max(s, lo)
        b = min(s + lengths[i], hi)
        h = hosts[i]
        if t in HAS_HOST:
            h += a - s
        out.append((base + a, b - a, t, h))
        i += 1
    return out


def _entry_pieces(geo: Geometry, table: array[int], pos: int, span_end: int,
                  has_data_file: bool, on_invalid: Callable[[str], None]) -> list[Run]:
    """The pieces of [pos, span_end) (inside one table), entry by entry."""
    cb = geo.cluster_bits
    cs = geo.cluster_size
    cmask = cs - 1
    l2_mask = geo.l2_size - 1
    ext = geo.extended_l2
    scb = geo.subcluster_bits
    pieces: list[Run] = []
    p = pos
    while p < span_end:
        idx = (p >> cb) & l2_mask
        c_end = min(span_end, (p | cmask) + 1)
        if not ext:
            e = table[idx]
            if not e & _NOT_PLAIN and e & L.L2E_OFFSET_MASK:
                # hot path: a plain data cluster, extended in place when contiguous
                h = e & L.L2E_OFFSET_MASK
                if h & cmask:
                    on_invalid(f"L2 entry {e:#x} has an unaligned host offset")
                h += p & cmask
                if pieces and pieces[-1][2] is SC.NORMAL:
                    ps, pn, _, ph = pieces[-1]
                    if ps + pn == p and ph + pn == h:
                        pieces[-1] = (ps, pn + c_end - p, SC.NORMAL, ph)
                        p = c_end
                        continue
                pieces.append((p, c_end - p, SC.NORMAL, h))
                p = c_end
                continue
            t = std_type(e, has_data_file)
            if t in HAS_HOST:
                h = e & L.L2E_OFFSET_MASK
                if h & cmask:
                    on_invalid(f"L2 entry {e:#x} has an unaligned host offset")
                pieces.append((p, c_end - p, t, h + (p & cmask)))
            else:
                pieces.append((p, c_end - p, t, e if t is SC.COMPRESSED else 0))
        else:
            e = table[2 * idx]
            bm = table[2 * idx + 1]
            if not bitmap_valid(e, bm, has_data_file):
                on_invalid(f"invalid extended L2 entry {e:#x} bitmap {bm:#x}")
            if e & L.QCOW_OFLAG_COMPRESSED:
                pieces.append((p, c_end - p, SC.COMPRESSED, e))
            else:
                h = e & L.L2E_OFFSET_MASK
                if h & cmask:
                    on_invalid(f"L2 entry {e:#x} has an unaligned host offset")
                q = p
                while q < c_end:
                    sc = (q >> scb) & 31
                    s_end = min(c_end, ((q >> scb) + 1) << scb)
                    t = sc_type(e, bm, sc, has_data_file)
                    if t is SC.INVALID:
                        on_invalid(f"invalid subcluster state in L2 entry {e:#x}")
                    pieces.append((q, s_end - q, t, h + (q & cmask) if t in HAS_HOST else 0))
                    q = s_end
        p = c_end
    return pieces
