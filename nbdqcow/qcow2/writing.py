"""The write path of the qcow2 engine: in-place writes, allocation of new clusters,
copy-on-write of partial clusters, subcluster writes (extended L2), unsharing clusters
with internal snapshots under ``preserve``."""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, cast

from nbdqcow.block.ranges import check_range
from nbdqcow.errors import CorruptImage, ReadOnlyImage
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.core import COPIED, OFF_MASK, ZERO_FLAG
from nbdqcow.qcow2.entries import HAS_HOST, SC, sc_range_mask, std_type
from nbdqcow.qcow2.policy import Policy
from nbdqcow.qcow2.reading import Qcow2Reader
from nbdqcow.qcow2.space import reserve
from nbdqcow.qcow2.tables import store_u64

if TYPE_CHECKING:
    from nbdqcow.qcow2.driver import Qcow2Driver


class Qcow2Writer(Qcow2Reader):
    """Writes (see core.py for the layering)."""

    # ------------------------------------------------------------------ writing
    def _check_writable(self, offset: int, length: int) -> None:
        if not self.writable:
            raise ReadOnlyImage("image is opened read-only")
        if self.corrupt:
            raise CorruptImage("image is marked corrupt; refusing to write")
        check_range(self._size, offset, length, write=True)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool = False) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._check_writable(offset, n)
        with self._lock:
            lb = self.live_bitmaps
            if lb is not None and lb.enabled:  # enabled persistent bitmaps track writes
                lb.mark(offset, n)
            host = self._inplace_range(offset, n)
            if host is None:
                self._write(memoryview(data).cast("B"), offset)
                if fua:
                    self._flush()
                return
        # in place (every cluster owned, contiguous on the host): no metadata changes,
        # so the data I/O runs outside the lock (see pread)
        self.data_file.pwrite(data, host)
        if fua:
            self.flush()

    def writes_in_place(self, offset: int, length: int) -> bool:
        """True when a write of [offset, offset+length) would only copy data into one
        contiguous run of clusters this image owns: no allocation, no metadata change,
        so nothing that may wait for a sync (the server then runs it on its event
        loop)."""
        if not self.writable or self.corrupt or length <= 0 or offset + length > self._size:
            return False
        with self._lock:
            return self._inplace_range(offset, length) is not None

    def _inplace_range(self, offset: int, n: int) -> int | None:
        """Host offset when all of [offset, offset+n) can be written in place at one
        contiguous host range with no metadata change, else None."""
        host = self._fast_host(offset, n, write=True)
        if host is None and n > 0:
            cs = self.geo.cluster_size
            pos, end = offset, offset + n
            while pos < end:
                c_end = min(end, (pos | (cs - 1)) + 1)
                h = self._inplace_host(pos, c_end - pos)
                if h is None or (host is not None and h != host + (pos - offset)):
                    return None
                if host is None:
                    host = h
                pos = c_end
        if host is None:
            return None
        if not self.header.has_data_file and host + n > self._file_size:
            # the known size may be stale: clusters allocated since lie past it
            self._file_size = self.file.size()
            if host + n > self._file_size:
                return None  # the slow path extends the file (and re-checks sizes)
        if self._overlaps_metadata(host, n):
            return None  # the slow path marks the image corrupt
        return host

    def _unshare(self, pos: int, host: int) -> bool:
        """Under ``preserve`` and ``thin``, give snapshots their own copy so the live
        cluster stays."""
        if not self.policy.keeps_mapping or not self.header.nb_snapshots:
            return False
        from nbdqcow.qcow2.unshare import move_snapshot_copy

        return move_snapshot_copy(cast("Qcow2Driver", self), pos, host)

    def _write(self, mv: memoryview, offset: int) -> None:
        cs = self.geo.cluster_size
        end = offset + len(mv)
        pos = offset
        # pending in-place write: (host, start index in mv, length)
        ph = pstart = plen = 0
        while pos < end:
            c_end = min(end, (pos | (cs - 1)) + 1)
            piece = mv[pos - offset : c_end - offset]
            host = self._inplace_host(pos, len(piece))
            if host is not None:
                if plen and ph + plen == host:
                    plen += len(piece)
                else:
                    if plen:
                        self._data_write(mv[pstart : pstart + plen], ph)
                    ph, pstart, plen = host, pos - offset, len(piece)
            else:
                if plen:
                    self._data_write(mv[pstart : pstart + plen], ph)
                    plen = 0
                self._write_in_cluster(pos, piece)
            pos = c_end
        if plen:
            self._data_write(mv[pstart : pstart + plen], ph)

    def _data_write(self, data: memoryview | bytes | bytearray, host: int) -> None:
        # every cluster the write touches: coalesced in-place writes span several
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if self._overlaps_metadata(host, n):
            self.mark_corrupt(f"data write at {host:#x} overlaps metadata")
        self.data_file.pwrite(data, host)

    def _entry(self, pos: int) -> tuple[int, int]:
        """(L2 entry, bitmap) for guest offset ``pos`` (read-only view)."""
        table = self._l2_for_read(self.geo.offset_to_l1_index(pos))
        if table is None:
            return 0, 0
        idx = self.geo.offset_to_l2_index(pos)
        if self.geo.extended_l2:
            return table[2 * idx], table[2 * idx + 1]
        return table[idx], 0

    def _inplace_host(self, pos: int, n: int) -> int | None:
        """Host offset if [pos, pos+n) (inside one cluster) can be written in place with
        no metadata change, else None."""
        e, bm = self._entry(pos)
        if not e & COPIED or e & L.QCOW_OFLAG_COMPRESSED:
            return None
        h = e & OFF_MASK
        if not h and not self.header.has_data_file:
            return None
        geo = self.geo
        co = pos & (geo.cluster_size - 1)
        if geo.extended_l2:
            first = co >> geo.subcluster_bits
            last = (co + n - 1) >> geo.subcluster_bits
            mask = sc_range_mask(first, last - first + 1)
            if bm & mask != mask:
                return None
        elif e & ZERO_FLAG:
            return None
        return h + co

    def _write_in_cluster(self, pos: int, piece: memoryview | bytes) -> None:
        geo = self.geo
        cs = geo.cluster_size
        cstart = pos & ~(cs - 1)
        co = pos - cstart
        l1i, idx = geo.offset_to_l1_index(pos), geo.offset_to_l2_index(pos)
        l2off, table = self._l2_for_write(l1i)
        if geo.extended_l2:
            self._write_ext(pos, piece, l2off, table, idx)
            return
        e = table[idx]
        t = std_type(e, self.header.has_data_file)
        owned = bool(e & COPIED) and t in HAS_HOST
        if t is SC.NORMAL and not owned and self._unshare(pos, e & OFF_MASK):
            table[idx] = e | COPIED
            self.l2_cache.mark_dirty(l2off)
            self._data_write(piece, (e & OFF_MASK) + co)
            return
        if owned:
            # kept cluster (zero-allocated): write in place, the rest of it reads zero
            h = e & OFF_MASK
            buf = self._cluster_image(cstart, co, piece, zero_rest=True)
            self._claim_kept(h, cs)
            self._data_write(buf, h)
            table[idx] = h | COPIED
            self.l2_cache.mark_dirty(l2off)
            return
        new = self._write_new_cluster(self._cluster_image(cstart, co, piece, zero_rest=False), cstart)
        table[idx] = new | COPIED
        self.l2_cache.mark_dirty(l2off)
        self._release(e)

    def _claim_kept(self, host: int, n: int) -> None:
        """Under ``thin`` a kept cluster may have given its blocks back: claim them before
        writing there, so that a full file system fails this write (ENOSPC) and never a
        later flush."""
        if self.policy is not Policy.THIN:
            return
        if self.data_file is self.file:
            self.refcounts.space.claim_range(host, n)
        else:
            reserve(self.data_file, host, n)

    def _write_new_cluster(
        self, data: memoryview | bytes | bytearray, cstart: int, at: int = 0
    ) -> int:
        """Allocate a host cluster for guest cluster ``cstart`` and write ``data`` at
        ``at`` inside it; the allocation is undone if the write fails."""
        new = self._alloc_data_cluster(cstart)
        try:
            self._data_write(data, new + at)
        except BaseException:
            self._abort_data_cluster(new)
            raise
        return new

    def _cluster_image(
        self, cstart: int, co: int, piece: memoryview | bytes, zero_rest: bool
    ) -> memoryview | bytes | bytearray:
        """Full cluster content with ``piece`` at ``co``: the rest is the current guest
        content (copy-on-write), or zeros."""
        cs = self.geo.cluster_size
        if co == 0 and len(piece) == cs:
            return piece
        valid = min(cs, self._size - cstart)
        if zero_rest:
            buf = bytearray(cs)
        else:
            buf = bytearray(self._read(cstart, valid)) + bytearray(cs - valid)
        buf[co : co + len(piece)] = piece
        return buf

    def _write_ext(
        self, pos: int, piece: memoryview | bytes, l2off: int, table: array[int], idx: int
    ) -> None:
        geo = self.geo
        cs = geo.cluster_size
        scb = geo.subcluster_bits
        cstart = pos & ~(cs - 1)
        co = pos - cstart
        e, bm = table[2 * idx], table[2 * idx + 1]
        first = co >> scb
        last = (co + len(piece) - 1) >> scb
        mask = sc_range_mask(first, last - first + 1)
        h = e & OFF_MASK
        has_host = bool(h) or (self.header.has_data_file and bool(e & COPIED))
        if has_host and not e & (COPIED | L.QCOW_OFLAG_COMPRESSED) and self._unshare(pos, h):
            e |= COPIED
            table[2 * idx] = e
            self.l2_cache.mark_dirty(l2off)
        if e & L.QCOW_OFLAG_COMPRESSED or (has_host and not e & COPIED):
            # shared or compressed: copy the whole cluster, then write
            new = self._write_new_cluster(
                self._cluster_image(cstart, co, piece, zero_rest=False), cstart)
            if e & L.QCOW_OFLAG_COMPRESSED:
                alloc, zero = L.L2_BITMAP_ALLOC_ALL, 0
            else:
                alloc = (bm | mask) & L.L2_BITMAP_ALLOC_ALL
                zero = (bm >> 32) & ~alloc & 0xFFFFFFFF
            table[2 * idx] = new | COPIED
            table[2 * idx + 1] = alloc | (zero << 32)
            self.l2_cache.mark_dirty(l2off)
            self._release(e)
            return
        span_start = first << scb
        span_end = min(cs, (last + 1) << scb)
        data: memoryview | bytes | bytearray = piece
        if not (co == span_start and co + len(piece) == span_end):
            valid = max(0, min(span_end, self._size - cstart) - span_start)
            span = bytearray(self._read(cstart + span_start, valid)) + bytearray(
                span_end - span_start - valid)
            span[co - span_start : co - span_start + len(piece)] = piece
            data = span
        if has_host:
            host = h
            self._claim_kept(host + span_start, span_end - span_start)
            self._data_write(data, host + span_start)
        else:
            host = self._write_new_cluster(data, cstart, span_start)
        table[2 * idx] = host | COPIED
        table[2 * idx + 1] = (bm | mask) & ~(mask << 32)
        self.l2_cache.mark_dirty(l2off)

    # ------------------------------------------------------------------ flushing
    def flush(self) -> None:
        if not self.writable:
            return
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        rc = self._refcounts
        if rc is not None and rc.dirty:
            rc.flush()
        if self.l2_cache.has_dirty or self.l1_dirty:
            # data and refcounts before the L2 entries (the write-back hook syncs them)
            if not self.l2_cache.write_back():
                self._before_l2_store()
            if self.l1_dirty:
                self._sync()
                self._write_l1()
        if rc is not None and rc.pending_frees:
            self._sync()
            rc.apply_frees()
            rc.flush()
        self._sync()

    def _sync(self) -> None:
        if self.data_file is not self.file:
            self.data_file.sync()
        self.file.sync()

    def _write_l1(self) -> None:
        sectors = sorted({i // 64 for i in self.l1_dirty})
        for s in sectors:
            chunk = self.l1[s * 64 : s * 64 + 64]
            self.file.pwrite(store_u64(chunk), self.l1_offset + s * 512)
        self.l1_dirty.clear()
