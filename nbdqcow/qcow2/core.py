"""The core of the qcow2 engine: opening an image (header, L1, caches, data file,
backing chain), the header, L2 tables, host cluster allocation and the mapping walk.

The engine is one class built in layers, one module per path, each a subclass of the one
before (qcow2.txt as a whole; read in this order):
``core`` (open, tables, allocation) -> ``reading`` -> ``writing`` (allocation on write,
copy-on-write) -> ``zeroing`` (write-zeroes, discard) -> ``compressing`` (compressed
writes) -> ``driver`` (flush, close, block
status: :class:`~nbdqcow.qcow2.driver.Qcow2Driver`, the only class others use).

Concurrency: every public method takes one lock; code between two calls is atomic.
Write ordering (see ARCHITECTURE.md): guest data is written before the L2 entry that
points to it; refcount increments reach the file before L2/L1 entries (flush hook of the
L2 cache); decrements are applied only after the L2/L1 tables that dropped the cluster.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING, Self, cast

from nbdqcow.block.driver import BlockDriver, Capabilities
from nbdqcow.block.hostfile import HostFile
from nbdqcow.block.locking import Access
from nbdqcow.errors import CorruptImage, ImageOpenError
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.backing import BackingOpener, GivenBacking, backing_required
from nbdqcow.qcow2.bitmap_store import LiveBitmaps
from nbdqcow.qcow2.cache import TableCache
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.header import Header, encode_header, parse_header
from nbdqcow.qcow2.mapping import Run, iter_runs
from nbdqcow.qcow2.policy import DEFAULT_POLICY, Policy
from nbdqcow.qcow2.refcount import Refcounts
from nbdqcow.qcow2.scancache import ScanCache
from nbdqcow.qcow2.space import reserve
from nbdqcow.qcow2.tables import load_u64, store_u64

if TYPE_CHECKING:
    from nbdqcow.qcow2.driver import Qcow2Driver

DEFAULT_CACHE_SIZE = 32 * 1024 * 1024
COPIED = L.QCOW_OFLAG_COPIED
ZERO_FLAG = L.QCOW_OFLAG_ZERO
OFF_MASK = L.L2E_OFFSET_MASK



class Qcow2Core:
    """Open image state, tables and allocation.  Open with :meth:`open`."""

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str,
        writable: bool = True,
        snapshot: str | None = None,
        cache_size: int | None = None,
        mapping: str | None = None,
        access: Access | None = None,
        *,
        backing: BackingOpener = backing_required,
        data_file: str | None = None,
        refcount_cache_size: int | None = None,
    ) -> Self:
        """Open the image at ``path``.  ``access``: how the image is used, for qemu's
        file locks (default: by this process alone, read-only or writable as
        ``writable`` says).  ``backing`` opens the backing file the header names (the
        image layer passes one; :func:`~nbdqcow.qcow2.backing.no_backing` opens none).
        ``data_file`` replaces the header's external data file name.  ``cache_size``:
        L2 table cache in bytes; ``refcount_cache_size``: refcount block cache (default
        a quarter of the L2 cache)."""
        if snapshot is not None and writable:
            raise ImageOpenError("an internal snapshot can only be opened read-only")
        access = access if access is not None else Access(write=writable)
        try:
            file = HostFile(path, writable, lock=access.image("qcow2"))
        except OSError as e:
            raise ImageOpenError(f"Could not open '{path}': {e.strerror}") from None
        try:
            return cls(path, file, writable, snapshot, cache_size, mapping, access, backing,
                       data_file, refcount_cache_size)
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
        access: Access | None = None,
        backing: BackingOpener = backing_required,
        data_file: str | None = None,
        refcount_cache_size: int | None = None,
    ) -> None:
        access = access if access is not None else Access(write=writable)
        self.path = path
        self.file = file
        self.writable = writable
        self.corrupt = False
        self._lock = threading.RLock()
        # the persistent bitmaps a writable open keeps current (bitmap_store.py)
        self.live_bitmaps: LiveBitmaps | None = None
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
        self._scans = ScanCache(self.geo, h.has_data_file)
        self._refcounts: Refcounts | None = None
        self._refcount_cache_tables = (
            max(4, tables // 4) if refcount_cache_size is None else max(4, refcount_cache_size // cs))
        # data file
        self.data_file = file
        if data_file is not None and not h.has_data_file:
            raise ImageOpenError("'data-file' can only be set for images with an external "
                                 "data file")
        if h.has_data_file:
            if not h.data_file and data_file is None:
                raise ImageOpenError("image needs an external data file but names none")
            # qemu opens a relative data file name relative to the working directory
            dpath = data_file or h.data_file or ""
            try:
                self.data_file = HostFile(dpath, writable, lock=access.data_file())
            except OSError as e:
                raise ImageOpenError(f"Could not open data file '{dpath}': {e.strerror}") from None
        self.backing: BlockDriver | None = None
        self._last_compressed: tuple[int, bytes] = (-1, b"")
        self._meta_prealloc: bool | None = None
        # under "preserve", kept host clusters take writes in place: not holes for NBD
        self._reserved = self.policy is Policy.PRESERVE
        self._l1_shift = geo.l2_bits + geo.cluster_bits
        self._l2_mask = geo.l2_size - 1
        self._file_size = file_size
        self._lazy_dirty = False
        try:
            self._open_backing_and_repair(h, writable, snapshot, backing)
        except BaseException:
            # the caller closes the image file; what was opened here goes too (and the
            # locks it holds with it)
            if self.data_file is not file:
                self.data_file.close()
            if self.backing is not None:
                self.backing.close()
            raise
        fast_zero = writable and h.version >= 3 and not h.data_file_raw
        self._caps = Capabilities(
            writable=writable, flush=writable, discard=writable, write_zeroes=writable,
            fast_zero=fast_zero, block_status=True, allocation_depth=True, native_fua=True,
            cache=True,
        )

    def _open_backing_and_repair(self, h: Header, writable: bool, snapshot: str | None,
                                 backing: BackingOpener) -> None:
        if h.backing_file or isinstance(backing, GivenBacking):
            if h.data_file_raw:
                raise ImageOpenError("a raw external data file cannot have a backing file")
            self.backing = backing(h.backing_file or "", h.backing_format)
        if writable:
            if h.nb_snapshots:
                from nbdqcow.qcow2.unshare import register_snapshot_metadata

                register_snapshot_metadata(cast("Qcow2Driver", self))
            if h.dirty:
                from nbdqcow.qcow2.check import rebuild_refcounts

                rebuild_refcounts(cast("Qcow2Driver", self))
            if snapshot is None:
                self.live_bitmaps = LiveBitmaps.load(self)
            if h.lazy_refcounts and h.version >= 3:
                self._set_incompat(L.INCOMPAT_DIRTY, True)
                self._lazy_dirty = True

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

    def update_header(self, header: Header) -> None:
        """Make ``header`` the image's header, on disk (synced)."""
        self.header = header
        self._write_header()
        self.file.sync()

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
        """Before any L2 table is written (a flush, or an eviction in the middle of an
        operation): the refcounts that count what its entries point to, and the guest
        data those entries point to, are on disk."""
        rc = self._refcounts
        if rc is not None and rc.dirty:
            rc.flush()
        self._sync_files()

    def _sync_files(self) -> None:
        if self.data_file is not self.file:
            self.data_file.sync()
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
            # not refcounted, but its space is claimed all the same (see space.py)
            reserve(self.data_file, guest_cluster_offset, self.geo.cluster_size)
            return guest_cluster_offset
        return self.refcounts.alloc(1) << self.geo.cluster_bits

    def _abort_data_cluster(self, host: int) -> None:
        if not self.header.has_data_file:
            self.refcounts.update(host >> self.geo.cluster_bits, -1)

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
                         self.header.has_data_file, self.mark_corrupt, self._scans)

