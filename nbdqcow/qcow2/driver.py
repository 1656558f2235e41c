"""Qcow2Driver(BlockDriver): composes header, tables, cache, refcounts, mapping, policy
and backing chain.  The only class the rest of the project sees (qcow2.txt as a whole).

Concurrency: every public method takes one lock; code between two calls is atomic.
Write ordering (see ARCHITECTURE.md): guest data is written before the L2 entry that
points to it; refcount increments reach the file before L2/L1 entries (flush hook of the
L2 cache); decrements are applied only after the L2/L1 tables that dropped the cluster.
"""

from __future__ import annotations

import os
import threading
from array import array
from collections.abc import Iterator

from nbdqcow.block.driver import BlockDriver, Capabilities, Extent
from nbdqcow.block.hostfile import HostFile
from nbdqcow.block.ranges import check_range
from nbdqcow.block.zeros import fill_zero
from nbdqcow.errors import (
    CorruptImage,
    ImageOpenError,
    NotSupported,
    ReadOnlyImage,
)
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.backing import open_backing
from nbdqcow.qcow2.cache import TableCache
from nbdqcow.qcow2.compressed import decompress_cluster
from nbdqcow.qcow2.entries import HAS_HOST, READS_BACKING, READS_ZERO, SC, sc_range_mask, std_type
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.header import encode_header, parse_header
from nbdqcow.qcow2.mapping import Run, iter_runs
from nbdqcow.qcow2.policy import DEFAULT_POLICY, Op, Policy
from nbdqcow.qcow2.refcount import Refcounts
from nbdqcow.qcow2.tables import load_u64, store_u64

DEFAULT_CACHE_SIZE = 32 * 1024 * 1024
COPIED = L.QCOW_OFLAG_COPIED
ZERO_FLAG = L.QCOW_OFLAG_ZERO
OFF_MASK = L.L2E_OFFSET_MASK


