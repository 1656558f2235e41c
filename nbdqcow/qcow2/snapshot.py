"""PURE codec of the internal snapshot table (qcow2.txt "Snapshots": snapshot table entry).

Entries are parsed into frozen :class:`Snapshot` records and encoded back byte for byte
(unknown extra data is kept).  :func:`read_snapshot_table` reads and validates the table
of an open image; nothing here changes an image.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from nbdqcow.errors import ImageOpenError
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.header import Header

# bytes 0..39 of an entry: l1_table_offset, l1_size, id_str_size, name_size, date_sec,
# date_nsec, vm_clock_nsec, vm_state_size, extra_data_size
_ENTRY = struct.Struct(">QIHHIIQII")
ENTRY_FIXED = _ENTRY.size  # 40
# known extra data: vm_state_size_large (8), disk_size (8), icount (8)
EXTRA_V3_MIN = 16  # version 3 images must carry extra data through disk_size
EXTRA_KNOWN = 24
MAX_EXTRA = 1024  # qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_TABLE_BYTES = 64 * 1024 * 1024  # qemu's QCOW_MAX_SNAPSHOTS_SIZE
ICOUNT_NONE = (1 << 64) - 1


@dataclass(frozen=True)
class Snapshot:
    """One snapshot table entry (field names as in the spec)."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    # from the extra data; None when the entry's extra data is too short to hold it
    disk_size: int | None = None
    icount: int | None = None
    # extra data bytes this codec does not interpret (kept on re-encoding)
    extra_unknown: bytes = b""
    # the 32-bit vm_state_size field as stored (kept for byte-exact re-encoding)
    vm_state_size32: int | None = None
    extra_data_size: int | None = None

    @property
    def icount_valid(self) -> bool:
        return self.icount is not None and self.icount != ICOUNT_NONE

    @property
    def vm_clock_sec(self) -> int:
        return self.vm_clock_nsec // 1_000_000_000


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def parse_entry(buf: bytes | memoryview, pos: int = 0) -> tuple[Snapshot, int]:
    """Parse the entry at ``buf[pos:]``; return it and the offset of the next entry."""
    if pos + ENTRY_FIXED > len(buf):
        raise ImageOpenError("snapshot table is truncated")
    (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize32,
     extra_size) = _ENTRY.unpack_from(buf, pos)
    if extra_size > MAX_EXTRA:
        raise ImageOpenError(f"snapshot extra data too large ({extra_size} bytes)")
    estart = pos + ENTRY_FIXED
    sstart = estart + extra_size
    end = sstart + id_len + name_len
    if end > len(buf):
        raise ImageOpenError("snapshot table is truncated")
    extra = bytes(buf[estart:sstart])
    vmsize = vmsize32
    disk_size = icount = None
    if extra_size >= 8:
        vmsize = struct.unpack_from(">Q", extra, 0)[0]
    if extra_size >= 16:
        disk_size = struct.unpack_from(">Q", extra, 8)[0]
    if extra_size >= 24:
        icount = struct.unpack_from(">Q", extra, 16)[0]
    try:
        id_str = bytes(buf[sstart : sstart + id_len]).decode("utf-8")
        name = bytes(buf[sstart + id_len : end]).decode("utf-8")
    except UnicodeDecodeError:
        raise ImageOpenError("snapshot id or name is not valid UTF-8") from None
    snap = Snapshot(
        l1_table_offset=l1_off, l1_size=l1_size, id_str=id_str, name=name,
        date_sec=dsec, date_nsec=dnsec, vm_clock_nsec=clock, vm_state_size=vmsize,
        disk_size=disk_size, icount=icount,
        extra_unknown=extra[min(extra_size, EXTRA_KNOWN) // 8 * 8 :],
        vm_state_size32=vmsize32, extra_data_size=extra_size,
    )
    return snap, _pad8(end)


def parse_table(buf: bytes | memoryview, count: int) -> list[Snapshot]:
    """Parse ``count`` consecutive entries from the start of ``buf``."""
    out: list[Snapshot] = []
    pos = 0
    for _ in range(count):
        snap, pos = parse_entry(buf, pos)
        out.append(snap)
    return out


def encode_entry(s: Snapshot) -> bytes:
    """The bytes of one entry, padded to a multiple of 8."""
    extra_size = s.extra_data_size
    if extra_size is None:
        extra_size = EXTRA_KNOWN + len(s.extra_unknown)
    known = struct.pack(
        ">QQQ", s.vm_state_size, s.disk_size or 0,
        ICOUNT_NONE if s.icount is None else s.icount,
    )
    # the known fields the entry has room for, then the bytes this codec does not know
    n_known = max(0, extra_size - len(s.extra_unknown))
    extra = (known[:n_known].ljust(n_known, b"\0") + s.extra_unknown)[:extra_size]
    vmsize32 = s.vm_state_size32
    if vmsize32 is None:
        vmsize32 = s.vm_state_size if s.vm_state_size < (1 << 32) else 0
    id_b, name_b = s.id_str.encode(), s.name.encode()
    out = _ENTRY.pack(
        s.l1_table_offset, s.l1_size, len(id_b), len(name_b), s.date_sec, s.date_nsec,
        s.vm_clock_nsec, vmsize32, extra_size,
    ) + extra + id_b + name_b
    return out + bytes(_pad8(len(out)) - len(out))


def encode_table(snapshots: Iterable[Snapshot]) -> bytes:
    return b"".join(encode_entry(s) for s in snapshots)


class _Readable(Protocol):
    def pread(self, length: int, offset: int) -> bytes: ...

    def size(self) -> int: ...


def read_snapshot_table(hostfile: _Readable, header: Header) -> list[Snapshot]:
    """Read and validate the snapshot table of an image.

    Raises ImageOpenError for a table outside the file, misaligned or oversized entries,
    duplicate ids, or L1 tables that are not cluster aligned or lie outside the file.
    """
    n = header.nb_snapshots
    if n == 0:
        return []
    if n > L.MAX_SNAPSHOTS:
        raise ImageOpenError(f"too many snapshots ({n})")
    off = header.snapshots_offset
    fsize = hostfile.size()
    if off == 0 or off % header.cluster_size or off >= fsize:
        raise ImageOpenError(f"snapshot table offset {off:#x} is invalid")
    # read in growing pieces so a lying nb_snapshots costs no more than the file holds
    limit = min(fsize - off, MAX_TABLE_BYTES)
    want = min(limit, max(4096, n * 64))
    buf = hostfile.pread(want, off)
    while True:
        try:
            snaps = parse_table(buf, n)
            break
        except ImageOpenError as e:
            if "truncated" not in str(e) or len(buf) >= limit:
                raise ImageOpenError(f"snapshot table: {e}") from None
            want = min(limit, len(buf) * 4)
            buf = hostfile.pread(want, off)
    ids: set[str] = set()
    for s in snaps:
        _check_entry(s, header, fsize)
        if s.id_str in ids:
            raise ImageOpenError(f"duplicate snapshot id '{s.id_str}'")
        ids.add(s.id_str)
    return snaps


def _check_entry(s: Snapshot, header: Header, fsize: int) -> None:
    if s.l1_table_offset % header.cluster_size:
        raise ImageOpenError(f"snapshot '{s.name}': L1 table offset is not cluster aligned")
    if s.l1_size * 8 > L.MAX_L1_BYTES:
        raise ImageOpenError(f"snapshot '{s.name}': L1 table too large ({s.l1_size} entries)")
    if s.l1_size and s.l1_table_offset + s.l1_size * 8 > fsize:
        raise ImageOpenError(f"snapshot '{s.name}': L1 table lies outside the file")
