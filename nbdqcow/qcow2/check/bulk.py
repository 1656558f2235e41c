"""The check's per-table and per-cluster loops done with whole-array operations (numpy,
see :mod:`nbdqcow.qcow2.scan`) where a table holds nothing unusual.

Each function answers only the common case and says so (returns True / a result);
otherwise the caller runs its entry-by-entry code, which is what defines the messages
and their order.  So the bulk paths never report anything: they count, and skip what
is zero.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from nbdqcow.qcow2 import l2masks as M
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.check.stored import Stored
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.scan import allocated_mask, words_of

if TYPE_CHECKING:  # numpy.typing costs an import ~10 ms: for the type checker only
    import numpy.typing as npt

    U64 = npt.NDArray[np.uint64]
    from nbdqcow.qcow2.mapping_summary import MappingSummary



def load_words(raw: bytes) -> U64:
    """A big-endian table as native uint64 (numpy swaps faster than array.byteswap)."""
    return np.frombuffer(raw, dtype=">u8", count=len(raw) // 8).astype(np.uint64)


def entries(words: array[int] | U64, geo: Geometry) -> tuple[U64, U64 | None, npt.NDArray[np.intp]]:
    """(entries, bitmaps or None, indices of the entries that are not all zero)."""
    w = words_of(words)
    if geo.extended_l2:
        e, bm = w[0::2], w[1::2]
        return e, bm, np.flatnonzero((e | bm) != 0)
    return w, None, np.flatnonzero(w != 0)


def nonzero_entries(words: array[int], geo: Geometry) -> list[int]:
    """Word indices of the entries that are not all zero (an all-zero entry counts
    nothing and is never wrong)."""
    _, _, idx = entries(words, geo)
    return (idx * geo.l2_entry_words).tolist()  # type: ignore[no-any-return]


def as_array(counts: array[int]) -> npt.NDArray[np.uint64]:
    return np.frombuffer(counts, dtype=np.dtype(counts.typecode)).astype(np.uint64)


def differences(counted: npt.NDArray[np.uint64], stored: npt.NDArray[np.uint64],
                n: int) -> tuple[list[int], int]:
    """Clusters below ``n`` whose counts differ, and the highest cluster with a count
    (0 when none)."""
    a = np.zeros(n, dtype=np.uint64)
    b = np.zeros(n, dtype=np.uint64)
    a[: min(n, len(counted))] = counted[:n]
    b[: min(n, len(stored))] = stored[:n]
    used = np.flatnonzero((a | b) != 0)
    highest = int(used[-1]) if len(used) else 0
    return np.flatnonzero(a != b).tolist(), highest


def allocated_entries(words: array[int] | U64, geo: Geometry, has_data_file: bool) -> U64:
    """The entries of an L2 table that own a host cluster (standard: NORMAL or
    ZERO_ALLOC), compressed ones left out."""
    e, _, idx = entries(words, geo)
    e = e[idx]
    e = e[(e & M.COMP) == 0]
    out: U64 = e[allocated_mask(e, has_data_file)]
    return out


def copied_mismatch(e: U64, geo: Geometry, stored: npt.NDArray[np.uint64],
                    has_data_file: bool) -> bool | None:
    """Whether any of the allocated entries ``e`` (:func:`allocated_entries`) has a
    COPIED flag that disagrees with its stored refcount (``stored``: every cluster's
    refcount); None when the entry-by-entry walk has to tell (a host cluster beyond
    the stored table)."""
    if not len(e):
        return False
    copied = (e & M.COPIED) != 0
    if has_data_file:
        return bool((~copied).any())
    clusters = ((e & M.OFF) >> np.uint64(geo.cluster_bits)).astype(np.intp)
    if int(clusters.max()) >= len(stored):
        return None
    return bool(((stored[clusters] == 1) != copied).any())


def stored_counts(stored: Stored, n: int) -> npt.NDArray[np.uint64] | None:
    """The stored refcounts of clusters [0, n) (0 where no block is allocated); None if
    a refcount block among them is unusable (the entry-by-entry code reports it)."""
    per = stored.geo.refcount_block_entries
    parts: list[npt.NDArray[np.uint64]] = []
    for rti in range((n + per - 1) // per):
        if rti >= len(stored.table) or not stored.table[rti] & L.REFT_OFFSET_MASK:
            parts.append(np.zeros(per, dtype=np.uint64))
            continue
        blk = stored.block(rti)
        if blk is None:
            return None
        parts.append(as_array(blk))
    if not parts:
        return np.zeros(0, dtype=np.uint64)
    return np.concatenate(parts)[:n]


@dataclass
class GuestMap:
    """Where the active L1's allocated clusters lie, as the walk saw them: enough for the
    mapping summary of ``nbdqcow check`` without a second walk (standard L2 tables)."""

    cluster_size: int
    l2_size: int
    guest_size: int
    guest: list[npt.NDArray[np.int64]] = field(default_factory=list)  # guest clusters
    host: list[U64] = field(default_factory=list)  # their host offsets

    def add(self, l1_index: npt.NDArray[np.intp], index: npt.NDArray[np.intp],
            host: U64) -> None:
        """Entries ``index`` of the L2 tables of L1 entries ``l1_index``, at ``host``."""
        self.guest.append(l1_index.astype(np.int64) * self.l2_size + index)
        self.host.append(host)

    def summary(self) -> MappingSummary:
        """What :func:`nbdqcow.qcow2.layout_view.mapping_summary` says of the image."""
        from nbdqcow.qcow2.mapping_summary import MappingSummary

        cs = self.cluster_size
        if self.guest:
            guest = np.concatenate(self.guest) * cs
            host = np.concatenate(self.host).astype(np.int64)
        else:
            guest = host = np.zeros(0, dtype=np.int64)
        keep = guest < self.guest_size
        guest, host = guest[keep], host[keep]
        if not len(guest):
            return MappingSummary(cs, 0, 0, None, 0)
        if len(guest) > 1 and not (guest[1:] > guest[:-1]).all():
            order = np.argsort(guest, kind="stable")
            guest, host = guest[order], host[order]
        nbytes = np.minimum(cs, self.guest_size - guest)
        delta = host - guest
        cont = (np.diff(guest) == cs) & (np.diff(host) == cs)
        runs = int(len(guest) - np.count_nonzero(cont))
        deltas, inv = np.unique(delta, return_inverse=True)
        by_bytes = np.bincount(inv, weights=nbytes)
        clusters = np.bincount(inv)
        # most bytes; of equals the lowest offset (deltas ascend: argmax takes the first)
        best = int(np.argmax(by_bytes))
        mapped = len(guest)
        return MappingSummary(cs, mapped, runs, int(deltas[best]),
                              mapped - int(clusters[best]))
