"""Persistent dirty bitmaps kept current by a writable open (qcow2.txt "Bitmaps
extension", "Bitmap directory", "Bitmap table", "Bitmap data", "Dirty tracking bitmaps").

A writable open loads every consistent bitmap into memory and marks it in use in the
directory (the directory is rewritten in place while the header's autoclear bit 0 is
clear, so a crash in the middle leaves the bitmaps dropped, never half-written).  Writes,
write-zeroes and discards set the bits of every enabled bitmap.  At close each changed
bitmap is stored into fresh clusters, a new directory is written, the header points to
it with the in-use flags cleared, and only then are the old clusters freed.  A crash
while open leaves the bitmaps in use, i.e. inconsistent: what qemu leaves too.  Bitmaps
found in use are kept as they are (never used, never rewritten) until removed.

Every cluster is allocated and freed through the engine's refcounts.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nbdqcow.block.driver import DirtyRun
from nbdqcow.block.hostfile import HostFile
from nbdqcow.errors import ImageError, ImageOpenError
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.bitmaps import (
    BITMAP_ENTRY,
    BITMAP_EXT,
    BME_FLAG_AUTO,
    BME_FLAG_IN_USE,
    BME_TABLE_OFFSET_MASK,
    BME_TYPE_DIRTY_TRACKING,
    MAX_BITMAP_DIRECTORY,
    MAX_BITMAPS,
    MAX_NAME_SIZE,
    BitmapEntry,
    DirtyBitmap,
    bitmaps_consistent,
    read_directory,
    runs_of,
    validate_entry,
)
from nbdqcow.qcow2.header import Extension, Header

if TYPE_CHECKING:
    from nbdqcow.qcow2.core import Qcow2Core

#: qemu's limit on the bitmap data of one bitmap (bytes on disk)
MAX_BITMAP_BYTES = 1 << 29


class BitmapOpError(ImageError):
    """A bitmap operation was refused (qemu's words)."""


def _inconsistent(name: str) -> BitmapOpError:
    return BitmapOpError(f"Bitmap '{name}' is inconsistent and cannot be used")


class LiveBitmap:
    """One bitmap of a writable open: its bits in memory (``data``), or, when it was
    found in use (``inconsistent``), only its stored directory entry."""

    def __init__(self, name: str, granularity_bits: int, enabled: bool, disk_size: int,
                 data: bytearray | None, stored: BitmapEntry | None) -> None:
        self.name = name
        self.granularity_bits = granularity_bits
        self.granularity = 1 << granularity_bits
        self.enabled = enabled
        self.disk_size = disk_size
        self.nb_bits = -(-disk_size // self.granularity)
        self.data = data
        self.stored = stored  # the directory entry on disk (None: not stored yet)
        self.changed = stored is None  # bits differ from the stored table

    @property
    def inconsistent(self) -> bool:
        return self.data is None

    # --- bits ------------------------------------------------------------------------
    def mark(self, offset: int, length: int) -> None:
        """Set the bits of every granule [offset, offset+length) touches."""
        if length <= 0 or self.data is None or offset >= self.disk_size:
            return
        g = self.granularity_bits
        _set_bits(self.data, offset >> g, min((offset + length - 1) >> g, self.nb_bits - 1) + 1)
        self.changed = True

    def clear(self) -> None:
        if self.data is None:
            raise _inconsistent(self.name)
        self.data[:] = bytes(len(self.data))
        self.changed = True

    def merge(self, runs: list[DirtyRun]) -> None:
        for r in runs:
            if r.dirty:
                self.mark(r.start, r.length)

    def read_data(self, pos: int, n: int) -> bytes:
        assert self.data is not None
        return bytes(self.data[pos : pos + n])

    def dirty_runs(self, offset: int, length: int, max_runs: int) -> list[DirtyRun]:
        """qemu:dirty-bitmap:NAME from the live bits (DirtyBitmapSource)."""
        return runs_of(self.read_data, self.granularity, self.disk_size, offset, length,
                       max_runs)

    def all_runs(self) -> list[DirtyRun]:
        out: list[DirtyRun] = []
        pos = 0
        while pos < self.disk_size:
            got = self.dirty_runs(pos, self.disk_size - pos, 1 << 16)
            out.extend(got)
            pos = got[-1].start + got[-1].length
        return out


def _set_bits(buf: bytearray, first: int, stop: int) -> None:
    """Set bits [first, stop) (bit n: bit n % 8 of byte n // 8)."""
    if first >= stop:
        return
    fb, lb = first >> 3, (stop - 1) >> 3
    head = (0xFF << (first & 7)) & 0xFF
    tail = 0xFF >> (7 - ((stop - 1) & 7))
    if fb == lb:
        buf[fb] |= head & tail
        return
    buf[fb] |= head
    if lb > fb + 1:
        buf[fb + 1 : lb] = b"\xff" * (lb - fb - 1)
    buf[lb] |= tail


@dataclass
class _Dir:
    offset: int
    size: int


class LiveBitmaps:
    """The persistent bitmaps of a writable open (see the module docstring)."""

    def __init__(self, image: Qcow2Core) -> None:
        self.image = image
        self.bitmaps: list[LiveBitmap] = []
        self.enabled: tuple[LiveBitmap, ...] = ()
        self._dir: _Dir | None = None  # the consistent directory on disk, if any
        self._freed: list[int] = []  # clusters of removed bitmaps, freed at store
        self._touched = False  # the set changed (add / remove / flags)

    # --- open ------------------------------------------------------------------------
    @classmethod
    def load(cls, image: Qcow2Core) -> LiveBitmaps:
        self = cls(image)
        h = image.header
        ext = h.extension(L.EXT_BITMAPS)
        if ext is None or not bitmaps_consistent(h) or h.version < 3:
            return self  # none, or stale (a program lacking bitmap support wrote)
        _, _, dsize, doff = BITMAP_EXT.unpack_from(ext)
        f = image.file
        file_size = f.size()
        for e in read_directory(f, h):
            validate_entry(e, h, file_size, allow_in_use=True)
            if e.extra_data_size:
                raise ImageOpenError(f"Bitmap '{e.name}' has extra data this program "
                                     "cannot keep; it can only be opened read-only")
            reader = DirtyBitmap(f, e, h.cluster_size, h.size)
            reader.check()
            data = None
            if not e.in_use:
                data = bytearray(reader.read_data(0, (reader.nb_bits + 7) >> 3))
            self.bitmaps.append(LiveBitmap(e.name, e.granularity_bits, e.auto, h.size, data, e))
        self._dir = _Dir(doff, dsize) if self.bitmaps else None
        self._refresh()
        if any(not b.inconsistent for b in self.bitmaps):
            self._mark_in_use(doff)
        return self

    def _mark_in_use(self, doff: int) -> None:
        """Set the in-use flag of every loaded bitmap, in place, as the spec's autoclear
        rule allows: clear bit 0, rewrite the directory, set bit 0 again."""
        image = self.image
        h = image.header
        image.update_header(h.replace(autoclear_features=h.autoclear_features & ~L.AUTOCLEAR_BITMAPS))
        entries = []
        for b in self.bitmaps:
            assert b.stored is not None
            entries.append((b, b.stored.bitmap_table_offset, b.stored.bitmap_table_size,
                            b.stored.flags | BME_FLAG_IN_USE))
        image.file.pwrite(_encode_directory(entries), doff)
        image.file.sync()
        image.update_header(h)

    def _refresh(self) -> None:
        self.enabled = tuple(b for b in self.bitmaps if b.enabled and not b.inconsistent)

    # --- tracking --------------------------------------------------------------------
    def mark(self, offset: int, length: int) -> None:
        for b in self.enabled:
            b.mark(offset, length)

    def find(self, name: str) -> LiveBitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)

    def get(self, name: str) -> LiveBitmap:
        b = self.find(name)
        if b is None:
            raise BitmapOpError(f"Dirty bitmap '{name}' not found")
        return b

    # --- qemu-img bitmap's operations -------------------------------------------------
    def add(self, name: str, granularity: int, enabled: bool = True) -> None:
        h = self.image.header
        if self.find(name) is not None:
            raise BitmapOpError(f"Bitmap already exists: {name}")
        if not name:
            raise BitmapOpError("Bitmap name cannot be empty")
        if granularity < 512 or granularity & (granularity - 1) or granularity > 1 << 31:
            raise BitmapOpError("Granularity must be power of 2 and at least 512")
        why = ""
        if h.version < 3:
            why = "Cannot store dirty bitmaps in qcow2 v2 files"
        elif len(name.encode()) > MAX_NAME_SIZE:
            why = f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        elif len(self.bitmaps) >= MAX_BITMAPS:
            why = "Maximum number of persistent bitmaps is already reached"
        elif -(-h.size // granularity) > 8 * MAX_BITMAP_BYTES:
            why = "Too much space will be occupied by the bitmap. Use larger granularity"
        elif len(_encode_directory([(b, 0, 0, 0) for b in self.bitmaps])) + \
                _entry_size(name) > MAX_BITMAP_DIRECTORY:
            why = "Maximum bitmap directory size is exceeded"
        if why:
            raise BitmapOpError(f"Can't make bitmap '{name}' persistent in "
                                f"'{self.image.path}': {why}")
        nbytes = (-(-h.size // granularity) + 7) >> 3
        self.bitmaps.append(LiveBitmap(name, granularity.bit_length() - 1, enabled, h.size,
                                       bytearray(nbytes), None))
        self._touched = True
        self._refresh()

    def remove(self, name: str) -> None:
        b = self.get(name)
        if b.stored is not None:
            self._freed.extend(self._clusters_of(b.stored))
        self.bitmaps.remove(b)
        self._touched = True
        self._refresh()

    def set_enabled(self, name: str, enabled: bool) -> None:
        b = self.get(name)
        if b.inconsistent:
            raise _inconsistent(name)
        if b.enabled != enabled:
            b.enabled = enabled
            self._touched = True
        self._refresh()

    # --- close -----------------------------------------------------------------------
    def _clusters_of(self, e: BitmapEntry) -> list[int]:
        """The host clusters of a stored bitmap: its table and its data clusters."""
        image = self.image
        cb = image.geo.cluster_bits
        out = []
        if e.bitmap_table_size:
            raw = image.file.pread(8 * e.bitmap_table_size, e.bitmap_table_offset)
            for t in struct.unpack(f">{e.bitmap_table_size}Q", raw):
                if t & BME_TABLE_OFFSET_MASK:
                    out.append((t & BME_TABLE_OFFSET_MASK) >> cb)
            first = e.bitmap_table_offset >> cb
            out.extend(range(first, first + image.geo.size_to_clusters(8 * e.bitmap_table_size)))
        return out

    def _store_bitmap(self, b: LiveBitmap) -> tuple[int, int]:
        """Write ``b``'s data and table into new clusters: (table offset, entries)."""
        assert b.data is not None
        image = self.image
        rc = image.refcounts
        cs = image.geo.cluster_size
        cb = image.geo.cluster_bits
        n = -(-len(b.data) // cs)
        table = array("Q", bytes(8 * n))
        for i in range(n):
            chunk = b.data[i * cs : (i + 1) * cs]
            if not chunk.strip(b"\0"):
                continue  # an all-zero cluster is not stored (entry 0)
            off = rc.alloc(1) << cb
            image.file.pwrite(bytes(chunk) + bytes(cs - len(chunk)), off)
            table[i] = off
        if not n:
            return 0, 0
        toff = rc.alloc(image.geo.size_to_clusters(8 * n)) << cb
        table.byteswap()
        image.file.pwrite(table.tobytes(), toff)
        return toff, n

    def store(self) -> None:
        """Write every bitmap back consistent (see the module docstring)."""
        if self._dir is None and not self._touched and not self.bitmaps:
            return
        image = self.image
        rc = image.refcounts
        frees = list(self._freed)
        entries: list[tuple[LiveBitmap, int, int, int]] = []
        for b in self.bitmaps:
            if b.inconsistent:
                assert b.stored is not None
                s = b.stored
                entries.append((b, s.bitmap_table_offset, s.bitmap_table_size, s.flags))
                continue
            if b.changed or b.stored is None:
                toff, tsize = self._store_bitmap(b)
                if b.stored is not None:
                    frees.extend(self._clusters_of(b.stored))
            else:
                assert b.stored is not None
                toff, tsize = b.stored.bitmap_table_offset, b.stored.bitmap_table_size
            entries.append((b, toff, tsize, BME_FLAG_AUTO if b.enabled else 0))
        h = image.header
        new_dir = None
        ext: Extension | None = None
        if entries:
            data = _encode_directory(entries)
            cs = image.geo.cluster_size
            doff = rc.alloc(image.geo.size_to_clusters(len(data))) << image.geo.cluster_bits
            image.file.pwrite(data + bytes(-len(data) % cs), doff)
            new_dir = _Dir(doff, len(data))
            ext = Extension(L.EXT_BITMAPS, BITMAP_EXT.pack(len(entries), 0, len(data), doff))
            autoclear = h.autoclear_features | L.AUTOCLEAR_BITMAPS
        else:
            autoclear = h.autoclear_features & ~L.AUTOCLEAR_BITMAPS
        rc.flush()
        image.file.sync()
        image.update_header(h.replace(extensions=_with_extension(h, ext),
                                      autoclear_features=autoclear))
        if self._dir is not None:
            first = self._dir.offset >> image.geo.cluster_bits
            frees.extend(range(first, first + image.geo.size_to_clusters(self._dir.size)))
        for c in frees:
            rc.update(c, -1)
        rc.flush()
        image.file.sync()
        # the stored state is the new baseline
        self._dir, self._freed, self._touched = new_dir, [], False
        for b, toff, tsize, flags in entries:
            b.stored = BitmapEntry(b.name, toff, tsize, flags, BME_TYPE_DIRTY_TRACKING,
                                   b.granularity_bits, 0)
            b.changed = False


def read_stored_bitmaps(f: HostFile, header: Header,
                        skip: Callable[[str], None] | None = None,
                        ) -> list[tuple[BitmapEntry, bytes]]:
    """Every consistent bitmap of a (read-only) image with its data, validated; an
    in-use (inconsistent) bitmap is refused, as qemu-img convert --bitmaps refuses it,
    or left out after calling ``skip(name)``."""
    out = []
    for e in read_directory(f, header):
        if e.in_use:
            if skip is not None:
                skip(e.name)
                continue
            raise BitmapOpError(f"Bitmap '{e.name}' is inconsistent and cannot be used "
                                "(remove it first)")
        validate_entry(e, header, f.size())
        reader = DirtyBitmap(f, e, header.cluster_size, header.size)
        reader.check()
        out.append((e, reader.read_data(0, (reader.nb_bits + 7) >> 3)))
    return out


def add_stored_bitmaps(live: LiveBitmaps, bitmaps: list[tuple[BitmapEntry, bytes]]) -> None:
    """Add bitmaps read by :func:`read_stored_bitmaps` (same names, granularities,
    enabled state and bits) to a writable open; stored at its close."""
    for e, data in bitmaps:
        live.add(e.name, e.granularity, enabled=e.auto)
        b = live.get(e.name)
        assert b.data is not None and len(b.data) == len(data)
        b.data[:] = data


def _with_extension(h: Header, ext: Extension | None) -> tuple[Extension, ...]:
    """The header's extensions with the bitmaps extension replaced in its place, added
    at the end, or dropped (``ext`` None)."""
    out = [ext if e.type == L.EXT_BITMAPS else e for e in h.extensions]
    if ext is not None and all(e.type != L.EXT_BITMAPS for e in h.extensions):
        out.append(ext)
    return tuple(e for e in out if e is not None)


def _entry_size(name: str) -> int:
    return (BITMAP_ENTRY.size + len(name.encode()) + 7) & ~7


def _encode_directory(entries: list[tuple[LiveBitmap, int, int, int]]) -> bytes:
    out = bytearray()
    for b, toff, tsize, flags in entries:
        name = b.name.encode()
        out += BITMAP_ENTRY.pack(toff, tsize, flags, BME_TYPE_DIRTY_TRACKING,
                                 b.granularity_bits, len(name), 0)
        out += name
        out += bytes(-len(out) % 8)
    return bytes(out)
