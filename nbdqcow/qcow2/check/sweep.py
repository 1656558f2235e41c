"""The L2 tables of one L1 table read and classified together (qcow2.txt "Cluster
mapping"): the check's common case in a handful of whole-array operations instead of a
few per table.

Tables are read into one reused buffer a few at a time (adjacent tables in one read),
the non-zero entries of all of them found with one comparison, and only those entries
byte-swapped and classified.  A table is *regular* when it holds nothing the check has
to report or handle entry by entry (compressed entries, reserved bits, bad subcluster
bitmaps, unaligned host offsets, host clusters past the end of the file); the walk
counts the regular tables from this module's arrays and walks the others one entry at
a time (:mod:`nbdqcow.qcow2.check.walk`), which is what defines the messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nbdqcow.block.hostfile import HostFile
from nbdqcow.qcow2 import l2masks as M
from nbdqcow.qcow2.geometry import Geometry

if TYPE_CHECKING:  # numpy.typing costs an import ~10 ms: for the type checker only
    import numpy.typing as npt

    U64 = npt.NDArray[np.uint64]
    Ints = npt.NDArray[np.intp]


#: bytes of L2 tables read before they are scanned (they stay in the CPU's cache)
CHUNK_BYTES = 2 << 20


@dataclass
class Sweep:
    """What the regular tables among ``offsets`` hold.  Positions are indices into the
    ``offsets`` the sweep was given; entry arrays are ordered by position, then by
    index in the table, and hold only the allocated entries of regular tables."""

    regular: npt.NDArray[np.bool_]  # per position
    copied_ok: npt.NDArray[np.bool_]  # per position: every COPIED flag agrees (if known)
    allocated: Ints  # per position: allocated entries
    fragmented: Ints  # per position: qemu-img's fragmented clusters
    pos: Ints  # per entry: position of its table
    index: Ints  # per entry: index in its table
    host: U64  # per entry: host offset

    def entries_of(self, lo: int, hi: int) -> slice:
        """The entries of the tables at positions ``lo`` .. ``hi`` (inclusive)."""
        a = int(np.searchsorted(self.pos, lo, "left"))
        b = int(np.searchsorted(self.pos, hi, "right"))
        return slice(a, b)


def sweep(file: HostFile, offsets: list[int], geo: Geometry, has_data_file: bool,
          stored: U64 | None = None) -> Sweep:
    """Read and classify the L2 tables at ``offsets`` (cluster aligned).  ``stored``:
    every cluster's stored refcount, to tell which tables' COPIED flags all agree with
    them (``copied_ok`` is all False without it)."""
    cs = geo.cluster_size
    per_chunk = max(1, CHUNK_BYTES // cs)
    buf = np.empty(min(per_chunk, max(1, len(offsets))) * cs // 8, dtype=np.uint64)
    parts: list[tuple[Ints, Ints, U64, U64, U64 | None]] = []
    for first in range(0, len(offsets), per_chunk):
        chunk = offsets[first:first + per_chunk]
        _read_tables(file, chunk, buf, cs)
        parts.append(_nonzero(buf[: len(chunk) * cs // 8], first, geo))
    return _classify(parts, len(offsets), geo, has_data_file, file.size(), stored)


def _read_tables(file: HostFile, offsets: list[int], buf: npt.NDArray[np.uint64],
                 cs: int) -> None:
    """Tables ``offsets`` one after another into ``buf``; adjacent ones in one read."""
    mv = buf.data.cast("B")
    i = 0
    while i < len(offsets):
        j = i + 1
        while j < len(offsets) and offsets[j] == offsets[j - 1] + cs:
            j += 1
        file.preadinto(mv[i * cs: j * cs], offsets[i])
        i = j


def _nonzero(words: npt.NDArray[np.uint64], first: int, geo: Geometry
             ) -> tuple[Ints, Ints, U64, U64, U64 | None]:
    """(table position, index, entry, word position, bitmap) of the non-zero entries
    of tables read into ``words`` (big-endian), the first being position ``first``."""
    per = geo.l2_size * geo.l2_entry_words
    at = np.flatnonzero(words != 0)
    if geo.extended_l2:
        at &= ~1
        if len(at) > 1:
            at = at[np.concatenate(([True], at[1:] != at[:-1]))]
    big = words.view(">u8")
    e = big[at].astype(np.uint64)
    bm = big[at + 1].astype(np.uint64) if geo.extended_l2 else None
    pos = at // per
    index = (at - pos * per) // geo.l2_entry_words
    return pos + first, index, e, at.astype(np.uint64), bm


def _classify(parts: list[tuple[Ints, Ints, U64, U64, U64 | None]], n: int, geo: Geometry,
              has_data_file: bool, file_size: int, stored: U64 | None) -> Sweep:
    if parts:
        pos = np.concatenate([p[0] for p in parts])
        index = np.concatenate([p[1] for p in parts])
        e = np.concatenate([p[2] for p in parts])
        bms = [p[4] for p in parts if p[4] is not None]
        bm = np.concatenate(bms) if bms else None
    else:
        pos = index = np.zeros(0, dtype=np.intp)
        e = np.zeros(0, dtype=np.uint64)
        bm = None
    host = e & M.OFF
    alloc = host != 0
    if has_data_file:
        alloc |= (e & M.COPIED) != 0
    bad = (e & (M.COMP | M.RESERVED)) != 0
    bad |= alloc & ((host & np.uint64(geo.cluster_size - 1)) != 0)
    if not has_data_file:
        bad |= alloc & (host >= np.uint64(file_size))
    if bm is not None:
        abits = bm & M.LOW32
        bad |= ((abits & (bm >> M.S32)) != 0) | ((abits != 0) & ~alloc)
    regular = np.ones(n, dtype=np.bool_)
    regular[pos[bad]] = False
    keep = alloc & regular[pos]
    pos, index, host, e = pos[keep], index[keep], host[keep], e[keep]
    allocated = np.bincount(pos, minlength=n)
    step = np.diff(host.astype(np.int64)) != geo.cluster_size
    fragmented = np.bincount(pos[1:][step & (pos[1:] == pos[:-1])], minlength=n)
    copied_ok = _copied_ok(e, host, pos, n, geo, has_data_file, stored) & regular
    return Sweep(regular, copied_ok, allocated, fragmented, pos, index, host)


def _copied_ok(e: U64, host: U64, pos: Ints, n: int, geo: Geometry, has_data_file: bool,
               stored: U64 | None) -> npt.NDArray[np.bool_]:
    """Per position: every allocated entry's COPIED flag says what its stored refcount
    says (refcount 1 exactly when COPIED); False where that is not known."""
    copied = (e & M.COPIED) != 0
    if has_data_file:
        wrong = ~copied
    elif stored is None:
        return np.zeros(n, dtype=np.bool_)
    else:
        clusters = (host >> np.uint64(geo.cluster_bits)).astype(np.intp)
        inside = clusters < len(stored)
        rc1 = np.zeros(len(clusters), dtype=np.bool_)
        rc1[inside] = stored[clusters[inside]] == 1
        wrong = ~inside | (rc1 != copied)
    ok = np.ones(n, dtype=np.bool_)
    ok[pos[wrong]] = False
    return ok
