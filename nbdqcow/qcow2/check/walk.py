"""Counting every reference an image holds (qcow2.txt "Host cluster management",
"Cluster mapping", "Snapshots", "Bitmaps").

The walk visits the header cluster, the active and the snapshots' L1 tables, their L2
tables and data clusters (each host cluster a compressed cluster touches), the snapshot
table, the bitmap directory with its bitmap tables and data clusters, the LUKS header
area, the refcount table and its blocks -- and counts them in memory, reporting what it
finds malformed on the way (with ``FIX_ERRORS`` it also repairs unaligned preallocated
zero clusters).
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from nbdqcow.block.hostfile import HostFile
from nbdqcow.errors import ImageOpenError
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.bitmaps import BITMAP_ENTRY, BITMAP_EXT, BME_TABLE_OFFSET_MASK
from nbdqcow.qcow2.check import bulk, sweep
from nbdqcow.qcow2.check.result import FIX_ERRORS, CheckFailed, CheckResult
from nbdqcow.qcow2.check.stored import read_at
from nbdqcow.qcow2.entries import SC, std_type
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.header import Header
from nbdqcow.qcow2.tables import load_u64, store_u64

if TYPE_CHECKING:
    import numpy.typing as npt

MAX_CLUSTERS = 1 << 31  # qemu-img check gives up beyond INT_MAX clusters as well
KEEP_ENTRIES = 4 << 20  # active entries kept from the walk for the mapping line
GROUP_BYTES = 32 << 20  # L2 tables classified together (bounds the walk's memory)
_COUNT_CODES = {8: "B", 16: "H", 32: "L" if array("I").itemsize != 4 else "I", 64: "Q"}

# snapshot table entry, fixed part: l1_table_offset, l1_size, id_str_size, name_size,
# date_sec, date_nsec, vm_clock_nsec, vm_state_size, extra_data_size
_SNAP_ENTRY = struct.Struct(">QIHHIIQII")
_MAX_SNAPSHOT_EXTRA = 1024


def count_array(refcount_bits: int, n: int) -> array[int]:
    code = _COUNT_CODES[max(8, refcount_bits)]
    return array(code, bytes(array(code).itemsize * n))


@dataclass
class _Pending:
    """Regular L2 tables of one sweep not yet counted: ``items`` are (table offset, L1
    index, position in the sweep), in the walk's order."""

    sweep: sweep.Sweep
    active: bool
    l1_index: npt.NDArray[np.intp]  # per position
    items: list[tuple[int, int, int]] = field(default_factory=list)


