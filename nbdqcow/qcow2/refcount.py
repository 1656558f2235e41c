"""Refcount table and refcount blocks: lookups, increments, deferred decrements, new
blocks and table growth (qcow2.txt "Host cluster management").

Write ordering: increments reach the file (``flush``) before any L2/L1 entry that points
to a new cluster; a new refcount block is synced before the table entry that points to
it; decrements are queued (``free_later``) and applied only after the
tables that stopped pointing to those clusters are on disk (``apply_frees``).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from nbdqcow.block.hostfile import HostFile
from nbdqcow.errors import CorruptImage, NoSpace
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.cache import TableCache
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.space import HostSpace
from nbdqcow.qcow2.tables import load_refblock, load_u64, new_refblock, store_refblock, store_u64


class Refcounts:
    def __init__(
        self,
        file: HostFile,
        geo: Geometry,
        table_offset: int,
        table_clusters: int,
        cache_tables: int,
        meta: set[int],
        on_table_moved: Callable[[int, int], None],
        space: HostSpace | None = None,
    ) -> None:
        self.file = file
        # every cluster handed out is claimed in the host file first (see space.py)
        self.space = space if space is not None else HostSpace(file, geo.cluster_bits)
        self.geo = geo
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.table = load_u64(file.pread(table_clusters * geo.cluster_size, table_offset))
        self.table_dirty = False
        self.meta = meta  # cluster indexes holding metadata (overlap checks)
        self.on_table_moved = on_table_moved
        self.cache = TableCache(cache_tables, self._load_block, self._store_block)
        self.pending_frees: list[int] = []
        self.free_hint = 0
        self._bits = geo.refcount_block_bits
        self._mask = geo.refcount_block_entries - 1
        cs = geo.cluster_size
        for c in range(table_clusters):
            meta.add((table_offset >> geo.cluster_bits) + c)
        blocks: set[int] = set()
        for e in self.table:
            off = e & L.REFT_OFFSET_MASK
            if off:
                if off % cs:
                    raise CorruptImage(f"refcount block offset {off:#x} is not cluster aligned")
                c = off >> geo.cluster_bits
                if c in meta or c in blocks:
                    # counting from a table, the header or another block would let the
                    # allocator hand out clusters in use
                    raise CorruptImage(f"refcount block at {off:#x} overlaps other metadata")
                blocks.add(c)
        meta |= blocks

    # --- blocks ----------------------------------------------------------------------
    def _load_block(self, offset: int) -> array[int]:
        if offset + self.geo.cluster_size > self.file.size():
            # zeros read from past the end would say "free" for clusters in use
            raise CorruptImage(f"refcount block at {offset:#x} lies past the end of the file")
        return load_refblock(self.file.pread(self.geo.cluster_size, offset), self.geo.refcount_bits)

    def _store_block(self, offset: int, blk: array[int]) -> None:
        self.file.pwrite(store_refblock(blk, self.geo.refcount_bits), offset)

    def _block_offset(self, rti: int) -> int:
        if rti >= len(self.table):
            return 0
        return self.table[rti] & L.REFT_OFFSET_MASK

    def block(self, rti: int) -> array[int] | None:
        """The refcounts of the clusters refcount table entry ``rti`` covers (one item
        per cluster; live, do not change it); None when no block is allocated."""
        off = self._block_offset(rti)
        return self.cache.get(off) if off else None

    def get(self, cluster: int) -> int:
        off = self._block_offset(cluster >> self._bits)
        if not off:
            return 0
        return self.cache.get(off)[cluster & self._mask]

    def update(self, cluster: int, delta: int) -> None:
        off = self._ensure_block(cluster)
        blk = self.cache.get(off)
        i = cluster & self._mask
        v = blk[i] + delta
        if v < 0:
            raise CorruptImage(f"refcount of cluster {cluster:#x} would drop below zero")
        if v > self.geo.refcount_max:
            raise NoSpace(f"refcount of cluster {cluster:#x} would overflow")
        blk[i] = v
        self.cache.mark_dirty(off)
        if v == 0 and cluster < self.free_hint:
            self.free_hint = cluster

    def effective(self, cluster: int) -> int:
        """The refcount once queued decrements are applied."""
        return self.get(cluster) - self.pending_frees.count(cluster)

    def free_later(self, cluster: int) -> None:
        self.pending_frees.append(cluster)

    # --- finding free space ----------------------------------------------------------
    def find_free_run(self, n: int) -> int:
        """First run of ``n`` clusters with refcount 0, scanning from the hint."""
        i = self.free_hint
        start, run = i, 0
        entries = self.geo.refcount_block_entries
        meta = self.meta
        while run < n:
            off = self._block_offset(i >> self._bits)
            j = i & self._mask
            if not off:
                # a whole block range with no block: all free
                if run == 0:
                    start = i
                run += entries - j
                i += entries - j
                continue
            blk = self.cache.get(off)
            while j < entries and run < n:
                if blk[j] == 0 and i not in meta:
                    if run == 0:
                        start = i
                    run += 1
                else:
                    run = 0
                i += 1
                j += 1
        return start

    def alloc(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1); returns the first index."""
        while True:
            start = self.find_free_run(n)
            for c in range(start, start + n):
                self._ensure_block(c)  # may itself take a free cluster: check again
            if all(self.get(c) == 0 and c not in self.meta for c in range(start, start + n)):
                break
        self.space.claim(start, n)  # NoSpace here changes nothing
        for c in range(start, start + n):
            self.update(c, +1)
        if n == 1 and self.free_hint <= start:
            self.free_hint = start + 1  # everything from the hint to start is in use
        return start

    def _ensure_block(self, cluster: int) -> int:
        """Offset of the refcount block covering ``cluster``, creating blocks as needed."""
        rti = cluster >> self._bits
        while True:
            off = self._block_offset(rti)
            if off:
                return off
            if rti >= len(self.table):
                self._grow_table(rti + 1)
                continue
            c = self.find_free_run(1)
            rti_c = c >> self._bits
            if rti_c >= len(self.table):
                self._grow_table(rti_c + 1)
                continue
            self.space.claim(c)
            blk = new_refblock(self.geo.refcount_block_entries, self.geo.refcount_bits)
            if not self._block_offset(rti_c):
                # the new block describes itself
                blk[c & self._mask] = 1
                self._install_block(rti_c, c, blk)
            else:
                self._install_block(rti, c, blk)
                self.update(c, +1)

    def _install_block(self, rti: int, cluster: int, blk: array[int]) -> None:
        off = cluster << self.geo.cluster_bits
        self.cache.insert_new(off, blk)
        self.table[rti] = off
        self.table_dirty = True
        self.meta.add(cluster)

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a bigger place (crash-safe: new blocks and table are
        written and synced before the header points to them)."""
        geo = self.geo
        cs = geo.cluster_size
        per_cluster = cs // 8
        new_entries = max(min_entries, len(self.table) * 2, per_cluster)
        self.flush()
        while True:
            nt = (new_entries + per_cluster - 1) // per_cluster
            if nt * cs > L.MAX_REFTABLE_BYTES:
                raise NoSpace("refcount table would exceed its maximum size")
            nb = 0
            while True:
                start = self.find_free_run(nt + nb)
                missing = sorted({
                    c >> self._bits for c in range(start, start + nt + nb)
                    if not self._block_offset(c >> self._bits)
                })
                if len(missing) <= nb:
                    break
                nb = len(missing)
            if not missing or missing[-1] < new_entries:
                break
            new_entries = missing[-1] + 1
        self.space.claim(start, nt + len(missing))
        table = array("Q", bytes(nt * cs))
        table[: len(self.table)] = self.table
        new_blocks: dict[int, array[int]] = {}
        for k, rti in enumerate(missing):
            c = start + nt + k
            table[rti] = c << geo.cluster_bits
            new_blocks[rti] = new_refblock(geo.refcount_block_entries, geo.refcount_bits)
        used = list(range(start, start + nt)) + [start + nt + k for k in range(len(missing))]
        old_table_off, old_clusters = self.table_offset, self.table_clusters
        for c in used:
            rti = c >> self._bits
            if rti in new_blocks:
                new_blocks[rti][c & self._mask] += 1
            else:
                off = table[rti] & L.REFT_OFFSET_MASK
                blk = self.cache.get(off)
                blk[c & self._mask] += 1
                self.cache.mark_dirty(off)
        for rti, blk in new_blocks.items():
            self._store_block(table[rti] & L.REFT_OFFSET_MASK, blk)
        self.cache.write_back()
        self.file.pwrite(store_u64(table), start << geo.cluster_bits)
        self.file.sync()
        self.table = table
        self.table_offset, self.table_clusters = start << geo.cluster_bits, nt
        self.table_dirty = False
        self.on_table_moved(self.table_offset, nt)  # writes + syncs the header
        for rti, blk in new_blocks.items():
            off = table[rti] & L.REFT_OFFSET_MASK
            self.cache.insert_new(off, blk)
            self.cache.write_back()
        for c in used:
            self.meta.add(c)
        old_first = old_table_off >> geo.cluster_bits
        for c in range(old_first, old_first + old_clusters):
            self.meta.discard(c)
            self.update(c, -1)

    # --- persistence -----------------------------------------------------------------
    def flush(self) -> bool:
        """Write dirty refcount blocks, then the table. True if anything was written."""
        wrote = self.cache.write_back()
        if self.table_dirty:
            # a new refcount block is on disk before the table entry that points to it
            self.file.sync()
            self.file.pwrite(store_u64(self.table), self.table_offset)
            self.table_dirty = False
            wrote = True
        return wrote

    @property
    def dirty(self) -> bool:
        return self.cache.has_dirty or self.table_dirty

    def apply_frees(self) -> bool:
        """Apply queued decrements (call once the tables that dropped them are on disk)."""
        if not self.pending_frees:
            return False
        frees, self.pending_frees = self.pending_frees, []
        for c in frees:
            self.update(c, -1)
        return True
