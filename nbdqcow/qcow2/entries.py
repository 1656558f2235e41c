"""PURE: L2 / extended-L2 entries <-> typed cluster and subcluster states
(qcow2.txt "Cluster mapping", "Extended L2 Entries").  Call sites never test bits."""

from __future__ import annotations

from enum import IntEnum

from nbdqcow.qcow2 import layout as L


class SC(IntEnum):
    """State of one (sub)cluster, as qemu's QCow2SubclusterType."""

    UNALLOCATED_PLAIN = 0  # reads from backing, no host cluster
    UNALLOCATED_ALLOC = 1  # reads from backing, host cluster reserved (extended L2)
    ZERO_PLAIN = 2  # reads zero, no host cluster
    ZERO_ALLOC = 3  # reads zero, host cluster kept
    NORMAL = 4  # reads host data
    COMPRESSED = 5
    INVALID = 6


HAS_HOST = frozenset({SC.UNALLOCATED_ALLOC, SC.ZERO_ALLOC, SC.NORMAL})
READS_ZERO = frozenset({SC.ZERO_PLAIN, SC.ZERO_ALLOC})
READS_BACKING = frozenset({SC.UNALLOCATED_PLAIN, SC.UNALLOCATED_ALLOC})


def host_offset(entry: int) -> int:
    return entry & L.L2E_OFFSET_MASK


def is_compressed(entry: int) -> bool:
    return bool(entry & L.QCOW_OFLAG_COMPRESSED)


def is_copied(entry: int) -> bool:
    return bool(entry & L.QCOW_OFLAG_COPIED)


def std_type(entry: int, has_data_file: bool = False) -> SC:
    """Type of a standard (non-extended) L2 entry."""
    if entry & L.QCOW_OFLAG_COMPRESSED:
        return SC.COMPRESSED
    allocated = bool(entry & L.L2E_OFFSET_MASK) or (has_data_file and entry & L.QCOW_OFLAG_COPIED)
    if entry & L.QCOW_OFLAG_ZERO:
        return SC.ZERO_ALLOC if allocated else SC.ZERO_PLAIN
    return SC.NORMAL if allocated else SC.UNALLOCATED_PLAIN


def sc_type(entry: int, bitmap: int, sc: int, has_data_file: bool = False) -> SC:
    """Type of subcluster ``sc`` of an extended L2 entry."""
    if entry & L.QCOW_OFLAG_COMPRESSED:
        return SC.COMPRESSED
    allocated = bool(entry & L.L2E_OFFSET_MASK) or (has_data_file and entry & L.QCOW_OFLAG_COPIED)
    alloc = (bitmap >> sc) & 1
    zero = (bitmap >> (32 + sc)) & 1
    if alloc:
        if zero or not allocated:
            return SC.INVALID
        return SC.NORMAL
    if zero:
        return SC.ZERO_ALLOC if allocated else SC.ZERO_PLAIN
    return SC.UNALLOCATED_ALLOC if allocated else SC.UNALLOCATED_PLAIN


def bitmap_valid(entry: int, bitmap: int, has_data_file: bool = False) -> bool:
    """False for impossible extended entries (alloc+zero, alloc without offset,
    compressed with a bitmap)."""
    if entry & L.QCOW_OFLAG_COMPRESSED:
        return bitmap == 0
    alloc = bitmap & L.L2_BITMAP_ALLOC_ALL
    if alloc & (bitmap >> 32):
        return False
    allocated = bool(entry & L.L2E_OFFSET_MASK) or (has_data_file and entry & L.QCOW_OFLAG_COPIED)
    return not (alloc and not allocated)


def sc_range_mask(first: int, count: int) -> int:
    """Bitmap mask of ``count`` subclusters starting at ``first`` (low 32 bits)."""
    return ((1 << count) - 1) << first