class Walk:
    """One pass over an image: counted refcounts, figures and error messages.

    ``SWEEP`` False walks every L2 table entry by entry (the definition the sweep is
    tested against).

    ``stored``: the stored refcount of every cluster (when readable), to tell which
    active L2 tables' COPIED flags all agree with them (``copied_clean``).
    """

    SWEEP = True

    def __init__(self, file: HostFile, header: Header, res: CheckResult, fix: int = 0,
                 stored: bulk.U64 | None = None) -> None:
        self.file = file
        self.fix = fix
        self.h = header
        self.geo = Geometry(header.cluster_bits, header.refcount_order, header.extended_l2)
        self.cs = self.geo.cluster_size
        self.res = res
        self.file_size = file.size()
        nb = self.geo.size_to_clusters(self.file_size)
        if nb > MAX_CLUSTERS:
            raise CheckFailed("File too large")
        self.ref = count_array(self.geo.refcount_bits, nb)
        self.rebuild = False
        self.outside: list[int] = []  # refcount blocks past the end of the file
        self.refblock_errors = 0
        self.stored_counts = stored
        # active L2 tables (offsets) whose COPIED flags agree with the stored refcounts
        self.copied_clean: set[int] = set()
        self._pending: _Pending | None = None
        self.kept_entries = 0
        # where the active clusters lie (standard L2, no data file), for the mapping line
        self.guest_map: bulk.GuestMap | None = None
        if not header.extended_l2 and not header.has_data_file:
            self.guest_map = bulk.GuestMap(self.cs, self.geo.l2_size, header.size)

    def msg(self, text: str) -> None:
        if self._pending is not None and self._pending.items:
            self._flush()
        self.res.messages.append(text)

    # --- the in-memory refcount table ------------------------------------------------
    def inc(self, offset: int, size: int) -> None:
        if size <= 0:
            return
        if self._pending is not None and self._pending.items:
            self._flush()
        if offset + size - self.file_size >= self.cs:
            self.msg("ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset {offset:#x} size {size:#x}")
            self.res.corruptions += 1
            return
        first = offset >> self.geo.cluster_bits
        last = (offset + size - 1) >> self.geo.cluster_bits
        if last >= len(self.ref):
            self.ref.extend(count_array(self.geo.refcount_bits, last + 1 - len(self.ref)))
        top = self.geo.refcount_max
        for c in range(first, last + 1):
            if self.ref[c] >= top:
                self.msg(f"ERROR: overflow cluster offset={c << self.geo.cluster_bits:#x}")
                self.res.corruptions += 1
                continue
            self.ref[c] += 1

    # --- L1 / L2 ---------------------------------------------------------------------
    def l1(self, offset: int, l1_size: int, active: bool) -> None:
        self.inc(offset, l1_size * 8)
        table = load_u64(read_at(self.file, l1_size * 8, offset)) if l1_size else array("Q")
        cs = self.cs
        # the L2 tables this L1 reaches are read and classified a group at a time
        # (sweep.py); the regular ones are counted in bulk (see _flush), the others
        # entry by entry (l2), in the order of the L1 table either way
        todo = [i for i, e in enumerate(table)
                if e and not e & L.L1E_OFFSET_MASK & (cs - 1)] if self.SWEEP else []
        group = max(1, GROUP_BYTES // cs)
        swept = 0
        where: dict[int, int] = {}
        for l1i, e in enumerate(table):
            if e & L.L1E_RESERVED_MASK:
                if active:
                    self.guest_map = None
                self.msg(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.res.corruptions += 1
            if not e:
                continue
            # like qemu-img, an entry with flags but no offset points at cluster 0
            l2 = e & L.L1E_OFFSET_MASK
            if swept < len(todo) and todo[swept] == l1i:
                where = self._sweep(table, todo[swept:swept + group], active)
                swept += group
            k = where.get(l1i)
            p = self._pending
            if k is not None and p is not None and l2 < self.file_size and p.sweep.regular[k]:
                p.items.append((l2, l1i, k))
                continue
            self.inc(l2, cs)
            if l2 & (cs - 1):
                self.msg(f"ERROR l2_offset={l2:x}: Table is not cluster aligned; "
                         "L1 entry corrupted")
                self.res.corruptions += 1
                if active:
                    self.guest_map = None
                continue
            self.l2(l2, active, l1i)
        self._flush()

    def _sweep(self, table: array[int], part: list[int], active: bool) -> dict[int, int]:
        """Read and classify the L2 tables of L1 entries ``part``; returns the position
        of each entry in the sweep."""
        self._flush()
        sw = sweep.sweep(self.file, [table[i] & L.L1E_OFFSET_MASK for i in part], self.geo,
                         self.h.has_data_file, self.stored_counts if active else None)
        self._pending = _Pending(sw, active, np.array(part, dtype=np.intp))
        return {i: k for k, i in enumerate(part)}

    def _flush(self) -> None:
        """Count the regular tables put aside since the last flush (and each one's own
        cluster): in one operation when no refcount overflows, else one entry at a time
        in their order, as if they had never been put aside."""
        p = self._pending
        if p is None or not p.items:
            return
        items, p.items = p.items, []
        sw, cb = p.sweep, self.geo.cluster_bits
        lo, hi = items[0][2], items[-1][2]
        span = sw.entries_of(lo, hi)
        own = np.array([l2 >> cb for l2, _, _ in items], dtype=np.intp)
        if self.h.has_data_file:
            clusters = own
        else:
            clusters = np.concatenate((own, (sw.host[span] >> np.uint64(cb)).astype(np.intp)))
        if not self._add_counts(clusters):
            for l2, l1i, _ in items:
                self.inc(l2, self.cs)
                self.l2(l2, p.active, l1i)
            return
        if not p.active:
            return
        self.res.allocated_clusters += int(sw.allocated[lo:hi + 1].sum())
        self.res.fragmented_clusters += int(sw.fragmented[lo:hi + 1].sum())
        self.copied_clean.update(l2 for l2, _, k in items if sw.copied_ok[k])
        gm = self.guest_map
        if gm is not None:
            n = span.stop - span.start
            if self.kept_entries + n > KEEP_ENTRIES:
                self.guest_map = None
            else:
                self.kept_entries += n
                gm.add(p.l1_index[sw.pos[span]], sw.index[span], sw.host[span])

    def _add_counts(self, clusters: npt.NDArray[np.intp]) -> bool:
        """One reference more to each of ``clusters`` (repeats count again), unless a
        refcount would overflow: then nothing is changed and False returned."""
        if not len(clusters):
            return True
        view = np.frombuffer(self.ref, dtype=np.dtype(self.ref.typecode))
        if len(clusters) * 4 >= len(view):
            counts = np.bincount(clusters, minlength=len(view))
            which = np.flatnonzero(counts)
            counts = counts[which]
        else:
            which, counts = np.unique(clusters, return_counts=True)
        new = view[which].astype(np.uint64) + counts.astype(np.uint64)
        if self.geo.refcount_bits < 64 and int(new.max()) > self.geo.refcount_max:
            return False
        view[which] = new
        return True

    def l2(self, offset: int, active: bool, l1i: int = 0) -> None:
        """Count (and report) one L2 table entry by entry."""
        geo, res = self.geo, self.res
        ext = geo.extended_l2
        raw = read_at(self.file, self.cs, offset)
        data_file = self.h.has_data_file
        if active:
            self.guest_map = None
        words = load_u64(raw)
        step = geo.l2_entry_words
        next_contiguous = 0
        for i in bulk.nonzero_entries(words, geo):
            e = words[i]
            bm = words[i + 1] if ext else 0
            if e & L.QCOW_OFLAG_COMPRESSED:
                if e & L.QCOW_OFLAG_COPIED:
                    coff = e & geo.cluster_offset_mask
                    self.msg(f"ERROR: coffset=0x{coff:x}: copied flag must never be set "
                             "for compressed clusters")
                    res.corruptions += 1
                if bm:
                    self.msg(f"ERROR compressed cluster {i // step} with non-zero subcluster "
                             f"allocation bitmap, entry=0x{e:x}")
                    res.corruptions += 1
                coff, csize = geo.compressed_extent(e & ~L.QCOW_OFLAG_COPIED)
                self.inc(coff, csize)
                if active:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1  # compressed clusters are fragmented
                continue
            if e & L.L2E_STD_RESERVED_MASK:
                self.msg(f"ERROR found l2 entry with reserved bits set: {e:x}")
                res.corruptions += 1
            if ext:
                has_host = bool(e & L.L2E_OFFSET_MASK) or (data_file and bool(e & L.QCOW_OFLAG_COPIED))
                t = SC.NORMAL if has_host else SC.UNALLOCATED_PLAIN
                alloc = bm & L.L2_BITMAP_ALLOC_ALL
                if not has_host and alloc:
                    self.msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                    res.corruptions += 1
                elif alloc & (bm >> 32):
                    self.msg(f"ERROR: invalid subcluster bitmap 0x{bm:x} (allocated and zero) "
                             f"in L2 entry 0x{e:x}")
                    res.corruptions += 1
            else:
                t = std_type(e, data_file)
            if t not in (SC.NORMAL, SC.ZERO_ALLOC):
                continue
            host = e & L.L2E_OFFSET_MASK
            if active:
                res.allocated_clusters += 1
                if next_contiguous and host != next_contiguous:
                    res.fragmented_clusters += 1
                next_contiguous = host + self.cs
            if host & (self.cs - 1):
                data = bool(bm & L.L2_BITMAP_ALLOC_ALL) if ext else not e & L.QCOW_OFLAG_ZERO
                if data:
                    self.msg(f"ERROR offset={host:x}: Data cluster is not properly aligned; "
                             "L2 entry corrupted.")
                    res.corruptions += 1
                elif self.fix & FIX_ERRORS and offset >= self.cs:
                    # a preallocated zero cluster: keep it reading zero, drop the offset
                    self.msg(f"Repairing offset={host:x}: Preallocated cluster is not properly "
                             "aligned; L2 entry corrupted.")
                    if ext:
                        words[i], words[i + 1] = 0, L.L2_BITMAP_ZERO_ALL
                    else:
                        words[i] = L.QCOW_OFLAG_ZERO
                    self.file.pwrite(store_u64(words), offset)
                    res.corruptions_fixed += 1
                    continue
                else:
                    self.msg(f"ERROR offset={host:x}: Preallocated cluster is not properly "
                             "aligned; L2 entry corrupted.")
                    res.corruptions += 1
            if not data_file:
                self.inc(host, self.cs)

    # --- cold metadata ---------------------------------------------------------------
    def snapshots(self) -> None:
        """Walk the snapshot table like qemu-img check: an entry that runs past the end
        of the file ends the table (a corruption); an entry whose L1 table is unaligned
        or too large is a corruption and is not followed."""
        h = self.h
        if not h.nb_snapshots:
            return
        base = h.snapshots_offset
        pos = 0
        for i in range(h.nb_snapshots):
            if pos > L.MAX_SNAPSHOTS * 1024 * 64:
                self.msg("ERROR snapshot table is too big")
                self.res.corruptions += 1
                break
            fixed = read_at(self.file, _SNAP_ENTRY.size, base + pos)
            l1_off, l1_size, id_len, name_len, *_, extra_len = _SNAP_ENTRY.unpack(fixed)
            if extra_len > _MAX_SNAPSHOT_EXTRA:
                raise ImageOpenError(f"Too much extra metadata in snapshot table entry {i}")
            names = base + pos + _SNAP_ENTRY.size + extra_len
            end = pos + _SNAP_ENTRY.size + extra_len + id_len + name_len
            if base + end > self.file_size:
                self.msg(f"ERROR snapshot table entry {i} is incomplete")
                self.res.corruptions += 1
                pos = end
                break
            pos = (end + 7) & ~7
            raw = read_at(self.file, id_len + name_len, names)
            sid = raw[:id_len].decode("utf-8", "replace")
            name = raw[id_len:].decode("utf-8", "replace")
            if l1_off & (self.cs - 1):
                self.msg(f"ERROR snapshot {sid} ({name}) l1_offset={l1_off:#x}: L1 table is "
                         "not cluster aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if l1_size * 8 > L.MAX_L1_BYTES:
                self.msg(f"ERROR snapshot {sid} ({name}) l1_size={l1_size:#x}: L1 table is "
                         "too large; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            self.l1(l1_off, l1_size, False)
        self.inc(base, pos)

    def bitmaps(self) -> None:
        h = self.h
        ext = h.extension(L.EXT_BITMAPS)
        if ext is None or not h.autoclear_features & L.AUTOCLEAR_BITMAPS:
            return
        if len(ext) < BITMAP_EXT.size:
            self.msg("ERROR bitmaps header extension is truncated")
            self.res.corruptions += 1
            return
        count, _, dsize, doff = BITMAP_EXT.unpack_from(ext)
        if not count:
            return
        self.inc(doff, dsize)
        buf = read_at(self.file, dsize, doff)
        pos = 0
        for _ in range(count):
            if pos + BITMAP_ENTRY.size > len(buf):
                self.msg("ERROR bitmap directory is truncated")
                self.res.corruptions += 1
                return
            toff, tsize, _, _, _, nlen, elen = BITMAP_ENTRY.unpack_from(buf, pos)
            pos = (pos + BITMAP_ENTRY.size + elen + nlen + 7) & ~7
            self.inc(toff, tsize * 8)
            for e in load_u64(read_at(self.file, tsize * 8, toff)):
                off = e & BME_TABLE_OFFSET_MASK
                if off:
                    self.inc(off, self.cs)

    def crypto_header(self) -> None:
        ext = self.h.extension(L.EXT_CRYPTO)
        if self.h.crypt_method and ext is not None and len(ext) >= 16:
            offset, length = struct.unpack_from(">QQ", ext)
            self.inc(offset, length)

    # --- refcount structure ----------------------------------------------------------
    def refcount_structure(self, reftable: array[int]) -> None:
        h = self.h
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        nb = self.geo.size_to_clusters(self.file_size)
        for i, e in enumerate(reftable):
            if e & (self.cs - 1):
                self.msg(f"ERROR refcount block {i} is not cluster aligned; "
                         "refcount table entry corrupted")
                self.res.corruptions += 1
                self.refblock_errors += 1
                self.rebuild = True
                continue
            c = e >> self.geo.cluster_bits
            if c >= nb:
                if self.fix & FIX_ERRORS:
                    # qemu-img grows the file to hold the block, then finds the block has
                    # no refcount and rebuilds; the rebuild alone does the same job here
                    self.msg(f"Repairing refcount block {i} is outside image")
                    self.res.corruptions_fixed += 1
                    self.outside.append(c)
                else:
                    self.msg(f"ERROR refcount block {i} is outside image")
                    self.res.corruptions += 1
                continue
            if e:
                self.inc(e, self.cs)
                if self.ref[c] != 1:
                    self.msg(f"ERROR refcount block {i} refcount={self.ref[c]}")
                    self.res.corruptions += 1
                    self.refblock_errors += 1
                    self.rebuild = True

    def count_all(self, with_refcount_structure: array[int] | None) -> None:
        h = self.h
        self.res.total_clusters = self.geo.size_to_clusters(h.size)
        self.inc(0, self.cs)
        self.l1(h.l1_table_offset, h.l1_size, True)
        self.snapshots()
        self.bitmaps()
        self.crypto_header()
        if with_refcount_structure is not None:
            self.refcount_structure(with_refcount_structure)
        self._flush()