class Qcow2Driver:
    """A qcow2 image.  Open with :meth:`open`."""

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str,
        writable: bool = True,
        snapshot: str | None = None,
        cache_size: int | None = None,
        mapping: str | None = None,
        _chain: tuple[str, ...] = (),
    ) -> Qcow2Driver:
        if snapshot is not None and writable:
            raise ImageOpenError("an internal snapshot can only be opened read-only")
        try:
            file = HostFile(path, writable)
        except OSError as e:
            raise ImageOpenError(f"could not open '{path}': {e.strerror}") from None
        try:
            return cls(path, file, writable, snapshot, cache_size, mapping,
                       _chain or (os.path.realpath(path),))
        except BaseException:
            file.close()
            raise

    def __init__(
        self,
        path: str,
        file: HostFile,
        writable: bool,
        snapshot: str | None,
        cache_size: int | None,
        mapping: str | None,
        chain: tuple[str, ...],
    ) -> None:
        self.path = path
        self.file = file
        self.writable = writable
        self.corrupt = False
        self._lock = threading.RLock()
        file_size = file.size()
        # read only the first cluster: reading more would pull guest data into the page
        # cache, which changes what SEEK_DATA reports for unwritten extents
        head = file.pread(min(file_size, 4096), 0)
        if len(head) >= 24:
            cluster_bits = int.from_bytes(head[20:24], "big")
            if L.MIN_CLUSTER_BITS <= cluster_bits <= L.MAX_CLUSTER_BITS and (1 << cluster_bits) > 4096:
                head = file.pread(min(file_size, 1 << cluster_bits), 0)
        if len(head) < L.HEADER_V2_LENGTH:
            raise ImageOpenError(f"'{path}' is too short to be a qcow2 image")
        self.header = h = parse_header(head, file_size)
        self.geo = geo = Geometry(h.cluster_bits, h.refcount_order, h.extended_l2)
        if h.header_length > file_size:
            raise ImageOpenError("image is truncated inside its header")
        if h.corrupt and writable:
            raise ImageOpenError("image is marked corrupt; it can only be opened read-only")
        if writable and h.autoclear_features & ~L.AUTOCLEAR_KNOWN:
            self.header = h = h.replace(autoclear_features=h.autoclear_features & L.AUTOCLEAR_KNOWN)
            self._write_header()
        self.policy = Policy.parse(
            mapping if mapping is not None else h.extension(L.EXT_NBDQCOW_POLICY), DEFAULT_POLICY
        )
        cs = geo.cluster_size
        self.meta: set[int] = {0}
        self._check_table_in_file("refcount table", h.refcount_table_offset,
                                  h.refcount_table_clusters * cs, file_size)
        # active L1 (or a snapshot's)
        self._size = h.size
        l1_offset, l1_size = h.l1_table_offset, h.l1_size
        self.snapshot_name: str | None = None
        if snapshot is not None:
            l1_offset, l1_size, self._size = self._find_snapshot(snapshot)
        if l1_size < geo.l1_entries_for(self._size):
            raise ImageOpenError(f"L1 table too small for the virtual size ({l1_size} entries)")
        if l1_size and l1_offset == 0:
            raise ImageOpenError("L1 table offset is 0")
        self._check_table_in_file("L1 table", l1_offset, l1_size * 8, file_size)
        self.l1_offset = l1_offset
        self._check_no_overlap(
            ("header", 0, cs),
            ("L1 table", l1_offset, l1_size * 8),
            ("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs),
        )
        self.l1 = load_u64(file.pread(l1_size * 8, l1_offset)) if l1_size else array("Q")
        self.l1_dirty: set[int] = set()
        for c in range(geo.size_to_clusters(l1_size * 8)):
            self.meta.add((l1_offset >> geo.cluster_bits) + c)
        for e in self.l1:
            off = e & L.L1E_OFFSET_MASK
            if off:
                if off & (cs - 1) or e & L.L1E_RESERVED_MASK & ~0x1FF:
                    raise ImageOpenError(f"L1 entry {e:#x} is invalid (unaligned L2 offset)")
                self.meta.add(off >> geo.cluster_bits)
        if h.snapshots_offset:
            self.meta.add(h.snapshots_offset >> geo.cluster_bits)
        cache_size = DEFAULT_CACHE_SIZE if cache_size is None else cache_size
        tables = max(4, cache_size // cs)
        self.l2_cache = TableCache(tables, self._load_l2, self._store_l2, self._before_l2_store)
        self._refcounts: Refcounts | None = None
        self._refcount_cache_tables = max(4, tables // 4)
        # data file
        self.data_file = file
        if h.has_data_file:
            if not h.data_file:
                raise ImageOpenError("image needs an external data file but names none")
            # qemu opens a relative data file name relative to the working directory
            dpath = h.data_file
            try:
                self.data_file = HostFile(dpath, writable)
            except OSError as e:
                raise ImageOpenError(f"could not open data file '{h.data_file}': {e.strerror}") from None
        # backing chain
        self.backing: BlockDriver | None = None
        if h.backing_file:
            if h.data_file_raw:
                raise ImageOpenError("a raw external data file cannot have a backing file")
            self.backing = open_backing(path, h.backing_file, h.backing_format, chain)
        self._last_compressed: tuple[int, bytes] = (-1, b"")
        self._meta_prealloc: bool | None = None
        # under "preserve", kept host clusters take writes in place: not holes for NBD
        self._reserved = self.policy is Policy.PRESERVE
        self._l1_shift = geo.l2_bits + geo.cluster_bits
        self._l2_mask = geo.l2_size - 1
        self._file_size = file_size
        self._lazy_dirty = False
        if writable:
            if h.nb_snapshots:
                from nbdqcow.qcow2.unshare import register_snapshot_metadata

                register_snapshot_metadata(self)
            if h.dirty:
                from nbdqcow.qcow2.check import rebuild_refcounts

                rebuild_refcounts(self)
            if h.lazy_refcounts and h.version >= 3:
                self._set_incompat(L.INCOMPAT_DIRTY, True)
                self._lazy_dirty = True
        fast_zero = writable and h.version >= 3 and not h.data_file_raw
        self._caps = Capabilities(
            writable=writable, flush=writable, discard=writable, write_zeroes=writable,
            fast_zero=fast_zero, block_status=True, allocation_depth=True, native_fua=True,
            cache=True,
        )

    def _check_table_in_file(self, what: str, offset: int, length: int, file_size: int) -> None:
        if offset + length > file_size:
            raise ImageOpenError(f"{what} lies past the end of the file")

    def _check_no_overlap(self, *regions: tuple[str, int, int]) -> None:
        cs = self.geo.cluster_size
        spans = [(name, off, off + ((n + cs - 1) // cs) * cs) for name, off, n in regions if n]
        for i, (na, a0, a1) in enumerate(spans):
            for nb, b0, b1 in spans[i + 1 :]:
                if a0 < b1 and b0 < a1:
                    raise ImageOpenError(f"{na} overlaps the {nb}")

    def _find_snapshot(self, name: str) -> tuple[int, int, int]:
        from nbdqcow.qcow2.snapshot import read_snapshot_table

        snaps = read_snapshot_table(self.file, self.header)
        for by_id in (True, False):
            for s in snaps:
                if (s.id_str if by_id else s.name) == name:
                    self.snapshot_name = s.name
                    size = s.disk_size if s.disk_size is not None else self.header.size
                    return s.l1_table_offset, s.l1_size, size
        raise ImageOpenError(f"snapshot '{name}' not found")

    # ------------------------------------------------------------------ properties
    @property
    def size(self) -> int:
        return self._size

    @property
    def caps(self) -> Capabilities:
        return self._caps

    @property
    def refcounts(self) -> Refcounts:
        if self._refcounts is None:
            h = self.header
            self._refcounts = Refcounts(
                self.file, self.geo, h.refcount_table_offset, h.refcount_table_clusters,
                self._refcount_cache_tables, self.meta, self._on_reftable_moved,
            )
        return self._refcounts

    # ------------------------------------------------------------------ header
    def _write_header(self) -> None:
        self.file.pwrite(encode_header(self.header), 0)

    def _set_incompat(self, bit: int, on: bool) -> None:
        feats = self.header.incompatible_features
        feats = feats | bit if on else feats & ~bit
        if feats != self.header.incompatible_features:
            self.header = self.header.replace(incompatible_features=feats)
            self._write_header()
            self.file.sync()

    def _on_reftable_moved(self, offset: int, clusters: int) -> None:
        self.header = self.header.replace(
            refcount_table_offset=offset, refcount_table_clusters=clusters)
        self._write_header()
        self.file.sync()

    def mark_corrupt(self, why: str) -> None:
        """Corruption is a state: set the corrupt bit once, stop writing, answer EIO."""
        if not self.corrupt:
            self.corrupt = True
            if self.writable and self.header.version >= 3:
                try:
                    self._set_incompat(L.INCOMPAT_CORRUPT, True)
                except OSError:
                    pass
        raise CorruptImage(f"{self.path}: {why}; image marked corrupt")

    # ------------------------------------------------------------------ L2 tables
    def _load_l2(self, offset: int) -> array[int]:
        return load_u64(self.file.pread(self.geo.cluster_size, offset))

    def _store_l2(self, offset: int, table: array[int]) -> None:
        self._guard_metadata_write(offset)
        self.file.pwrite(store_u64(table), offset)

    def _before_l2_store(self) -> None:
        rc = self._refcounts
        if rc is not None and rc.dirty:
            rc.flush()
            self.file.sync()

    def _guard_metadata_write(self, offset: int) -> None:
        if offset < self.geo.cluster_size:
            self.mark_corrupt(f"refusing to overwrite the header with a table at {offset:#x}")

    def _l2_for_read(self, l1i: int) -> array[int] | None:
        if l1i >= len(self.l1):
            return None
        off = self.l1[l1i] & L.L1E_OFFSET_MASK
        if not off:
            return None
        if off not in self.l2_cache and off + self.geo.cluster_size > self.file.size():
            self.mark_corrupt(f"L2 table at {off:#x} lies past the end of the file")
        return self.l2_cache.get(off)

    def _l2_for_write(self, l1i: int) -> tuple[int, array[int]]:
        """The L2 table for L1 index ``l1i``, allocated or copied so it may be modified."""
        if l1i >= len(self.l1):
            self.mark_corrupt(f"L1 index {l1i} beyond the L1 table")
        e = self.l1[l1i]
        off = e & L.L1E_OFFSET_MASK
        rc = self.refcounts
        if not off:
            new = self._alloc_meta_cluster()
            table = array("Q", bytes(self.geo.cluster_size))
            self.l2_cache.insert_new(new, table)
            self._set_l1(l1i, new | COPIED)
            return new, table
        found = self._l2_for_read(l1i)
        assert found is not None
        table = found
        if e & COPIED:
            return off, table
        if rc.get(off >> self.geo.cluster_bits) == 1:
            self._set_l1(l1i, off | COPIED)
            return off, table
        # shared L2 table (internal snapshot): copy it, recompute COPIED per entry
        new = self._alloc_meta_cluster()
        copy = array("Q", table)
        step = self.geo.l2_entry_words
        for i in range(0, len(copy), step):
            ent = copy[i]
            h = ent & OFF_MASK
            if h and not ent & L.QCOW_OFLAG_COMPRESSED and not self.header.has_data_file:
                if rc.get(h >> self.geo.cluster_bits) == 1:
                    copy[i] = ent | COPIED
                else:
                    copy[i] = ent & ~COPIED
        self.l2_cache.insert_new(new, copy)
        self._set_l1(l1i, new | COPIED)
        rc.free_later(off >> self.geo.cluster_bits)
        return new, copy

    def _set_l1(self, l1i: int, value: int) -> None:
        self.l1[l1i] = value
        self.l1_dirty.add(l1i)

    # ------------------------------------------------------------------ allocation
    def _alloc_meta_cluster(self) -> int:
        c = self.refcounts.alloc(1)
        self.meta.add(c)
        return c << self.geo.cluster_bits

    def _alloc_data_cluster(self, guest_cluster_offset: int) -> int:
        if self.header.has_data_file:
            return guest_cluster_offset
        return self.refcounts.alloc(1) << self.geo.cluster_bits

    def _abort_data_cluster(self, host: int) -> None:
        if not self.header.has_data_file:
            self.refcounts.update(host >> self.geo.cluster_bits, -1)

    def _unshare(self, pos: int, host: int) -> bool:
        """Under ``preserve``, give snapshots their own copy so the live cluster stays."""
        if self.policy is not Policy.PRESERVE or not self.header.nb_snapshots:
            return False
        from nbdqcow.qcow2.unshare import move_snapshot_copy

        return move_snapshot_copy(self, pos, host)

    def _release(self, entry: int) -> None:
        """Queue the decrement of whatever host clusters an (old) L2 entry held."""
        if self.header.has_data_file:
            return
        rc = self.refcounts
        if entry & L.QCOW_OFLAG_COMPRESSED:
            for c in self.geo.compressed_host_clusters(entry):
                rc.free_later(c)
        elif entry & OFF_MASK:
            rc.free_later((entry & OFF_MASK) >> self.geo.cluster_bits)

    def _overlaps_metadata(self, host: int, n: int) -> bool:
        """Whether a data write of ``n`` bytes at ``host`` would touch a metadata cluster."""
        if self.header.has_data_file:
            return False
        cb = self.geo.cluster_bits
        return any(c in self.meta for c in range(host >> cb, ((host + max(n, 1) - 1) >> cb) + 1))

    # ------------------------------------------------------------------ mapping
    def runs(self, offset: int, length: int) -> Iterator[Run]:
        return iter_runs(self.geo, self._l2_for_read, offset, length,
                         self.header.has_data_file, self.mark_corrupt)

    # ------------------------------------------------------------------ reading
    def _locate(self, offset: int, length: int) -> tuple[int | None, list[Run]]:
        """(host, []) when [offset, offset+length) reads from one contiguous run of host
        data, else (None, its runs).  Call with the lock held."""
        host = self._fast_host(offset, length)
        if host is not None:
            return host, []
        runs = list(self.runs(offset, length))
        if len(runs) == 1 and runs[0][2] is SC.NORMAL:
            return runs[0][3], []
        return None, runs

    def pread(self, offset: int, length: int) -> bytes:
        check_range(self._size, offset, length)
        with self._lock:
            host, runs = self._locate(offset, length)
            if host is None:
                return self._read(offset, length, runs)
            self._check_in_file(host, length)
        # Data I/O runs outside the lock so that large requests overlap.  A mapped
        # cluster only moves (or is freed) through a write or discard of the same guest
        # range, which the server orders after this read.
        return self.data_file.pread(length, host)

    def preadinto(self, offset: int, buf: memoryview, nowait: bool = False) -> None:
        """Like pread, into ``buf`` (whose old contents do not matter)."""
        length = len(buf)
        check_range(self._size, offset, length)
        with self._lock:
            host, runs = self._locate(offset, length)
            if host is None:
                self._read_into(buf, offset, runs, nowait=nowait)
                return
            self._check_in_file(host, length)
        self.data_file.preadinto(buf, host, nowait)  # outside the lock: see pread

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        # Only under ``preserve``: a host cluster then keeps its guest cluster for good,
        # so bytes a reply is still sending from the page cache can change only by a
        # write to the same guest range (which overlapped the READ: NBD leaves that
        # undefined).  Under ``release`` a discarded cluster may come back holding
        # another guest range's data.
        if self.policy is not Policy.PRESERVE or offset < 0 or length <= 0 or self.data_file.direct:
            return None
        if offset + length > self._size:
            return None
        with self._lock:
            host, _ = self._locate(offset, length)
        if host is None:
            return None
        if self.data_file is self.file and host + length > self._file_size:
            return None  # the usual read path reports it
        return self.data_file.fd, host

    def _fast_host(self, offset: int, length: int, write: bool = False) -> int | None:
        """Hot path: host offset when [offset, offset+length) lies in one cluster that
        holds data (standard, or all touched subclusters allocated), or in consecutive
        standard clusters of one L2 table that hold data at consecutive host offsets --
        and, for a ``write``, that this image owns alone (COPIED) -- else None."""
        geo = self.geo
        cs = geo.cluster_size
        co = offset & (cs - 1)
        if self.data_file is not self.file or length <= 0:
            return None
        several = co + length > cs
        if several and geo.extended_l2:
            return None
        l1i = offset >> self._l1_shift
        if l1i >= len(self.l1) or (several and (offset + length - 1) >> self._l1_shift != l1i):
            return None
        table = self.l2_cache.get_cached(self.l1[l1i] & L.L1E_OFFSET_MASK)
        if table is None:
            return None
        idx = (offset >> geo.cluster_bits) & self._l2_mask
        if geo.extended_l2:
            e, bm = table[2 * idx], table[2 * idx + 1]
            first = co >> geo.subcluster_bits
            mask = sc_range_mask(first, ((co + length - 1) >> geo.subcluster_bits) - first + 1)
            if bm & mask != mask or (bm >> 32) & mask:
                return None
        else:
            e = table[idx]
            if e & ZERO_FLAG:
                return None
        bad = L.QCOW_OFLAG_COMPRESSED | (0 if geo.extended_l2 else ZERO_FLAG)
        if e & bad or (write and not e & COPIED):
            return None
        h = e & OFF_MASK
        if not h or h & (cs - 1) or h + co + length > self._file_size:
            return None
        if several:
            # every further cluster: data (not zero, not compressed; owned for a write)
            # right after the previous one on the host
            want = h
            for e in table[idx + 1 : ((offset + length - 1) >> geo.cluster_bits & self._l2_mask) + 1]:
                want += cs
                if e & OFF_MASK != want or e & bad or (write and not e & COPIED):
                    return None
        return h + co

    def _read(self, offset: int, length: int, runs: list[Run] | None = None) -> bytes:
        if runs is None:
            runs = list(self.runs(offset, length))
        if len(runs) == 1 and runs[0][2] is SC.NORMAL:
            self._check_in_file(runs[0][3], length)
            return self.data_file.pread(length, runs[0][3])
        buf = bytearray(length)
        self._read_into(memoryview(buf), offset, runs, zeroed=True)
        return bytes(buf)

    def _read_into(
        self, mv: memoryview, offset: int, runs: list[Run], zeroed: bool = False,
        nowait: bool = False,
    ) -> None:
        """Fill ``mv`` with guest [offset, offset+len(mv)) following ``runs``."""
        for start, n, t, host in runs:
            o = start - offset
            if t is SC.NORMAL:
                self._check_in_file(host, n)
                self.data_file.preadinto(mv[o : o + n], host, nowait)
            elif t in READS_ZERO:
                if not zeroed:
                    fill_zero(mv[o : o + n])
            elif t in READS_BACKING:
                self._read_backing(mv[o : o + n], start, nowait)
            elif t is SC.COMPRESSED:
                data = self._decompress(host)
                co = start & (self.geo.cluster_size - 1)
                mv[o : o + n] = data[co : co + n]

    def _check_in_file(self, host: int, n: int) -> None:
        """A data cluster past the end of the image file is an impossible entry.
        (An external data file may be short: it reads like a raw file.)"""
        if self.data_file is not self.file or host + n <= self._file_size:
            return
        self._file_size = self.file.size()
        if host + n > self._file_size:
            self.mark_corrupt(f"data cluster at {host:#x} lies past the end of the file")

    def _read_backing(self, out: memoryview, offset: int, nowait: bool = False) -> None:
        b = self.backing
        n = 0 if b is None else max(0, min(len(out), b.size - offset))
        if b is not None and n:
            b.preadinto(offset, out[:n], nowait)
        if n < len(out):  # past the end of a shorter backing file (or none): zeros
            fill_zero(out[n:])

    def _decompress(self, entry: int) -> bytes:
        if self._last_compressed[0] == entry:
            return self._last_compressed[1]
        off, n = self.geo.compressed_extent(entry)
        if off + n > self.file.size() + L.SECTOR:
            self.mark_corrupt(f"compressed cluster at {off:#x} lies past the end of the file")
        data = decompress_cluster(self.file.pread(n, off), self.geo.cluster_size,
                                  self.header.compression_type)
        self._last_compressed = (entry, data)
        return data

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
            return None  # the slow path extends the file (and re-checks sizes)
        if self._overlaps_metadata(host, n):
            return None  # the slow path marks the image corrupt
        return host

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
            self._data_write(buf, h)
            table[idx] = h | COPIED
            self.l2_cache.mark_dirty(l2off)
            return
        new = self._write_new_cluster(self._cluster_image(cstart, co, piece, zero_rest=False), cstart)
        table[idx] = new | COPIED
        self.l2_cache.mark_dirty(l2off)
        self._release(e)

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
            self._data_write(data, host + span_start)
        else:
            host = self._write_new_cluster(data, cstart, span_start)
        table[2 * idx] = host | COPIED
        table[2 * idx + 1] = (bm | mask) & ~(mask << 32)
        self.l2_cache.mark_dirty(l2off)

    # ------------------------------------------------------------------ zeroing
    def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self._check_writable(offset, length)
        op = Op.WRITE_ZEROES_UNMAP if may_unmap else Op.WRITE_ZEROES
        with self._lock:
            if fast and self._zero_range(offset, length, op, dry=True):
                raise NotSupported("write-zeroes cannot be done without writing data")
            self._zero_range(offset, length, op, dry=False)

    def discard(self, offset: int, length: int) -> None:
        self._check_writable(offset, length)
        with self._lock:
            self._zero_range(offset, length, Op.DISCARD, dry=False)

    def _zero_range(self, offset: int, length: int, op: Op, dry: bool) -> bool:
        """Zero (or discard) a range.  With ``dry``, change nothing and return whether
        some part would need data to be written (i.e. could not be fast)."""
        cs = self.geo.cluster_size
        end = offset + length
        pos = offset
        slow = False
        while pos < end:
            c_end = min(end, (pos | (cs - 1)) + 1)
            full = (pos & (cs - 1)) == 0 and (c_end - pos == cs or c_end == self._size)
            slow |= self._zero_piece(pos, c_end - pos, full, op, dry)
            pos = c_end
        return slow

    def _reads_zero(self, pos: int, n: int) -> bool:
        for start, rn, t, _ in self.runs(pos, n):
            if t in READS_ZERO:
                continue
            if t in READS_BACKING:
                b = self.backing
                if b is None or start >= b.size:
                    continue
                if all(x.zero for x in b.block_status(start, min(rn, b.size - start))):
                    continue
            return False
        return True

    def _zero_whole_cluster(self, pos: int, n: int) -> bool:
        """A partial zero write at [pos, pos+n) may zero its whole (standard) cluster:
        the cluster holds no data and the rest of it reads as zero."""
        e, _ = self._entry(pos)
        if std_type(e, self.header.has_data_file) not in (SC.UNALLOCATED_PLAIN, SC.ZERO_PLAIN,
                                                          SC.ZERO_ALLOC):
            return False
        cs = self.geo.cluster_size
        cstart = pos & ~(cs - 1)
        cend = min(cstart + cs, self._size)
        return (pos == cstart or self._reads_zero(cstart, pos - cstart)) and (
            pos + n == cend or self._reads_zero(pos + n, cend - pos - n))

    def _zero_piece(self, pos: int, n: int, full: bool, op: Op, dry: bool) -> bool:
        h = self.header
        geo = self.geo
        raw_df = h.data_file_raw
        discard = op is Op.DISCARD
        if raw_df:
            # the data file must read as the guest sees it: zero the bytes themselves
            if dry:
                return True
            e, _ = self._entry(pos)
            if e & COPIED:
                host = (e & OFF_MASK) + (pos & (geo.cluster_size - 1))
                if discard or op is Op.WRITE_ZEROES_UNMAP:
                    if not self.data_file.punch_hole(host, n):
                        self.data_file.zero_range(host, n)
                else:
                    self.data_file.zero_range(host, n)
            return False
        if geo.extended_l2:
            return self._zero_piece_ext(pos, n, op, dry)
        if not full:
            if discard:
                return False
            if h.version >= 3 and self._zero_whole_cluster(pos, n):
                # as qemu: the rest of an unallocated or zero cluster reads as zero, so
                # the whole cluster becomes a zero cluster (no data written)
                cs = geo.cluster_size
                cstart = pos & ~(cs - 1)
                return self._zero_piece(cstart, min(cs, self._size - cstart), True, op, dry)
            if h.version < 3 and self._reads_zero(pos, n):
                return False
            # qemu writes the zeros (v3: even where they read as zero already, so that
            # a cluster whose backing data shows around them gets allocated the same)
            if not dry:
                self._write(memoryview(bytes(n)), pos)
            return True
        if h.version < 3:
            return self._zero_cluster_v2(pos, n, op, dry)
        if dry:
            return False
        l2off, table = self._l2_for_write(geo.offset_to_l1_index(pos))
        idx = geo.offset_to_l2_index(pos)
        e = table[idx]
        t = std_type(e, h.has_data_file)
        owned = bool(e & COPIED) and t in HAS_HOST
        if t is SC.NORMAL and not owned and self._unshare(pos, e & OFF_MASK):
            e |= COPIED
            owned = True
        if owned and self.policy.keep_host(op):
            table[idx] = (e & OFF_MASK) | COPIED | ZERO_FLAG
        else:
            if discard and self.backing is None:
                table[idx] = 0
            else:
                table[idx] = ZERO_FLAG
            self._release(e)
        self.l2_cache.mark_dirty(l2off)
        return False

    def _zero_cluster_v2(self, pos: int, n: int, op: Op, dry: bool) -> bool:
        """Version 2 has no zero flag: unmap when that reads as zero, else write zeros."""
        e, _ = self._entry(pos)
        owned = bool(e & COPIED) and bool(e & OFF_MASK)
        keep = owned and self.policy.keep_host(op)
        if op is Op.DISCARD and self.policy is Policy.PRESERVE:
            # no zero flag to mark a kept cluster: TRIM is advisory, leave it as it is
            return False
        if op is Op.DISCARD and not keep:
            # reads the backing file afterwards (or zeros without one)
            if not dry and e:
                self._unmap_v2(pos, e)
            return False
        if self._reads_zero(pos, n):
            return False
        if self.backing is None and not keep:
            if not dry:
                self._unmap_v2(pos, e)
            return False
        if not dry:
            self._write(memoryview(bytes(n)), pos)
        return True

    def _unmap_v2(self, pos: int, entry: int) -> None:
        """Drop the mapping of the cluster at ``pos`` (a v2 image: no zero flag)."""
        geo = self.geo
        l2off, table = self._l2_for_write(geo.offset_to_l1_index(pos))
        table[geo.offset_to_l2_index(pos)] = 0
        self.l2_cache.mark_dirty(l2off)
        self._release(entry)

    def _zero_piece_ext(self, pos: int, n: int, op: Op, dry: bool) -> bool:
        geo = self.geo
        cs = geo.cluster_size
        scb = geo.subcluster_bits
        scs = geo.subcluster_size
        cstart = pos & ~(cs - 1)
        co = pos - cstart
        end = co + n
        csize = min(cs, self._size - cstart)
        discard = op is Op.DISCARD
        # whole subclusters covered (the last one may end at the image end)
        first = (co + scs - 1) >> scb
        last_excl = end >> scb
        if end == csize and end & (scs - 1):
            last_excl = (end >> scb) + 1
        slow = False
        # partial head / tail subclusters
        head_end = min(end, first << scb)
        tail_start = max(head_end, last_excl << scb)
        for a, b in ((co, head_end), (tail_start, end)):
            if b > a and not discard and not self._reads_zero(cstart + a, b - a):
                slow = True
                if not dry:
                    self._write(memoryview(bytes(b - a)), cstart + a)
        if last_excl <= first or dry:
            return slow
        mask = sc_range_mask(first, last_excl - first)
        l2off, table = self._l2_for_write(geo.offset_to_l1_index(pos))
        idx = geo.offset_to_l2_index(pos)
        e, bm = table[2 * idx], table[2 * idx + 1]
        has_host = bool(e & OFF_MASK) or (self.header.has_data_file and bool(e & COPIED))
        if has_host and not e & (COPIED | L.QCOW_OFLAG_COMPRESSED) and self._unshare(pos, e & OFF_MASK):
            e |= COPIED
            table[2 * idx] = e
        whole = mask == 0xFFFFFFFF
        if e & L.QCOW_OFLAG_COMPRESSED or (has_host and not e & COPIED):
            if not whole:
                # shared/compressed: copy first, then mark zero
                self._write(memoryview(bytes((last_excl - first) << scb)), cstart + (first << scb))
                e, bm = table[2 * idx], table[2 * idx + 1]
            else:
                self._release(e)
                table[2 * idx] = 0
                table[2 * idx + 1] = L.L2_BITMAP_ZERO_ALL if (not discard or self.backing) else 0
                self.l2_cache.mark_dirty(l2off)
                return slow
        if whole and has_host and not self.policy.keep_host(op):
            self._release(e)
            table[2 * idx] = 0
            table[2 * idx + 1] = L.L2_BITMAP_ZERO_ALL if (not discard or self.backing) else 0
        else:
            table[2 * idx + 1] = (bm & ~mask) | (mask << 32)
        self.l2_cache.mark_dirty(l2off)
        return slow

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
            self._sync()
            self.l2_cache.write_back()
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

    def close(self) -> None:
        with self._lock:
            if self.file.fd < 0:
                return
            try:
                if self.writable and not self.corrupt:
                    self._flush()
                    if self._lazy_dirty:
                        self._set_incompat(L.INCOMPAT_DIRTY, False)
            finally:
                if self.data_file is not self.file:
                    self.data_file.close()
                self.file.close()
                if self.backing is not None:
                    self.backing.close()

    # ------------------------------------------------------------------ block status
    def block_status(self, offset: int, length: int) -> list[Extent]:
        check_range(self._size, offset, length)
        with self._lock:
            return self._block_status(offset, length)

    def _metadata_preallocated(self) -> bool:
        """Whether the image looks metadata-preallocated (host clusters refcounted well
        beyond what the file really allocates).  Only then does block status ask the host
        file where a data cluster is a hole; qemu 7.2 decides the same way."""
        if self._meta_prealloc is None:
            cs = self.geo.cluster_size
            real_clusters = self.file.allocated_bytes() // cs
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            nb_clusters = self.geo.size_to_clusters(self.file.size())
            rc = self.refcounts
            count = 0
            for c in range(nb_clusters):
                if rc.get(c) > 0:
                    count += 1
                    if count >= threshold:
                        break
            self._meta_prealloc = count >= threshold
        return self._meta_prealloc

    def _block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        fname = self.data_file.path
        for start, n, t, host in self.runs(offset, length):
            if t is SC.NORMAL:
                if not self._metadata_preallocated():
                    out.append(Extent(start, n, True, True, False, 0, host, fname))
                    continue
                for hs, hn, is_data in self.data_file.data_runs(host, n):
                    out.append(Extent(start + hs - host, hn, True, True, not is_data, 0, hs, fname))
            elif t is SC.ZERO_ALLOC:
                out.append(Extent(start, n, True, False, True, 0, host, fname,
                                  self._reserved))
            elif t is SC.ZERO_PLAIN:
                out.append(Extent(start, n, True, False, True, 0, None, None))
            elif t is SC.COMPRESSED:
                out.append(Extent(start, n, True, True, False, 0, None, None))
            else:
                reserved = host if t is SC.UNALLOCATED_ALLOC else None
                out.extend(self._backing_status(start, n, reserved, fname))
        return out

    def _backing_status(
        self, start: int, n: int, reserved: int | None = None, fname: str | None = None
    ) -> list[Extent]:
        """Runs that fall through to the backing chain.  ``reserved``: host offset of an
        extended-L2 reservation, reported where no backing file answers (as qemu does)."""
        b = self.backing
        if b is None or start >= b.size:
            return [Extent(start, n, False, False, True, 0, reserved,
                           fname if reserved is not None else None,
                           reserved is not None and self._reserved)]
        out: list[Extent] = []
        bn = min(n, b.size - start)
        keep = reserved is not None and self._reserved
        for x in b.block_status(start, bn):
            out.append(x._replace(depth=x.depth + 1, reserved=x.reserved or keep))
        if bn < n:
            r = reserved + bn if reserved is not None else None
            out.append(Extent(start + bn, n - bn, False, False, True, 0, r,
                              fname if r is not None else None, keep))
        return out


def _typecheck(d: Qcow2Driver) -> BlockDriver:
    return d
