"""Comparing the counted refcounts with the stored ones, and the COPIED flags with the
stored refcounts, with the figures ``qemu-img check`` reports:

* stored > counted: a leak (wasted space, no harm);
* stored < counted: a corruption (the cluster could be handed out twice);
* a COPIED flag that disagrees with "stored refcount == 1" (active L1 and its L2
  entries): a corruption.

With ``FIX_LEAKS`` leaked refcounts are lowered to the counted value, with ``FIX_ERRORS``
too-low ones are raised as well; COPIED flags are fixed with ``FIX_ERRORS``, and with
``FIX_LEAKS`` alone when nothing else is wrong.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from nbdqcow.block.hostfile import HostFile
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.check import bulk
from nbdqcow.qcow2.check.result import FIX_ERRORS, FIX_LEAKS, CheckResult
from nbdqcow.qcow2.check.stored import Stored, read_at
from nbdqcow.qcow2.check.walk import Walk
from nbdqcow.qcow2.entries import SC, std_type
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.header import Header
from nbdqcow.qcow2.tables import load_u64, store_u64


def compare(
    walk: Walk, stored: Stored, fix: int, res: CheckResult
) -> tuple[int, bool]:
    """Compare counted and stored refcounts; returns (highest used cluster, rebuild)."""
    ref = walk.ref
    nb = max(len(ref), walk.geo.size_to_clusters(walk.file_size))
    highest = 0
    rebuild = False
    have_all = stored.counts(nb)
    todo: Iterable[int] = range(nb)
    if have_all is not None:
        todo, highest = bulk.differences(bulk.as_array(ref), have_all, nb)
    for i in todo:
        counted = ref[i] if i < len(ref) else 0
        have = stored.get(i)
        if have is None:
            res.messages.append(f"Can't get refcount for cluster {i}: Input/output error")
            res.check_errors += 1
            continue
        if have or counted:
            highest = max(highest, i)
        if have == counted:
            continue
        fixing = False
        if have == 0:
            rebuild = True
        elif have > counted and fix & FIX_LEAKS:
            fixing = True
        elif have < counted and fix & FIX_ERRORS:
            fixing = True
        word = "Repairing" if fixing else ("ERROR" if have < counted else "Leaked")
        res.messages.append(f"{word} cluster {i} refcount={have} reference={counted}")
        if fixing and stored.set(i, counted):
            if have > counted:
                res.leaks_fixed += 1
            else:
                res.corruptions_fixed += 1
            continue
        if have < counted:
            res.corruptions += 1
        else:
            res.leaks += 1
    return highest, rebuild


def _fix_copied(
    table: array[int], i: int, rc: int, repair: bool, res: CheckResult, what: str
) -> bool:
    """Report (and with ``repair`` fix) entry ``i`` whose COPIED bit disagrees with its
    refcount ``rc``.  True when the table was changed."""
    e = table[i]
    if (rc == 1) == bool(e & L.QCOW_OFLAG_COPIED):
        return False
    word = "Repairing" if repair else "ERROR"
    res.messages.append(f"{word} OFLAG_COPIED {what} refcount={rc}")
    if not repair:
        res.corruptions += 1
        return False
    table[i] = e | L.QCOW_OFLAG_COPIED if rc == 1 else e & ~L.QCOW_OFLAG_COPIED
    res.corruptions_fixed += 1
    return True


def check_copied(
    file: HostFile, header: Header, geo: Geometry, stored: Stored, fix: int, res: CheckResult,
    clean: set[int] | None = None,
) -> None:
    """COPIED must be set exactly when the stored refcount is 1 (active L1 and L2).

    Repaired with ``FIX_ERRORS``; with ``FIX_LEAKS`` alone only when nothing else is
    wrong any more (the stored refcounts are then known to be right), as qemu-img does.
    ``clean``: offsets of L2 tables whose COPIED flags are known to agree with the
    stored refcounts (the walk's finding, valid while those are unchanged).
    """
    repair = bool(fix & FIX_ERRORS) or (
        bool(fix & FIX_LEAKS) and not (res.check_errors or res.corruptions or res.leaks))
    l1 = load_u64(read_at(file, header.l1_size * 8, header.l1_table_offset))
    stored_all = stored.counts(geo.size_to_clusters(file.size()))
    l1_dirty = False
    cs = geo.cluster_size
    data_file = header.has_data_file
    for i, e in enumerate(l1):
        l2off = e & L.L1E_OFFSET_MASK
        if not l2off or l2off & (cs - 1):
            continue
        rc = stored.get(l2off >> geo.cluster_bits)
        if rc is not None and _fix_copied(
            l1, i, rc, repair, res, f"L2 cluster: l1_index={i} l1_entry={e:x}"
        ):
            l1_dirty = True
        if clean is not None and l2off in clean:
            continue  # every COPIED flag agrees
        raw = read_at(file, cs, l2off)
        if stored_all is not None and bulk.copied_mismatch(bulk.allocated_entries(
                bulk.load_words(raw), geo, data_file), geo, stored_all, data_file) is False:
            continue
        table = load_u64(raw)
        dirty = False
        for j in bulk.nonzero_entries(table, geo):
            ent = table[j]
            if ent & L.QCOW_OFLAG_COMPRESSED:
                continue
            host = ent & L.L2E_OFFSET_MASK
            if geo.extended_l2:
                allocated = bool(host) or (data_file and bool(ent & L.QCOW_OFLAG_COPIED))
            else:
                allocated = std_type(ent, data_file) in (SC.NORMAL, SC.ZERO_ALLOC)
            if not allocated:
                continue
            if data_file:
                rc = 1
            else:
                rc = stored.get(host >> geo.cluster_bits)
                if rc is None:
                    continue
            if _fix_copied(table, j, rc, repair, res, f"data cluster: l2_entry={ent:x}"):
                dirty = True
        if dirty:
            if l2off < cs:
                res.messages.append("ERROR: Could not write L2 table; metadata overlap "
                                    "check failed")
                res.check_errors += 1
                continue
            file.pwrite(store_u64(table), l2off)
    if l1_dirty:
        file.pwrite(store_u64(l1), header.l1_table_offset)
