"""Guest -> host runs (qcow2.txt "Cluster mapping", "Extended L2 Entries").

One generator serves read, write and block status: it walks L1/L2 (and subcluster
bitmaps) and yields maximal runs ``(guest_offset, length, state, host)`` where ``host``
is the host byte offset for states with a host cluster, the raw L2 entry for COMPRESSED,
and 0 otherwise.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator

from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.entries import HAS_HOST, SC, bitmap_valid, sc_type, std_type
from nbdqcow.qcow2.geometry import Geometry

Run = tuple[int, int, SC, int]
_NOT_PLAIN = L.QCOW_OFLAG_COMPRESSED | L.QCOW_OFLAG_ZERO


def iter_runs(
    geo: Geometry,
    l2_for_read: Callable[[int], array[int] | None],
    offset: int,
    length: int,
    has_data_file: bool,
    on_invalid: Callable[[str], None],
) -> Iterator[Run]:
    cb = geo.cluster_bits
    cs = geo.cluster_size
    cmask = cs - 1
    l2_mask = geo.l2_size - 1
    l1_shift = geo.l2_bits + cb
    ext = geo.extended_l2
    scb = geo.subcluster_bits
    end = offset + length
    pos = offset
    cur_start = cur_len = cur_host = 0
    cur_state: SC | None = None

    while pos < end:
        l1i = pos >> l1_shift
        span_end = min(end, (l1i + 1) << l1_shift)
        table = l2_for_read(l1i)
        if table is None:
            pieces: list[Run] = [(pos, span_end - pos, SC.UNALLOCATED_PLAIN, 0)]
        else:
            pieces = []
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
