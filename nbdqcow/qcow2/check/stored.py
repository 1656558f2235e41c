"""What the image stores, read as the check needs it: the header (encrypted images too),
tables read with a cap (past the end of the file reads as zeros), and the stored
refcounts, block by block (written back in place on repair)."""

from __future__ import annotations

import struct
from array import array
from typing import TYPE_CHECKING

from nbdqcow.block.hostfile import HostFile
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.header import Header, parse_header
from nbdqcow.qcow2.tables import load_refblock, load_u64, store_refblock

if TYPE_CHECKING:
    from nbdqcow.qcow2.check.bulk import U64

MAX_TABLE_READ = 64 * 1024 * 1024


def read_at(file: HostFile, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; what lies past the end of the file reads as zeros
    (nothing is read at absurd offsets, and reads are capped at 64 MiB)."""
    length = max(0, min(length, MAX_TABLE_READ))
    size = file.size()
    if offset >= size or length == 0:
        return bytes(length)
    return file.pread(length, offset)


def read_header(file: HostFile) -> Header:
    """The header; encrypted images are accepted too (checking needs no key)."""
    size = file.size()
    buf = bytearray(file.pread(min(size, 1 << L.MAX_CLUSTER_BITS), 0))
    crypt = struct.unpack_from(">I", buf, 32)[0] if len(buf) >= L.HEADER_V2_LENGTH else 0
    if crypt:
        struct.pack_into(">I", buf, 32, 0)  # parse_header refuses encryption: we don't
    header = parse_header(bytes(buf), size)
    return header.replace(crypt_method=crypt) if crypt else header


class Stored:
    """Stored refcounts, read block by block (and written back in place on repair)."""

    def __init__(self, file: HostFile, header: Header, geo: Geometry) -> None:
        self.file = file
        self.geo = geo
        cs = geo.cluster_size
        self.table = load_u64(read_at(file, header.refcount_table_clusters * cs,
                                      header.refcount_table_offset))
        self.blocks: dict[int, array[int] | None] = {}
        self.dirty: set[int] = set()
        self.changed = False  # set() was called: stored refcounts differ from the file's
        self._counts: tuple[int, U64 | None] | None = None
        self.bits = geo.refcount_block_bits
        self.mask = geo.refcount_block_entries - 1

    def block(self, rti: int) -> array[int] | None:
        """The block of table index ``rti``; None if it is not usable."""
        if rti in self.blocks:
            return self.blocks[rti]
        off = self.table[rti] & L.REFT_OFFSET_MASK
        blk: array[int] | None
        if off & (self.geo.cluster_size - 1) or off >= (1 << 63) - self.geo.cluster_size:
            blk = None  # qemu: "Can't get refcount ... Input/output error"
        else:
            blk = load_refblock(read_at(self.file, self.geo.cluster_size, off),
                                self.geo.refcount_bits)
        self.blocks[rti] = blk
        return blk

    def get(self, cluster: int) -> int | None:
        rti = cluster >> self.bits
        if rti >= len(self.table) or not self.table[rti] & L.REFT_OFFSET_MASK:
            return 0
        blk = self.block(rti)
        return None if blk is None else blk[cluster & self.mask]

    def set(self, cluster: int, value: int) -> bool:
        rti = cluster >> self.bits
        if rti >= len(self.table) or not self.table[rti] & L.REFT_OFFSET_MASK:
            return False
        blk = self.block(rti)
        if blk is None:
            return False
        blk[cluster & self.mask] = value
        self.dirty.add(rti)
        self.changed = True
        self._counts = None
        return True

    def counts(self, n: int) -> U64 | None:
        """The refcounts of clusters [0, n) as one array (see bulk.stored_counts)."""
        from nbdqcow.qcow2.check.bulk import stored_counts

        if self._counts is None or self._counts[0] != n:
            self._counts = (n, stored_counts(self, n))
        return self._counts[1]

    def write_back(self) -> None:
        for rti in sorted(self.dirty):
            blk = self.blocks[rti]
            assert blk is not None
            self.file.pwrite(store_refblock(blk, self.geo.refcount_bits),
                             self.table[rti] & L.REFT_OFFSET_MASK)
        self.dirty.clear()


def highest_used(stored: Stored, geo: Geometry, file_size: int) -> int:
    n = geo.size_to_clusters(file_size)
    counts = stored.counts(n)
    if counts is not None:
        used = counts.nonzero()[0]
        return int(used[-1]) if len(used) else 0
    highest = 0
    for i in range(n):
        if stored.get(i):
            highest = i
    return highest
