"""Repairs that rewrite the image's refcount structure or header.

When the refcount structure itself is broken (a referenced cluster with no refcount at
all, a misplaced refcount block) ``"all"`` writes a complete new refcount table and
blocks after the end of the used area, holding exactly the counted values, then points
the header at them.  A repair that leaves nothing wrong clears the dirty and corrupt
bits.
"""

from __future__ import annotations

from array import array

from nbdqcow.block.hostfile import HostFile
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.check.result import CheckFailed, CheckResult
from nbdqcow.qcow2.check.walk import Walk, count_array
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.header import Header, encode_header
from nbdqcow.qcow2.tables import new_refblock, store_refblock, store_u64


def rebuild_structure(file: HostFile, header: Header, geo: Geometry) -> Header:
    """Write a new refcount table and blocks holding exactly the counted refcounts,
    after the end of everything in use, then point the header at them."""
    counter = Walk(file, header, CheckResult(file.path))
    counter.count_all(None)
    ref = counter.ref
    cs = geo.cluster_size
    bits = geo.refcount_block_bits
    used = [i for i, v in enumerate(ref) if v]
    start = max(max(used, default=0) + 1, geo.size_to_clusters(file.size()))
    per_table_cluster = cs // 8
    nt, nb = 1, 0
    while True:
        end = start + nt + nb
        rtis = {c >> bits for c in used} | {c >> bits for c in range(start, end)}
        need_nt = (max(rtis) + 1 + per_table_cluster - 1) // per_table_cluster
        if len(rtis) == nb and need_nt <= nt:
            break
        nb = len(rtis)
        nt = max(nt, need_nt)
    if nt * cs > L.MAX_REFTABLE_BYTES:
        raise CheckFailed("refcount table would exceed its maximum size")
    if len(ref) < start + nt + nb:
        ref.extend(count_array(geo.refcount_bits, start + nt + nb - len(ref)))
    for c in range(start, start + nt + nb):
        ref[c] = 1
    table = array("Q", bytes(nt * cs))
    entries = geo.refcount_block_entries
    for k, rti in enumerate(sorted(rtis)):
        boff = (start + nt + k) * cs
        table[rti] = boff
        blk = new_refblock(entries, geo.refcount_bits)
        lo = rti * entries
        for c in range(lo, min(lo + entries, len(ref))):
            if ref[c]:
                blk[c - lo] = min(ref[c], geo.refcount_max)
        file.pwrite(store_refblock(blk, geo.refcount_bits), boff)
    file.pwrite(store_u64(table), start * cs)
    file.sync()
    header = header.replace(refcount_table_offset=start * cs, refcount_table_clusters=nt)
    file.pwrite(encode_header(header), 0)
    file.sync()
    return header


def mark_clean(file: HostFile, header: Header) -> Header:
    feats = header.incompatible_features & ~(L.INCOMPAT_DIRTY | L.INCOMPAT_CORRUPT)
    if feats != header.incompatible_features:
        file.sync()  # every repair is on disk before the header says the image is clean
        header = header.replace(incompatible_features=feats)
        file.pwrite(encode_header(header), 0)
        file.sync()
    return header
