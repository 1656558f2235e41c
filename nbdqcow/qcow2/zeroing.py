"""Write-zeroes and discard in the qcow2 engine: zero flags, extended-L2 zero bits,
version 2 (no zero flag), and what the mapping policy keeps (qcow2/policy.py)."""

from __future__ import annotations

from nbdqcow.errors import NotSupported
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.core import COPIED, OFF_MASK, ZERO_FLAG
from nbdqcow.qcow2.entries import HAS_HOST, READS_BACKING, READS_ZERO, SC, sc_range_mask, std_type
from nbdqcow.qcow2.policy import Op, Policy
from nbdqcow.qcow2.writing import Qcow2Writer


class Qcow2Zeroer(Qcow2Writer):
    """Write-zeroes and discard (see core.py for the layering)."""

    # ------------------------------------------------------------------ zeroing
    def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self._check_writable(offset, length)
        op = Op.WRITE_ZEROES_UNMAP if may_unmap else Op.WRITE_ZEROES
        with self._lock:
            if fast and self._zero_range(offset, length, op, dry=True):
                raise NotSupported("write-zeroes cannot be done without writing data")
            if self.live_bitmaps is not None:
                self.live_bitmaps.mark(offset, length)
            self._zero_range(offset, length, op, dry=False)

    def discard(self, offset: int, length: int) -> None:
        self._check_writable(offset, length)
        with self._lock:
            if self.live_bitmaps is not None:
                self.live_bitmaps.mark(offset, length)
            self._zero_range(offset, length, Op.DISCARD, dry=False)

    def _zero_range(self, offset: int, length: int, op: Op, dry: bool) -> bool:
        """Zero (or discard) a range.  With ``dry``, change nothing and return whether
        some part would need data to be written (i.e. could not be fast)."""
        cs = self.geo.cluster_size
        end = offset + length
        pos = offset
        slow = False
        self._wipes = []
        try:
            while pos < end:
                c_end = min(end, (pos | (cs - 1)) + 1)
                full = (pos & (cs - 1)) == 0 and (c_end - pos == cs or c_end == self._size)
                slow |= self._zero_piece(pos, c_end - pos, full, op, dry)
                pos = c_end
        finally:
            self._run_wipes()
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
                return False  # as qemu: part of a cluster is not discarded at all
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
            if t is SC.NORMAL or self.policy is Policy.THIN:
                # (thin: a kept zero cluster may be a hole; NO_HOLE claims it again)
                self._wipe_kept(e & OFF_MASK, geo.cluster_size, op)
        else:
            if discard and self.backing is None:
                table[idx] = 0
            else:
                table[idx] = ZERO_FLAG
            self._wipe_freed(e)
            self._release(e)
        self.l2_cache.mark_dirty(l2off)
        return False

    def _zero_cluster_v2(self, pos: int, n: int, op: Op, dry: bool) -> bool:
        """Version 2 has no zero flag: unmap when that reads as zero, else write zeros."""
        e, _ = self._entry(pos)
        owned = bool(e & COPIED) and bool(e & OFF_MASK)
        keep = owned and self.policy.keep_host(op)
        if op is Op.DISCARD and self.policy.keeps_mapping:
            # no zero flag to mark a kept cluster: it stays mapped and its data is erased
            # (zeros written, space kept: v2 has no way to mark a punched cluster)
            if not dry and owned:
                self._wipe_kept(e & OFF_MASK, self.geo.cluster_size, Op.WRITE_ZEROES)
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
        self._wipe_freed(entry)
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
            self._wipe_freed(e)
            self._release(e)
            table[2 * idx] = 0
            table[2 * idx + 1] = L.L2_BITMAP_ZERO_ALL if (not discard or self.backing) else 0
        else:
            table[2 * idx + 1] = (bm & ~mask) | (mask << 32)
            if has_host and e & COPIED:
                self._wipe_kept((e & OFF_MASK) + (first << scb), (last_excl - first) << scb, op)
        self.l2_cache.mark_dirty(l2off)
        return slow

    # ------------------------------------------------------------------ host space
    # Host ranges to punch (True) or zero (False), queued while a request walks its
    # clusters and done at its end: one system call per contiguous host run (a punch
    # per cluster costs ~2 ms on ext4 once the data was written back).
    _wipes: list[list[int]]

    def _queue_wipe(self, punch: bool, host: int, n: int) -> None:
        w = self._wipes
        if w and w[-1][0] == punch and w[-1][1] + w[-1][2] == host:
            w[-1][2] += n
        else:
            w.append([punch, host, n])

    def _run_wipes(self) -> None:
        wipes, self._wipes = self._wipes, []
        for punch, host, n in wipes:
            if not (punch and self._punch(host, n)):
                self.data_file.zero_range(host, n)

    def _wipe_kept(self, host: int, n: int, op: Op) -> None:
        """The old data of a host range that stays mapped must not stay readable in the
        host file: give its blocks back (``thin``: a later write claims them again) or
        erase it in place, keeping the space (FALLOC_FL_ZERO_RANGE, or zeros written)."""
        self._queue_wipe(self.policy.punch_kept(op), host, n)

    def _wipe_freed(self, entry: int) -> None:
        """A host cluster this image owns alone is being freed (``release``): its blocks
        go back to the file system now.  Nothing else points to it and it cannot be
        handed out again before the L2 update is on disk, so a crash before then shows
        zeros where the discarded data was."""
        h = entry & OFF_MASK
        if not entry & COPIED or entry & L.QCOW_OFLAG_COMPRESSED:
            return
        if self.data_file is self.file:
            if not h or self.refcounts.get(h >> self.geo.cluster_bits) != 1:
                return  # shared after all (a damaged COPIED flag): leave the data alone
        self._queue_wipe(True, h, self.geo.cluster_size)

    def _punch(self, host: int, n: int) -> bool:
        if self.data_file is self.file:
            return self.refcounts.space.punch(host, n)
        return self.data_file.punch_hole(host, n)
