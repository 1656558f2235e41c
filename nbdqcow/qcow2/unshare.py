"""Mapping preservation for clusters shared with internal snapshots (issue: "once a guest
cluster has a host cluster, nothing moves it"; qcow2.txt "Snapshots").

qemu copies a shared cluster on write, so the live image's cluster moves to the end of
the file.  Under the ``preserve`` policy the live image keeps its host cluster instead:
the old data is copied to a new cluster *for the snapshots*, their L2 entries are
repointed, and only then does the live write land in place.

Crash safety (every intermediate state on disk has only leaked clusters, never a
refcount below its references nor a stale COPIED flag; checked by the power-loss tier,
tests/e2e/test_power_loss.py):

1. pending changes of the live tables are flushed first (the live image's copy of a
   shared L2 table and its L1 entry are on disk before any snapshot table is changed:
   until then the live L1 still reaches the old table);
2. the copy is written and counted for the snapshots AND the live entry (refcount
   refs + 1); the snapshot entries and the live entry (without COPIED) are repointed to
   it, all synced;
3. the old cluster's refcount drops to 1 (nothing points to it: a leak at worst);
4. the live entry goes back to the old cluster with COPIED (synced);
5. the copy's refcount drops by the live entry's share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.snapshot import read_snapshot_table
from nbdqcow.qcow2.tables import load_u64

if TYPE_CHECKING:
    from nbdqcow.qcow2.driver import Qcow2Driver


def snapshot_l1_tables(drv: Qcow2Driver) -> list[tuple[int, int]]:
    """(l1_table_offset, l1_size) of every internal snapshot."""
    if not drv.header.nb_snapshots:
        return []
    return [(s.l1_table_offset, s.l1_size) for s in read_snapshot_table(drv.file, drv.header)]


def register_snapshot_metadata(drv: Qcow2Driver) -> None:
    """Add snapshot L1 tables and the L2 tables they reach to the metadata set, so no data
    write can land on them."""
    geo = drv.geo
    for l1_off, l1_size in snapshot_l1_tables(drv):
        for c in range(geo.size_to_clusters(l1_size * 8)):
            drv.meta.add((l1_off >> geo.cluster_bits) + c)
        for e in load_u64(drv.file.pread(l1_size * 8, l1_off)):
            off = e & L.L1E_OFFSET_MASK
            if off:
                drv.meta.add(off >> geo.cluster_bits)


def move_snapshot_copy(drv: Qcow2Driver, guest_pos: int, host: int) -> bool:
    """Give the snapshots sharing ``host`` (the live cluster at ``guest_pos``) a copy of
    their own, so the live image may write ``host`` in place.  False when the sharing is
    not fully explained by snapshot L2 entries at this guest index (then copy-on-write
    as usual)."""
    if drv.header.has_data_file:
        return False
    geo = drv.geo
    cb = geo.cluster_bits
    l1i = geo.offset_to_l1_index(guest_pos)
    idx = geo.offset_to_l2_index(guest_pos)
    word = idx * geo.l2_entry_words
    rc = drv.refcounts
    drv._flush()  # the live tables as they are now: on disk (step 1)
    refcount = rc.effective(host >> cb)
    tables: dict[int, int] = {}  # snapshot L2 table offset -> number of L1s reaching it
    for l1_off, l1_size in snapshot_l1_tables(drv):
        if l1i >= l1_size:
            continue
        e = int.from_bytes(drv.file.pread(8, l1_off + 8 * l1i), "big")
        l2off = e & L.L1E_OFFSET_MASK
        if not l2off:
            continue
        t = drv.l2_cache.get(l2off)
        ent = t[word]
        if ent & L.QCOW_OFLAG_COMPRESSED or (ent & L.L2E_OFFSET_MASK) != host:
            continue
        tables[l2off] = tables.get(l2off, 0) + 1
    refs = sum(tables.values())
    if not refs or refcount != refs + 1:
        return False
    # every L1 that reaches a shared snapshot L2 table must be one of ours
    for l2off, n in tables.items():
        if rc.effective(l2off >> cb) != n:
            return False
    new = rc.alloc(1) << cb
    rc.update(new >> cb, refs)  # the snapshots' references and (for now) the live one
    try:
        drv.file.pwrite(drv.file.pread(geo.cluster_size, host), new)
    except BaseException:
        rc.update(new >> cb, -refs - 1)
        raise
    for l2off in tables:
        t = drv.l2_cache.get(l2off)
        t[word] = (t[word] & ~L.L2E_OFFSET_MASK) | new
        drv.l2_cache.mark_dirty(l2off)
    live_off, live = drv._l2_for_write(l1i)
    entry = live[word]
    live[word] = (entry & ~L.L2E_OFFSET_MASK & ~L.QCOW_OFLAG_COPIED) | new
    drv.l2_cache.mark_dirty(live_off)
    drv._flush()  # copy, its refcount, then the L2 tables: on disk and synced
    rc.update(host >> cb, -refs)  # only the live entry will point to it again
    rc.flush()
    drv.file.sync()
    live_off, live = drv._l2_for_write(l1i)
    live[word] = entry | L.QCOW_OFLAG_COPIED
    drv.l2_cache.mark_dirty(live_off)
    drv._flush()
    rc.update(new >> cb, -1)
    rc.flush()
    drv.file.sync()
    return True
