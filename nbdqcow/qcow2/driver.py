"""Qcow2Driver(BlockDriver): the qcow2 engine as the rest of the project sees it --
flush, close and block status on top of the read, write and zero paths (see core.py
for how the engine is layered)."""

from __future__ import annotations

from nbdqcow.block.driver import BlockDriver, Extent
from nbdqcow.block.ranges import check_range
from nbdqcow.errors import ImageError
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.compressing import Qcow2Compressor
from nbdqcow.qcow2.entries import SC


class Qcow2Driver(Qcow2Compressor):
    """A qcow2 image.  Open with :meth:`open`."""

    def close(self) -> None:
        with self._lock:
            if self.file.fd < 0:
                return
            try:
                if self.writable and not self.corrupt:
                    self._flush()
                    if self.live_bitmaps is not None:
                        self.live_bitmaps.store()
                    if self._lazy_dirty:
                        self._set_incompat(L.INCOMPAT_DIRTY, False)
                    if self._refcounts is not None:
                        self._refcounts.space.trim()  # blocks claimed ahead, unused
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
        file where a data cluster is a hole; qemu 7.2 decides the same way.

        A heuristic must not make reads of good data fail: when the refcounts cannot be
        read (damaged refcount table or blocks), the answer is "not preallocated", as
        in qemu."""
        if self._meta_prealloc is None:
            try:
                self._meta_prealloc = self._count_refcounted()
            except (ImageError, OSError, OverflowError, ValueError, MemoryError):
                self._meta_prealloc = False
        return self._meta_prealloc

    def _count_refcounted(self) -> bool:
        """Whether at least ~10 % more clusters are refcounted than the file allocates;
        counted a refcount block at a time (stops at the block that reaches it)."""
        import numpy as np

        cs = self.geo.cluster_size
        real_clusters = self.file.allocated_bytes() // cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        nb_clusters = self.geo.size_to_clusters(self.file.size())
        per = self.geo.refcount_block_entries
        rc = self.refcounts
        count = 0
        for rti in range((nb_clusters + per - 1) // per):
            blk = rc.block(rti)
            if blk is None:
                continue
            n = min(per, nb_clusters - rti * per)
            count += int(np.count_nonzero(np.frombuffer(blk, dtype=blk.typecode)[:n]))
            if count >= threshold:
                break
        return count >= threshold

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
