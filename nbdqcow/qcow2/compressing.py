"""Compressed writes (qcow2.txt "Compressed Clusters Descriptor", header field
``compression_type``): whole guest clusters stored as compressed clusters, as qemu's
compress filter stores them.

Rules (qemu 7.2's, so that images and errors are the same):

* a compressed write covers whole clusters from a cluster boundary; the last cluster of
  the image may be partial (it is compressed padded with zeros);
* a cluster that already has a host cluster (data, zero-allocated, compressed) cannot be
  written compressed: EIO.  Unallocated and plain zero clusters can;
* data that does not compress below one cluster is written as a normal cluster;
* compressed data is packed byte-wise into host clusters; every host cluster a
  compressed cluster touches holds one reference for it;
* an external data file cannot hold compressed clusters (ENOTSUP).

Write ordering is the engine's: the compressed bytes reach the file before the L2
entry that points to them, the refcounts before the L2 table (cache flush hook).
"""

from __future__ import annotations

import zlib

import zstandard

from nbdqcow.errors import ImageError, NotSupported
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.zeroing import Qcow2Zeroer

SECTOR = L.SECTOR


def compress_cluster(data: bytes | bytearray | memoryview, compression_type: int,
                     limit: int) -> bytes | None:
    """``data`` compressed as the header's compression type says (zlib: raw deflate,
    window bits 12; zstd: one frame), or None when it does not fit in ``limit`` bytes."""
    if compression_type == L.COMPRESSION_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = c.compress(data) + c.flush()
    elif compression_type == L.COMPRESSION_ZSTD:
        out = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(data))
    else:
        raise NotSupported(f"unknown compression type {compression_type}")
    return out if len(out) <= limit else None


class CompressedWriteError(ImageError):
    """A compressed write qemu refuses (answered as EIO)."""


class Qcow2Compressor(Qcow2Zeroer):
    """Compressed writes (see core.py for the layering)."""

    #: next free byte for compressed data (0: start a new host cluster)
    _free_byte_offset = 0

    @property
    def cluster_size(self) -> int:
        return self.geo.cluster_size

    def write_compressed(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Store ``data`` at guest ``offset`` as compressed clusters (module docstring)."""
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        self._check_writable(offset, n)
        cs = self.geo.cluster_size
        if offset & (cs - 1) or (n & (cs - 1) and offset + n != self._size):
            raise CompressedWriteError(
                "compressed writes must cover whole clusters from a cluster boundary "
                f"(offset {offset}, length {n}, cluster size {cs})")
        if self.header.has_data_file:
            raise NotSupported("compressed writes are not supported with an external data file")
        with self._lock:
            if self.live_bitmaps is not None:
                self.live_bitmaps.mark(offset, n)
            for pos in range(0, n, cs):
                self._write_compressed_cluster(mv[pos : pos + cs], offset + pos)

    def _write_compressed_cluster(self, piece: memoryview, pos: int) -> None:
        cs = self.geo.cluster_size
        e, _ = self._entry(pos)
        if e & OFF_MASK_ANY:
            raise CompressedWriteError(
                f"cluster at guest offset {pos} is already allocated: a compressed write "
                "cannot overwrite it")
        buf: bytes | bytearray | memoryview = piece
        if len(piece) < cs:
            buf = bytes(piece) + bytes(cs - len(piece))
        out = compress_cluster(buf, self.header.compression_type, cs - 1)
        if out is None:  # incompressible: a normal cluster, as qemu
            self._write(piece, pos)
            return
        host = self._alloc_compressed_bytes(len(out))
        self._data_write(out, host)
        geo = self.geo
        nb_csectors = (host + len(out) - 1) // SECTOR - host // SECTOR
        entry = host | L.QCOW_OFLAG_COMPRESSED | (nb_csectors << geo.csize_shift)
        l2off, table = self._l2_for_write(geo.offset_to_l1_index(pos))
        idx = geo.offset_to_l2_index(pos)
        if geo.extended_l2:
            old = table[2 * idx]
            table[2 * idx] = entry
            table[2 * idx + 1] = 0
        else:
            old = table[idx]
            table[idx] = entry
        self.l2_cache.mark_dirty(l2off)
        self._release(old)
        if self._last_compressed[0] == entry:
            self._last_compressed = (-1, b"")

    def _alloc_compressed_bytes(self, size: int) -> int:
        """Host offset of ``size`` bytes for compressed data, packed after the previous
        compressed cluster when it fits (its host cluster gains one reference), else
        in a new host cluster (continuing the previous one when that is contiguous)."""
        geo = self.geo
        cs, cb = geo.cluster_size, geo.cluster_bits
        rc = self.refcounts
        off = self._free_byte_offset
        if off and rc.get(off >> cb) >= geo.refcount_max:
            off = 0
        free_in_cluster = cs - (off & (cs - 1)) if off else 0
        if off and free_in_cluster >= size:
            rc.update(off >> cb, +1)
            start = off
        else:
            new = rc.alloc(1) << cb
            if off and off + free_in_cluster == new:
                rc.update(off >> cb, +1)  # the data spans the end of the previous one
                start = off
            else:
                start = new
        end = start + size
        self._free_byte_offset = end if end & (cs - 1) else 0
        return start

    def _release(self, entry: int) -> None:
        if entry & L.QCOW_OFLAG_COMPRESSED and self._free_byte_offset:
            # never pack new data into a host cluster whose references are dropping
            if (self._free_byte_offset >> self.geo.cluster_bits) in \
                    self.geo.compressed_host_clusters(entry):
                self._free_byte_offset = 0
        super()._release(entry)


#: an L2 entry that names a host cluster (standard or compressed descriptor)
OFF_MASK_ANY = L.L2E_OFFSET_MASK | L.QCOW_OFLAG_COMPRESSED
