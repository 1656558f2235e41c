"""The read path of the qcow2 engine: guest ranges to host data, zeros, the backing
chain or decompressed clusters; the hot-path lookup for one contiguous host run."""

from __future__ import annotations

from nbdqcow.block.ranges import check_range
from nbdqcow.block.zeros import fill_zero
from nbdqcow.errors import WouldBlock
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.compressed import decompress_cluster
from nbdqcow.qcow2.core import COPIED, OFF_MASK, ZERO_FLAG, Qcow2Core
from nbdqcow.qcow2.entries import READS_BACKING, READS_ZERO, SC, sc_range_mask
from nbdqcow.qcow2.mapping import Run


class Qcow2Reader(Qcow2Core):
    """Reads (see core.py for the layering)."""

    # ------------------------------------------------------------------ reading
    def _locate(self, offset: int, length: int, nowait: bool = False
                ) -> tuple[int | None, list[Run]]:
        """(host, []) when [offset, offset+length) reads from one contiguous run of host
        data, else (None, its runs).  ``nowait``: raise WouldBlock rather than read an
        L2 table from the file (the caller is an event loop).  Call with the lock held."""
        host = self._fast_host(offset, length)
        if host is not None:
            return host, []
        if nowait and not self._tables_in_memory(offset, length):
            raise WouldBlock("qcow2 L2 table not in memory")
        runs = list(self.runs(offset, length))
        if len(runs) == 1 and runs[0][2] is SC.NORMAL:
            return runs[0][3], []
        return None, runs

    def _tables_in_memory(self, offset: int, length: int) -> bool:
        """True when every L2 table mapping [offset, offset+length) is in memory (or
        not allocated): mapping the range reads nothing from the file."""
        l1, in_memory = self.l1, self.l2_cache.in_memory
        last = min((offset + length - 1) >> self._l1_shift, len(l1) - 1)
        for i in range(offset >> self._l1_shift, last + 1):
            table = l1[i] & L.L1E_OFFSET_MASK
            if table and not in_memory(table):
                return False
        return True

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
            host, runs = self._locate(offset, length, nowait)
            if host is None:
                self._read_into(buf, offset, runs, nowait=nowait)
                return
            self._check_in_file(host, length)
        self.data_file.preadinto(buf, host, nowait)  # outside the lock: see pread

    def host_extent(self, offset: int, length: int) -> tuple[int, int] | None:
        # Only under ``preserve`` and ``thin``: a host cluster keeps its guest cluster for
        # good, so bytes a reply is still sending from the page cache can change only by a
        # write to the same guest range (which overlapped the READ: NBD leaves that
        # undefined).  Under ``release`` a discarded cluster may come back holding
        # another guest range's data.
        if not self.policy.keeps_mapping or offset < 0 or length <= 0 or self.data_file.direct:
            return None
        if offset + length > self._size:
            return None
        with self._lock:
            try:  # asked on the event loop: never read metadata here
                host, _ = self._locate(offset, length, True)
            except WouldBlock:
                return None
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

