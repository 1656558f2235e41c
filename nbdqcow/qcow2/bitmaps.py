"""Persistent dirty bitmaps, read-only (qcow2.txt: "Bitmaps extension", "Bitmaps":
"Bitmap directory", "Bitmap table", "Bitmap data", "Dirty tracking bitmaps").

The directory is parsed once (small, bounded).  A bitmap's table and data are read
lazily: a question "which runs of [offset, offset+length) are dirty" reads only the
bitmap bytes that cover the range (the page cache does the caching), so memory stays
bounded by the size of one answer.  Bit ``n`` of the bitmap (guest bytes
``[n * granularity, (n + 1) * granularity)``) is bit ``n % 8`` (least significant
first) of byte ``n // 8`` of the bitmap data.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from nbdqcow.block.driver import DirtyBitmapSource, DirtyRun
from nbdqcow.block.hostfile import HostFile
from nbdqcow.errors import CorruptImage, ImageOpenError
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.header import Header

BITMAP_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, directory offset
#: bitmap_table_offset, bitmap_table_size, flags, type, granularity_bits, name_size,
#: extra_data_size
BITMAP_ENTRY = struct.Struct(">QIIBBHI")
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_FLAGS_KNOWN = BME_FLAG_IN_USE | BME_FLAG_AUTO | BME_FLAG_EXTRA_DATA_COMPATIBLE
BME_TYPE_DIRTY_TRACKING = 1
BME_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ALL_ONES = 1 << 0  # with offset 0: the cluster reads as all ones
BME_TABLE_RESERVED_MASK = 0xFF000000000001FE
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 64 * 1024 * 1024
MAX_NAME_SIZE = 1023
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31  # what qemu supports
#: bitmap bytes read for one answer at most (8M granules); a longer range is answered
#: for a prefix, as the NBD spec allows
MAX_BYTES_PER_QUERY = 1 << 20
#: table entries checked per read at open
_TABLE_CHUNK = 8192

_NOT_CLEAN = re.compile(rb"[^\x00]")
_NOT_DIRTY = re.compile(rb"[^\xff]")


@dataclass(frozen=True)
class BitmapEntry:
    """One bitmap directory entry (the names are the spec's)."""

    name: str
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra_data_size: int

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BME_FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        """The bitmap is enabled: it must track every write."""
        return bool(self.flags & BME_FLAG_AUTO)


def bitmaps_consistent(header: Header) -> bool:
    """The bitmaps extension may be trusted (autoclear bit 0 set)."""
    return bool(header.autoclear_features & L.AUTOCLEAR_BITMAPS)


def read_directory(f: HostFile, header: Header) -> list[BitmapEntry]:
    """The bitmap directory; [] when there is none or the autoclear bit says it is stale."""
    ext = header.extension(L.EXT_BITMAPS)
    if ext is None or not bitmaps_consistent(header):
        return []
    if len(ext) < BITMAP_EXT.size:
        raise ImageOpenError("bitmaps header extension is truncated")
    count, _, dsize, doff = BITMAP_EXT.unpack_from(ext)
    if count == 0:
        return []
    if count > MAX_BITMAPS or dsize > MAX_BITMAP_DIRECTORY:
        raise ImageOpenError("bitmap directory is too large")
    if doff % header.cluster_size or doff + dsize > f.size():
        raise ImageOpenError("bitmap directory lies outside the image")
    buf = f.pread(dsize, doff)
    out: list[BitmapEntry] = []
    pos = 0
    for _ in range(count):
        if pos + BITMAP_ENTRY.size > len(buf):
            raise ImageOpenError("bitmap directory is truncated")
        toff, tsize, flags, btype, gbits, nlen, elen = BITMAP_ENTRY.unpack_from(buf, pos)
        nstart = pos + BITMAP_ENTRY.size + elen
        if nstart + nlen > len(buf):
            raise ImageOpenError("bitmap directory is truncated")
        name = buf[nstart : nstart + nlen].decode("utf-8", "replace")
        out.append(BitmapEntry(name, toff, tsize, flags, btype, gbits, elen))
        pos = (nstart + nlen + 7) & ~7
    return out


class DirtyBitmap:
    """One persistent dirty bitmap, opened read-only: answers dirty runs of a range.

    Thread-safe (it keeps no mutable state; reads go through ``os.pread``).
    """

    def __init__(self, f: HostFile, entry: BitmapEntry, cluster_size: int, disk_size: int) -> None:
        self.file = f
        self.entry = entry
        self.name = entry.name
        self.granularity = entry.granularity
        self.cluster_size = cluster_size
        self.disk_size = disk_size
        self.nb_bits = -(-disk_size // self.granularity)

    # --- reading ----------------------------------------------------------------------
    def _table_entry(self, index: int) -> int:
        raw = self.file.pread(8, self.entry.bitmap_table_offset + 8 * index)
        if len(raw) < 8:
            raise CorruptImage(f"bitmap '{self.name}': bitmap table is truncated")
        e = int.from_bytes(raw, "big")
        self._check_table_entry(index, e, self.file.size())
        return e

    def _check_table_entry(self, index: int, e: int, file_size: int) -> None:
        off = e & BME_TABLE_OFFSET_MASK
        bad = ""
        if e & BME_TABLE_RESERVED_MASK or (off and e & BME_TABLE_ALL_ONES):
            bad = "reserved bits are set"
        elif off % self.cluster_size:
            bad = "data cluster is not aligned"
        elif off and off + self.cluster_size > file_size:
            bad = "data cluster lies past the end of the image"
        if bad:
            raise CorruptImage(
                f"bitmap '{self.name}': bitmap table entry {index} ({e:#x}) is invalid: {bad}")

    def read_data(self, pos: int, n: int) -> bytes:
        """``n`` bytes of bitmap data from byte ``pos`` (qcow2.txt "Bitmap data")."""
        cs = self.cluster_size
        parts: list[bytes] = []
        end = pos + n
        while pos < end:
            index, into = divmod(pos, cs)
            k = min(cs - into, end - pos)
            e = self._table_entry(index)
            off = e & BME_TABLE_OFFSET_MASK
            if off:
                data = self.file.pread(k, off + into)
                if len(data) < k:
                    raise CorruptImage(f"bitmap '{self.name}': data cluster is truncated")
                parts.append(data)
            else:
                parts.append((b"\xff" if e & BME_TABLE_ALL_ONES else b"\x00") * k)
            pos += k
        return b"".join(parts)

    def dirty_runs(self, offset: int, length: int, max_runs: int) -> list[DirtyRun]:
        """Maximal dirty / clean runs covering [offset, offset+length), at most
        ``max_runs`` of them (then they cover a prefix of the range, as they do when the
        range needs more than MAX_BYTES_PER_QUERY bytes of bitmap)."""
        return runs_of(self.read_data, self.granularity, self.disk_size, offset, length,
                       max_runs)

    def check(self) -> None:
        """Every table entry is valid (read in bounded chunks): a hostile table is an
        error at open, not in the middle of serving."""
        file_size = self.file.size()
        toff, tsize = self.entry.bitmap_table_offset, self.entry.bitmap_table_size
        for i in range(0, tsize, _TABLE_CHUNK):
            k = min(_TABLE_CHUNK, tsize - i)
            raw = self.file.pread(8 * k, toff + 8 * i)
            if len(raw) < 8 * k:
                raise ImageOpenError(f"bitmap '{self.name}': bitmap table is truncated")
            for j, e in enumerate(struct.unpack(f">{k}Q", raw)):
                self._check_table_entry(i + j, e, file_size)


def runs_of(read_data: Callable[[int, int], bytes], gran: int, disk_size: int, offset: int,
            length: int, max_runs: int) -> list[DirtyRun]:
    """Dirty / clean runs of [offset, offset+length) of a bitmap of granularity ``gran``
    over a disk of ``disk_size`` bytes whose data ``read_data(pos, n)`` returns."""
    end = offset + length
    if offset >= disk_size:  # only past a bitmap of a shorter backing image
        return [DirtyRun(offset, length, False)]
    nb_bits = -(-disk_size // gran)
    out: list[DirtyRun] = []
    first = offset // gran
    last = min((end - 1) // gran + 1, nb_bits, first + 8 * MAX_BYTES_PER_QUERY)
    base = first & ~7
    buf = read_data(base >> 3, ((last + 7) >> 3) - (base >> 3))
    bit, stop = first - base, last - base
    while bit < stop and len(out) < max_runs:
        dirty = bool(buf[bit >> 3] >> (bit & 7) & 1)
        nxt = _next_change(buf, bit, dirty, stop)
        s = max(offset, (base + bit) * gran)
        t = min(end, (base + nxt) * gran, disk_size)
        out.append(DirtyRun(s, t - s, dirty))
        bit = nxt
    tail = out[-1].start + out[-1].length
    if bit >= stop and last == nb_bits and tail < end and len(out) < max_runs:
        out.append(DirtyRun(tail, end - tail, False))  # past a shorter backing image
    return out


def _next_change(buf: bytes, bit: int, dirty: bool, stop: int) -> int:
    """The first bit at or after ``bit`` whose value is not ``dirty`` (``stop`` if none
    before it); whole bytes are skipped by a C-speed regular expression search."""
    flip = 0xFF if dirty else 0
    b = (buf[bit >> 3] ^ flip) >> (bit & 7)
    if b:
        return min(bit + ((b & -b).bit_length() - 1), stop)
    start = (bit >> 3) + 1
    m = (_NOT_DIRTY if dirty else _NOT_CLEAN).search(buf, start, (stop + 7) >> 3)
    if m is None:
        return stop
    i = m.start()
    b = buf[i] ^ flip
    return min(8 * i + (b & -b).bit_length() - 1, stop)


def open_dirty_bitmap(f: HostFile, header: Header, name: str) -> DirtyBitmap:
    """The bitmap called ``name``, validated for reading, or a one-line error in the
    words qemu-nbd uses ("not found", "inconsistent")."""
    if header.extension(L.EXT_BITMAPS) is not None and not bitmaps_consistent(header):
        raise ImageOpenError(
            f"Bitmap '{name}' is not found: the image's bitmaps are inconsistent (a program "
            "lacking bitmap support modified it)")
    entry = next((e for e in read_directory(f, header) if e.name == name), None)
    if entry is None:
        raise ImageOpenError(f"Bitmap '{name}' is not found")
    validate_entry(entry, header, f.size())
    bm = DirtyBitmap(f, entry, header.cluster_size, header.size)
    bm.check()
    return bm


def validate_entry(e: BitmapEntry, header: Header, file_size: int,
                   allow_in_use: bool = False) -> None:
    """The spec's rules for one directory entry, as far as reading it needs them."""
    what = f"Bitmap '{e.name}'"
    if e.in_use and not allow_in_use:
        raise ImageOpenError(f"{what} is inconsistent and cannot be used")
    if e.flags & ~BME_FLAGS_KNOWN:
        raise ImageOpenError(f"{what} has unknown flags {e.flags:#x}")
    if e.type != BME_TYPE_DIRTY_TRACKING:
        raise ImageOpenError(f"{what} has unsupported type {e.type}")
    if e.extra_data_size and not e.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE:
        raise ImageOpenError(f"{what} has extra data this program does not know")
    if not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS:
        raise ImageOpenError(f"{what} has an unsupported granularity (2^{e.granularity_bits})")
    cs = header.cluster_size
    nb_bits = -(-header.size // e.granularity)
    expected = -(-nb_bits // (8 * cs))
    if e.bitmap_table_size != expected:
        raise ImageOpenError(f"{what}: bitmap table has {e.bitmap_table_size} entries, "
                             f"the disk size needs {expected}")
    off, n = e.bitmap_table_offset, 8 * e.bitmap_table_size
    if off % cs or (n and off == 0) or off + n > file_size:
        raise ImageOpenError(f"{what}: bitmap table at {off:#x} lies outside the image "
                             "or is not aligned")


def find_dirty_bitmap(driver: object, name: str) -> DirtyBitmapSource:
    """The bitmap ``name`` of an open image, searched from the top of its backing chain
    down as qemu-nbd does (through a filter such as ``compress`` to the image below it);
    the image must stay open while the bitmap is used."""
    from nbdqcow.block.compress import CompressFilter
    from nbdqcow.qcow2.driver import Qcow2Driver

    layer = driver
    while isinstance(layer, CompressFilter):
        layer = layer.inner
    while isinstance(layer, Qcow2Driver):
        live = layer.live_bitmaps
        if live is not None:  # a writable open: the bitmaps it keeps current
            found = live.find(name)
            if found is not None:
                if found.inconsistent:
                    raise ImageOpenError(f"Bitmap '{name}' is inconsistent and cannot be used")
                return found
            layer = layer.backing
            continue
        h = layer.header
        stale = h.extension(L.EXT_BITMAPS) is not None and not bitmaps_consistent(h)
        if stale or any(e.name == name for e in read_directory(layer.file, h)):
            return open_dirty_bitmap(layer.file, h, name)
        layer = layer.backing
    raise ImageOpenError(f"Bitmap '{name}' is not found")
