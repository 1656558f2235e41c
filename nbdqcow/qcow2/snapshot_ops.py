"""Internal snapshot operations: create, delete, apply (qcow2.txt "Snapshots",
"Host cluster management": a snapshot raises the refcount of everything its L1 reaches;
QCOW_OFLAG_COPIED is set exactly when a cluster's refcount is 1).

Refcount semantics as qemu counts them: every L1 table (active or snapshot) that reaches
a cluster counts once, so a data cluster behind an L2 table shared by two L1 tables has
refcount 2.

Crash-safe ordering for every operation: increments and new structures first (synced),
COPIED flags cleared before anything becomes shared, then the one-sector header switch,
then decrements and frees.  A crash at any point leaves at worst leaked clusters.

The image must be closed by everyone else: these functions open it writable, operate,
and close it.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterator

from nbdqcow.block.locking import Access
from nbdqcow.errors import ImageError
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.backing import no_backing
from nbdqcow.qcow2.driver import Qcow2Driver
from nbdqcow.qcow2.snapshot import (
    EXTRA_KNOWN,
    Snapshot,
    encode_table,
    read_snapshot_table,
)
from nbdqcow.qcow2.tables import load_u64, store_u64

COPIED = L.QCOW_OFLAG_COPIED
OFF_MASK = L.L2E_OFFSET_MASK
L1_MASK = L.L1E_OFFSET_MASK


class SnapshotError(ImageError):
    """A snapshot operation cannot be done (unknown name, duplicate name, ...)."""


# ------------------------------------------------------------------ helpers
def find_snapshot(snaps: list[Snapshot], key: str) -> int:
    """Index of the snapshot whose id, else name, is ``key`` (qemu-img's lookup)."""
    for i, s in enumerate(snaps):
        if s.id_str == key:
            return i
    for i, s in enumerate(snaps):
        if s.name == key:
            return i
    raise SnapshotError(f"snapshot '{key}' not found")


def next_snapshot_id(snaps: list[Snapshot]) -> str:
    """One more than the largest numeric id (as qemu's find_new_snapshot_id)."""
    best = 0
    for s in snaps:
        try:
            best = max(best, int(s.id_str))
        except ValueError:
            continue
    return str(best + 1)


def _data_clusters(d: Qcow2Driver, entry: int) -> Iterator[int]:
    """Host clusters one L2 entry holds (refcounted ones only)."""
    if d.header.has_data_file:
        return
    if entry & L.QCOW_OFLAG_COMPRESSED:
        yield from d.geo.compressed_host_clusters(entry)
    elif entry & OFF_MASK:
        yield (entry & OFF_MASK) >> d.geo.cluster_bits


def reach(d: Qcow2Driver, l1: array[int]) -> Iterator[int]:
    """Every cluster an L1 table reaches: each L2 table and each data cluster behind it
    (with multiplicity, one per reference)."""
    cb = d.geo.cluster_bits
    step = d.geo.l2_entry_words
    for e in l1:
        off = e & L1_MASK
        if not off:
            continue
        yield off >> cb
        table = d.l2_cache.get(off)
        for i in range(0, len(table), step):
            yield from _data_clusters(d, table[i])


def _apply_delta(d: Qcow2Driver, clusters: Iterator[int], delta: int) -> None:
    """Add ``delta`` to each cluster's refcount; all or nothing (a refcount that would
    overflow undoes the ones already changed, then raises)."""
    rc = d.refcounts
    done: list[int] = []
    try:
        for c in clusters:
            rc.update(c, delta)
            done.append(c)
    except BaseException:
        for c in reversed(done):
            rc.update(c, -delta)
        raise


def _sync_refcounts(d: Qcow2Driver) -> None:
    d.refcounts.flush()
    d.file.sync()


def recompute_copied(d: Qcow2Driver) -> None:
    """Set QCOW_OFLAG_COPIED in the active L1 and L2 tables exactly where the refcount
    is 1 (L2 entries first, then the L1 entry that points to their table)."""
    rc = d.refcounts
    cb = d.geo.cluster_bits
    step = d.geo.l2_entry_words
    ext_df = d.header.has_data_file
    for l1i, e in enumerate(d.l1):
        off = e & L1_MASK
        if not off:
            continue
        table = d.l2_cache.get(off)
        changed = False
        for i in range(0, len(table), step):
            ent = table[i]
            if ext_df or ent & L.QCOW_OFLAG_COMPRESSED or not ent & OFF_MASK:
                continue
            want = ent | COPIED if rc.get((ent & OFF_MASK) >> cb) == 1 else ent & ~COPIED
            if want != ent:
                table[i] = want
                changed = True
        if changed:
            d.l2_cache.mark_dirty(off)
        want1 = off | COPIED if rc.get(off >> cb) == 1 else off
        if want1 != e:
            d._set_l1(l1i, want1)


def _flush_tables(d: Qcow2Driver) -> None:
    """Write refcounts, then L2 tables, then the L1 (the driver's ordering) and sync."""
    d._flush()


def _write_new_table(d: Qcow2Driver, snaps: list[Snapshot]) -> tuple[int, int]:
    """Write ``snaps`` into newly allocated clusters; returns (offset, clusters)."""
    data = encode_table(snaps)
    if not data:
        return 0, 0
    cs = d.geo.cluster_size
    n = (len(data) + cs - 1) // cs
    first = d.refcounts.alloc(n)
    for c in range(first, first + n):
        d.meta.add(c)
    off = first << d.geo.cluster_bits
    _sync_refcounts(d)
    d.file.pwrite(data + bytes(n * cs - len(data)), off)
    d.file.sync()
    return off, n


def _switch_table(d: Qcow2Driver, old: list[Snapshot], new: list[Snapshot]) -> None:
    """Write the new table, switch the header to it, then free the old table."""
    h = d.header
    old_off = h.snapshots_offset
    old_n = (len(encode_table(old)) + d.geo.cluster_size - 1) // d.geo.cluster_size
    off, _ = _write_new_table(d, new)
    d.header = h.replace(nb_snapshots=len(new), snapshots_offset=off)
    d._write_header()
    d.file.sync()
    if old_off and old:
        first = old_off >> d.geo.cluster_bits
        for c in range(first, first + old_n):
            d.meta.discard(c)
            d.refcounts.update(c, -1)


def _read_l1(d: Qcow2Driver, offset: int, size: int) -> array[int]:
    if not size:
        return array("Q")
    return load_u64(d.file.pread(size * 8, offset))


def _alloc_l1(d: Qcow2Driver, l1: array[int]) -> int:
    if not len(l1):
        return 0
    cs = d.geo.cluster_size
    nbytes = len(l1) * 8
    n = max(1, (nbytes + cs - 1) // cs)
    first = d.refcounts.alloc(n)
    off = first << d.geo.cluster_bits
    _sync_refcounts(d)
    d.file.pwrite(store_u64(l1) + bytes(n * cs - nbytes), off)
    return off


def _free_l1_clusters(d: Qcow2Driver, offset: int, size: int) -> None:
    cs = d.geo.cluster_size
    n = max(1, (size * 8 + cs - 1) // cs)
    first = offset >> d.geo.cluster_bits
    for c in range(first, first + n):
        d.meta.discard(c)
        d.refcounts.update(c, -1)


def _open(path: str, access: Access | None) -> Qcow2Driver:
    d = Qcow2Driver.open(path, writable=True, backing=no_backing, access=access)
    try:
        if d.header.has_data_file:
            raise SnapshotError("internal snapshots are not supported with an external data file")
        if d.geo.refcount_max < 2:
            raise SnapshotError("internal snapshots need refcount_bits of at least 2")
        _flush_tables(d)
    except BaseException:
        d.close()
        raise
    return d


def _drop_unreferenced(d: Qcow2Driver, l1: array[int]) -> None:
    """Forget cached L2 tables of ``l1`` whose cluster was freed."""
    rc = d.refcounts
    for e in l1:
        off = e & L1_MASK
        if off and rc.get(off >> d.geo.cluster_bits) == 0:
            d.l2_cache.drop(off)
            d.meta.discard(off >> d.geo.cluster_bits)


# ------------------------------------------------------------------ operations
def create_snapshot(path: str, name: str, now_ns: int | None = None,
                    access: Access | None = None) -> Snapshot:
    """``qemu-img snapshot -c NAME``: record the current state of the disk."""
    d = _open(path, access)
    try:
        snaps = read_snapshot_table(d.file, d.header)
        if any(s.name == name for s in snaps):
            raise SnapshotError(f"a snapshot named '{name}' already exists")
        # 1. the snapshot's own L1 copy (no COPIED flags: they mean nothing there)
        copy = array("Q", (e & ~COPIED for e in d.l1))
        l1_off = _alloc_l1(d, copy)
        # 2. everything the active L1 reaches gets one more reference
        try:
            _apply_delta(d, reach(d, d.l1), +1)
        except BaseException:
            if l1_off:
                _free_l1_clusters(d, l1_off, len(copy))
            raise
        _sync_refcounts(d)
        # 3. nothing is exclusively owned any more: clear COPIED (L2 first, then L1)
        recompute_copied(d)
        _flush_tables(d)
        # 4. the new table, the header switch, then the old table's frees
        now = time.time_ns() if now_ns is None else now_ns
        snap = Snapshot(
            l1_table_offset=l1_off, l1_size=len(copy), id_str=next_snapshot_id(snaps),
            name=name, date_sec=now // 1_000_000_000, date_nsec=now % 1_000_000_000,
            vm_clock_nsec=0, vm_state_size=0, disk_size=d.size, icount=0,  # qemu-img records icount 0
            extra_data_size=EXTRA_KNOWN,
        )
        _switch_table(d, snaps, [*snaps, snap])
        _flush_tables(d)
        return snap
    finally:
        d.close()


def delete_snapshot(path: str, key: str, access: Access | None = None) -> Snapshot:
    """``qemu-img snapshot -d NAME`` (id or name): forget a snapshot and free what only
    it used."""
    d = _open(path, access)
    try:
        snaps = read_snapshot_table(d.file, d.header)
        gone = snaps[find_snapshot(snaps, key)]
        rest = [s for s in snaps if s is not gone]
        # 1. the table without it, header switch (crash now: leaks only)
        _switch_table(d, snaps, rest)
        _flush_tables(d)
        # 2. drop its references, free its L1
        sl1 = _read_l1(d, gone.l1_table_offset, gone.l1_size)
        _apply_delta(d, reach(d, sl1), -1)
        if gone.l1_size:
            _free_l1_clusters(d, gone.l1_table_offset, gone.l1_size)
        _drop_unreferenced(d, sl1)
        _sync_refcounts(d)
        # 3. clusters back to refcount 1 are owned by the active tables again
        recompute_copied(d)
        _flush_tables(d)
        return gone
    finally:
        d.close()


def apply_snapshot(path: str, key: str, access: Access | None = None) -> Snapshot:
    """``qemu-img snapshot -a NAME``: make the snapshot's state the active disk."""
    d = _open(path, access)
    try:
        snaps = read_snapshot_table(d.file, d.header)
        snap = snaps[find_snapshot(snaps, key)]
        size = snap.disk_size if snap.disk_size is not None else d.header.size
        if snap.l1_size < d.geo.l1_entries_for(size):
            raise SnapshotError(f"snapshot '{snap.name}' has an L1 table too small for its size")
        sl1 = _read_l1(d, snap.l1_table_offset, snap.l1_size)
        # 1. everything the snapshot reaches gets the active table's reference
        _apply_delta(d, reach(d, sl1), +1)
        _sync_refcounts(d)
        # 2. a new active L1 (no COPIED yet: everything in it is shared right now)
        new_l1 = array("Q", (e & ~COPIED for e in sl1))
        new_off = _alloc_l1(d, new_l1)
        d.file.sync()
        # 3. header switch
        old_l1, old_off = d.l1, d.l1_offset
        d.header = d.header.replace(l1_table_offset=new_off, l1_size=len(new_l1), size=size)
        d._write_header()
        d.file.sync()
        d._size = size
        d.l1, d.l1_offset = new_l1, new_off
        d.l1_dirty.clear()
        cs = d.geo.cluster_size
        first = new_off >> d.geo.cluster_bits
        for c in range(first, first + (len(new_l1) * 8 + cs - 1) // cs):
            d.meta.add(c)
        for e in new_l1:
            if e & L1_MASK:
                d.meta.add((e & L1_MASK) >> d.geo.cluster_bits)
        # 4. the old active state loses its references
        _apply_delta(d, reach(d, old_l1), -1)
        if len(old_l1):
            _free_l1_clusters(d, old_off, len(old_l1))
        _drop_unreferenced(d, old_l1)
        _sync_refcounts(d)
        # 5. COPIED where the active tables own a cluster alone
        recompute_copied(d)
        _flush_tables(d)
        return snap
    finally:
        d.close()
