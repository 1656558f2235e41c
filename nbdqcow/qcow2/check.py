"""Consistency check and repair of a qcow2 image (qcow2.txt "Host cluster management",
"Cluster mapping", "Snapshots", "Bitmaps"), with the figures and the verdicts of
``qemu-img check``.

The check walks every reference an image holds -- the header cluster, the active and the
snapshots' L1 tables, their L2 tables and data clusters (each host cluster a compressed
cluster touches), the snapshot table, the bitmap directory with its bitmap tables and
data clusters, the LUKS header area, the refcount table and its blocks -- and counts
them in memory.  Then it
compares those counts with the refcounts stored in the image:

* stored > counted: a leak (wasted space, no harm);
* stored < counted: a corruption (the cluster could be handed out twice);
* a COPIED flag that disagrees with "stored refcount == 1" (active L1 and its L2
  entries): a corruption.

Repair: ``"leaks"`` lowers leaked refcounts to the counted value (and fixes COPIED flags
when nothing else is wrong); ``"all"`` also raises too-low refcounts and fixes COPIED
flags and unaligned preallocated zero clusters.  When the refcount structure itself is broken
(a referenced cluster with no refcount at all, a misplaced refcount block) ``"all"``
writes a complete new refcount table and blocks after the end of the used area, holding
exactly the counted values, then points the header at them.  After a repair the image is
checked again and that second verdict is the one reported (as qemu-img does).
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbdqcow.block.hostfile import HostFile
from nbdqcow.errors import ImageOpenError, NbdqcowError
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.entries import SC, std_type
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.header import Header, encode_header, parse_header
from nbdqcow.qcow2.tables import load_refblock, load_u64, new_refblock, store_refblock, store_u64

if TYPE_CHECKING:
    from nbdqcow.qcow2.driver import Qcow2Driver

FIX_LEAKS = 1
FIX_ERRORS = 2
_REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

_BITMAP_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, offset
_BITMAP_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, ...
_BITMAP_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
# snapshot table entry, fixed part: l1_table_offset, l1_size, id_str_size, name_size,
# date_sec, date_nsec, vm_clock_nsec, vm_state_size, extra_data_size
_SNAP_ENTRY = struct.Struct(">QIHHIIQII")
_MAX_SNAPSHOT_EXTRA = 1024


class CheckFailed(NbdqcowError):
    """The check could not complete (qemu-img: "Check failed: ...")."""


@dataclass
class CheckResult:
    """What ``qemu-img check`` reports (its ImageCheck record)."""

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    # the lines qemu-img prints on stderr while checking ("ERROR cluster 5 ...")
    messages: list[str] = field(default_factory=list)
    # set when the check could not complete (qemu-img: "Check failed: <why>")
    failure: str | None = None

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit status: 0 clean, 1 check failed, 2 corruptions, 3 leaks."""
        if self.check_errors or self.failure:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_dict(self) -> dict[str, Any]:
        """The ImageCheck fields as qemu-img's JSON has them (absent when zero)."""
        out: dict[str, Any] = {
            "filename": self.filename, "format": self.format, "check-errors": self.check_errors,
        }
        optional = (
            ("image-end-offset", self.image_end_offset), ("corruptions", self.corruptions),
            ("leaks", self.leaks), ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed), ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        )
        for key, value in optional:
            if value:
                out[key] = value
        return out


MAX_TABLE_READ = 64 * 1024 * 1024
MAX_CLUSTERS = 1 << 31  # qemu-img check gives up beyond INT_MAX clusters as well
_COUNT_CODES = {8: "B", 16: "H", 32: "L" if array("I").itemsize != 4 else "I", 64: "Q"}


def read_at(file: HostFile, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; what lies past the end of the file reads as zeros
    (nothing is read at absurd offsets, and reads are capped at 64 MiB)."""
    length = max(0, min(length, MAX_TABLE_READ))
    size = file.size()
    if offset >= size or length == 0:
        return bytes(length)
    return file.pread(length, offset)


def _count_array(refcount_bits: int, n: int) -> array[int]:
    code = _COUNT_CODES[max(8, refcount_bits)]
    return array(code, bytes(array(code).itemsize * n))


# --------------------------------------------------------------------------------------
# counting every reference
# --------------------------------------------------------------------------------------
class _Walk:
    """One pass over an image: counted refcounts, figures and error messages."""

    def __init__(self, file: HostFile, header: Header, res: CheckResult, fix: int = 0) -> None:
        self.file = file
        self.fix = fix
        self.h = header
        self.geo = Geometry(header.cluster_bits, header.refcount_order, header.extended_l2)
        self.cs = self.geo.cluster_size
        self.res = res
        self.file_size = file.size()
        nb = self.geo.size_to_clusters(self.file_size)
        if nb > MAX_CLUSTERS:
            raise CheckFailed("File too large")
        self.ref = _count_array(self.geo.refcount_bits, nb)
        self.rebuild = False
        self.outside: list[int] = []  # refcount blocks past the end of the file
        self.refblock_errors = 0

    def msg(self, text: str) -> None:
        self.res.messages.append(text)

    # --- the in-memory refcount table ------------------------------------------------
    def inc(self, offset: int, size: int) -> None:
        if size <= 0:
            return
        if offset + size - self.file_size >= self.cs:
            self.msg("ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset {offset:#x} size {size:#x}")
            self.res.corruptions += 1
            return
        first = offset >> self.geo.cluster_bits
        last = (offset + size - 1) >> self.geo.cluster_bits
        if last >= len(self.ref):
            self.ref.extend(_count_array(self.geo.refcount_bits, last + 1 - len(self.ref)))
        top = self.geo.refcount_max
        for c in range(first, last + 1):
            if self.ref[c] >= top:
                self.msg(f"ERROR: overflow cluster offset={c << self.geo.cluster_bits:#x}")
                self.res.corruptions += 1
                continue
            self.ref[c] += 1

    # --- L1 / L2 ---------------------------------------------------------------------
    def l1(self, offset: int, l1_size: int, active: bool) -> None:
        self.inc(offset, l1_size * 8)
        table = load_u64(read_at(self.file, l1_size * 8, offset)) if l1_size else array("Q")
        for e in table:
            if e & L.L1E_RESERVED_MASK:
                self.msg(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.res.corruptions += 1
            if not e:
                continue
            # like qemu-img, an entry with flags but no offset points at cluster 0
            l2 = e & L.L1E_OFFSET_MASK
            self.inc(l2, self.cs)
            if l2 & (self.cs - 1):
                self.msg(f"ERROR l2_offset={l2:x}: Table is not cluster aligned; "
                         "L1 entry corrupted")
                self.res.corruptions += 1
                continue
            self.l2(l2, active)

    def l2(self, offset: int, active: bool) -> None:
        geo, res = self.geo, self.res
        ext = geo.extended_l2
        words = load_u64(read_at(self.file, self.cs, offset))
        step = geo.l2_entry_words
        data_file = self.h.has_data_file
        next_contiguous = 0
        for i in range(0, len(words), step):
            e = words[i]
            bm = words[i + 1] if ext else 0
            if e & L.QCOW_OFLAG_COMPRESSED:
                if e & L.QCOW_OFLAG_COPIED:
                    coff = e & geo.cluster_offset_mask
                    self.msg(f"ERROR: coffset=0x{coff:x}: copied flag must never be set "
                             "for compressed clusters")
                    res.corruptions += 1
                if bm:
                    self.msg(f"ERROR compressed cluster {i // step} with non-zero subcluster "
                             f"allocation bitmap, entry=0x{e:x}")
                    res.corruptions += 1
                coff, csize = geo.compressed_extent(e & ~L.QCOW_OFLAG_COPIED)
                self.inc(coff, csize)
                if active:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1  # compressed clusters are fragmented
                continue
            if e & L.L2E_STD_RESERVED_MASK:
                self.msg(f"ERROR found l2 entry with reserved bits set: {e:x}")
                res.corruptions += 1
            if ext:
                has_host = bool(e & L.L2E_OFFSET_MASK) or (data_file and bool(e & L.QCOW_OFLAG_COPIED))
                t = SC.NORMAL if has_host else SC.UNALLOCATED_PLAIN
                alloc = bm & L.L2_BITMAP_ALLOC_ALL
                if not has_host and alloc:
                    self.msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                    res.corruptions += 1
                elif alloc & (bm >> 32):
                    self.msg(f"ERROR: invalid subcluster bitmap 0x{bm:x} (allocated and zero) "
                             f"in L2 entry 0x{e:x}")
                    res.corruptions += 1
            else:
                t = std_type(e, data_file)
            if t not in (SC.NORMAL, SC.ZERO_ALLOC):
                continue
            host = e & L.L2E_OFFSET_MASK
            if active:
                res.allocated_clusters += 1
                if next_contiguous and host != next_contiguous:
                    res.fragmented_clusters += 1
                next_contiguous = host + self.cs
            if host & (self.cs - 1):
                data = bool(bm & L.L2_BITMAP_ALLOC_ALL) if ext else not e & L.QCOW_OFLAG_ZERO
                if data:
                    self.msg(f"ERROR offset={host:x}: Data cluster is not properly aligned; "
                             "L2 entry corrupted.")
                    res.corruptions += 1
                elif self.fix & FIX_ERRORS and offset >= self.cs:
                    # a preallocated zero cluster: keep it reading zero, drop the offset
                    self.msg(f"Repairing offset={host:x}: Preallocated cluster is not properly "
                             "aligned; L2 entry corrupted.")
                    if ext:
                        words[i], words[i + 1] = 0, L.L2_BITMAP_ZERO_ALL
                    else:
                        words[i] = L.QCOW_OFLAG_ZERO
                    self.file.pwrite(store_u64(words), offset)
                    res.corruptions_fixed += 1
                    continue
                else:
                    self.msg(f"ERROR offset={host:x}: Preallocated cluster is not properly "
                             "aligned; L2 entry corrupted.")
                    res.corruptions += 1
            if not data_file:
                self.inc(host, self.cs)

    # --- cold metadata ---------------------------------------------------------------
    def snapshots(self) -> None:
        """Walk the snapshot table like qemu-img check: an entry that runs past the end
        of the file ends the table (a corruption); an entry whose L1 table is unaligned
        or too large is a corruption and is not followed."""
        h = self.h
        if not h.nb_snapshots:
            return
        base = h.snapshots_offset
        pos = 0
        for i in range(h.nb_snapshots):
            if pos > L.MAX_SNAPSHOTS * 1024 * 64:
                self.msg("ERROR snapshot table is too big")
                self.res.corruptions += 1
                break
            fixed = read_at(self.file, _SNAP_ENTRY.size, base + pos)
            l1_off, l1_size, id_len, name_len, *_, extra_len = _SNAP_ENTRY.unpack(fixed)
            if extra_len > _MAX_SNAPSHOT_EXTRA:
                raise ImageOpenError(f"Too much extra metadata in snapshot table entry {i}")
            names = base + pos + _SNAP_ENTRY.size + extra_len
            end = pos + _SNAP_ENTRY.size + extra_len + id_len + name_len
            if base + end > self.file_size:
                self.msg(f"ERROR snapshot table entry {i} is incomplete")
                self.res.corruptions += 1
                pos = end
                break
            pos = (end + 7) & ~7
            raw = read_at(self.file, id_len + name_len, names)
            sid = raw[:id_len].decode("utf-8", "replace")
            name = raw[id_len:].decode("utf-8", "replace")
            if l1_off & (self.cs - 1):
                self.msg(f"ERROR snapshot {sid} ({name}) l1_offset={l1_off:#x}: L1 table is "
                         "not cluster aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if l1_size * 8 > L.MAX_L1_BYTES:
                self.msg(f"ERROR snapshot {sid} ({name}) l1_size={l1_size:#x}: L1 table is "
                         "too large; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            self.l1(l1_off, l1_size, False)
        self.inc(base, pos)

    def bitmaps(self) -> None:
        h = self.h
        ext = h.extension(L.EXT_BITMAPS)
        if ext is None or not h.autoclear_features & L.AUTOCLEAR_BITMAPS:
            return
        if len(ext) < _BITMAP_EXT.size:
            self.msg("ERROR bitmaps header extension is truncated")
            self.res.corruptions += 1
            return
        count, _, dsize, doff = _BITMAP_EXT.unpack_from(ext)
        if not count:
            return
        self.inc(doff, dsize)
        buf = read_at(self.file, dsize, doff)
        pos = 0
        for _ in range(count):
            if pos + _BITMAP_ENTRY.size > len(buf):
                self.msg("ERROR bitmap directory is truncated")
                self.res.corruptions += 1
                return
            toff, tsize, _, _, _, nlen, elen = _BITMAP_ENTRY.unpack_from(buf, pos)
            pos = (pos + _BITMAP_ENTRY.size + elen + nlen + 7) & ~7
            self.inc(toff, tsize * 8)
            for e in load_u64(read_at(self.file, tsize * 8, toff)):
                off = e & _BITMAP_TABLE_OFFSET_MASK
                if off:
                    self.inc(off, self.cs)

    def crypto_header(self) -> None:
        ext = self.h.extension(L.EXT_CRYPTO)
        if self.h.crypt_method and ext is not None and len(ext) >= 16:
            offset, length = struct.unpack_from(">QQ", ext)
            self.inc(offset, length)

    # --- refcount structure ----------------------------------------------------------
    def refcount_structure(self, reftable: array[int]) -> None:
        h = self.h
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        nb = self.geo.size_to_clusters(self.file_size)
        for i, e in enumerate(reftable):
            if e & (self.cs - 1):
                self.msg(f"ERROR refcount block {i} is not cluster aligned; "
                         "refcount table entry corrupted")
                self.res.corruptions += 1
                self.refblock_errors += 1
                self.rebuild = True
                continue
            c = e >> self.geo.cluster_bits
            if c >= nb:
                if self.fix & FIX_ERRORS:
                    # qemu-img grows the file to hold the block, then finds the block has
                    # no refcount and rebuilds; the rebuild alone does the same job here
                    self.msg(f"Repairing refcount block {i} is outside image")
                    self.res.corruptions_fixed += 1
                    self.outside.append(c)
                else:
                    self.msg(f"ERROR refcount block {i} is outside image")
                    self.res.corruptions += 1
                continue
            if e:
                self.inc(e, self.cs)
                if self.ref[c] != 1:
                    self.msg(f"ERROR refcount block {i} refcount={self.ref[c]}")
                    self.res.corruptions += 1
                    self.refblock_errors += 1
                    self.rebuild = True

    def count_all(self, with_refcount_structure: array[int] | None) -> None:
        h = self.h
        self.res.total_clusters = self.geo.size_to_clusters(h.size)
        self.inc(0, self.cs)
        self.l1(h.l1_table_offset, h.l1_size, True)
        self.snapshots()
        self.bitmaps()
        self.crypto_header()
        if with_refcount_structure is not None:
            self.refcount_structure(with_refcount_structure)


# --------------------------------------------------------------------------------------
# the stored refcounts
# --------------------------------------------------------------------------------------
class _Stored:
    """Stored refcounts, read block by block (and written back in place on repair)."""

    def __init__(self, file: HostFile, header: Header, geo: Geometry) -> None:
        self.file = file
        self.geo = geo
        cs = geo.cluster_size
        self.table = load_u64(read_at(file, header.refcount_table_clusters * cs,
                                      header.refcount_table_offset))
        self.blocks: dict[int, array[int] | None] = {}
        self.dirty: set[int] = set()
        self.bits = geo.refcount_block_bits
        self.mask = geo.refcount_block_entries - 1

    def _block(self, rti: int) -> array[int] | None:
        """The block of table index ``rti``; None if it is not usable."""
        if rti in self.blocks:
            return self.blocks[rti]
        off = self.table[rti] & L.REFT_OFFSET_MASK
        blk: array[int] | None
        if off & (self.geo.cluster_size - 1) or off >= (1 << 63) - self.geo.cluster_size:
            blk = None  # qemu: "Can't get refcount ... Input/output error"
        else:
            blk = load_refblock(read_at(self.file, self.geo.cluster_size, off),
                                self.geo.refcount_bits)
        self.blocks[rti] = blk
        return blk

    def get(self, cluster: int) -> int | None:
        rti = cluster >> self.bits
        if rti >= len(self.table) or not self.table[rti] & L.REFT_OFFSET_MASK:
            return 0
        blk = self._block(rti)
        return None if blk is None else blk[cluster & self.mask]

    def set(self, cluster: int, value: int) -> bool:
        rti = cluster >> self.bits
        if rti >= len(self.table) or not self.table[rti] & L.REFT_OFFSET_MASK:
            return False
        blk = self._block(rti)
        if blk is None:
            return False
        blk[cluster & self.mask] = value
        self.dirty.add(rti)
        return True

    def write_back(self) -> None:
        for rti in sorted(self.dirty):
            blk = self.blocks[rti]
            assert blk is not None
            self.file.pwrite(store_refblock(blk, self.geo.refcount_bits),
                             self.table[rti] & L.REFT_OFFSET_MASK)
        self.dirty.clear()


# --------------------------------------------------------------------------------------
# the check proper
# --------------------------------------------------------------------------------------
def _compare(
    walk: _Walk, stored: _Stored, fix: int, res: CheckResult
) -> tuple[int, bool]:
    """Compare counted and stored refcounts; returns (highest used cluster, rebuild)."""
    ref = walk.ref
    nb = max(len(ref), walk.geo.size_to_clusters(walk.file_size))
    highest = 0
    rebuild = False
    for i in range(nb):
        counted = ref[i] if i < len(ref) else 0
        have = stored.get(i)
        if have is None:
            res.messages.append(f"Can't get refcount for cluster {i}: Input/output error")
            res.check_errors += 1
            continue
        if have or counted:
            highest = i
        if have == counted:
            continue
        fixing = False
        if have == 0:
            rebuild = True
        elif have > counted and fix & FIX_LEAKS:
            fixing = True
        elif have < counted and fix & FIX_ERRORS:
            fixing = True
        word = "Repairing" if fixing else ("ERROR" if have < counted else "Leaked")
        res.messages.append(f"{word} cluster {i} refcount={have} reference={counted}")
        if fixing and stored.set(i, counted):
            if have > counted:
                res.leaks_fixed += 1
            else:
                res.corruptions_fixed += 1
            continue
        if have < counted:
            res.corruptions += 1
        else:
            res.leaks += 1
    return highest, rebuild


def _fix_copied(
    table: array[int], i: int, rc: int, repair: bool, res: CheckResult, what: str
) -> bool:
    """Report (and with ``repair`` fix) entry ``i`` whose COPIED bit disagrees with its
    refcount ``rc``.  True when the table was changed."""
    e = table[i]
    if (rc == 1) == bool(e & L.QCOW_OFLAG_COPIED):
        return False
    word = "Repairing" if repair else "ERROR"
    res.messages.append(f"{word} OFLAG_COPIED {what} refcount={rc}")
    if not repair:
        res.corruptions += 1
        return False
    table[i] = e | L.QCOW_OFLAG_COPIED if rc == 1 else e & ~L.QCOW_OFLAG_COPIED
    res.corruptions_fixed += 1
    return True


def _check_copied(
    file: HostFile, header: Header, geo: Geometry, stored: _Stored, fix: int, res: CheckResult
) -> None:
    """COPIED must be set exactly when the stored refcount is 1 (active L1 and L2).

    Repaired with ``FIX_ERRORS``; with ``FIX_LEAKS`` alone only when nothing else is
    wrong any more (the stored refcounts are then known to be right), as qemu-img does.
    """
    repair = bool(fix & FIX_ERRORS) or (
        bool(fix & FIX_LEAKS) and not (res.check_errors or res.corruptions or res.leaks))
    l1 = load_u64(read_at(file, header.l1_size * 8, header.l1_table_offset))
    l1_dirty = False
    cs = geo.cluster_size
    data_file = header.has_data_file
    step = geo.l2_entry_words
    for i, e in enumerate(l1):
        l2off = e & L.L1E_OFFSET_MASK
        if not l2off or l2off & (cs - 1):
            continue
        rc = stored.get(l2off >> geo.cluster_bits)
        if rc is not None and _fix_copied(
            l1, i, rc, repair, res, f"L2 cluster: l1_index={i} l1_entry={e:x}"
        ):
            l1_dirty = True
        table = load_u64(read_at(file, cs, l2off))
        dirty = False
        for j in range(0, len(table), step):
            ent = table[j]
            if ent & L.QCOW_OFLAG_COMPRESSED:
                continue
            host = ent & L.L2E_OFFSET_MASK
            if geo.extended_l2:
                allocated = bool(host) or (data_file and bool(ent & L.QCOW_OFLAG_COPIED))
            else:
                allocated = std_type(ent, data_file) in (SC.NORMAL, SC.ZERO_ALLOC)
            if not allocated:
                continue
            if data_file:
                rc = 1
            else:
                rc = stored.get(host >> geo.cluster_bits)
                if rc is None:
                    continue
            if _fix_copied(table, j, rc, repair, res, f"data cluster: l2_entry={ent:x}"):
                dirty = True
        if dirty:
            if l2off < cs:
                res.messages.append("ERROR: Could not write L2 table; metadata overlap "
                                    "check failed")
                res.check_errors += 1
                continue
            file.pwrite(store_u64(table), l2off)
    if l1_dirty:
        file.pwrite(store_u64(l1), header.l1_table_offset)


def _read_header(file: HostFile) -> Header:
    """The header; encrypted images are accepted too (checking needs no key)."""
    size = file.size()
    buf = bytearray(file.pread(min(size, 1 << L.MAX_CLUSTER_BITS), 0))
    crypt = struct.unpack_from(">I", buf, 32)[0] if len(buf) >= L.HEADER_V2_LENGTH else 0
    if crypt:
        struct.pack_into(">I", buf, 32, 0)  # parse_header refuses encryption: we don't
    header = parse_header(bytes(buf), size)
    return header.replace(crypt_method=crypt) if crypt else header


def _one_pass(file: HostFile, header: Header, fix: int, res: CheckResult) -> Header:
    """Check (and with ``fix``, repair) once; returns the (possibly new) header."""
    geo = Geometry(header.cluster_bits, header.refcount_order, header.extended_l2)
    stored = _Stored(file, header, geo)
    walk = _Walk(file, header, res, fix)
    walk.count_all(stored.table)
    highest, zero_seen = _compare(walk, stored, 0, _scratch := CheckResult(res.filename))
    for c in walk.outside:
        have = stored.get(c) or 0
        if have != 1:
            _scratch.messages.append(f"ERROR cluster {c} refcount={have} reference=1")
            _scratch.corruptions += 1
    rebuild = walk.rebuild or zero_seen or bool(walk.outside)
    if fix & FIX_ERRORS and rebuild:
        res.messages.extend(_scratch.messages)
        res.messages.append("Rebuilding refcount structure")
        res.leaks_fixed += _scratch.leaks
        res.corruptions_fixed += _scratch.corruptions + walk.refblock_errors
        res.corruptions -= walk.refblock_errors
        header = _rebuild(file, header, geo)
        stored = _Stored(file, header, geo)
        highest = _highest_used(stored, geo, file.size())
    elif fix:
        if rebuild:
            res.messages.extend(_scratch.messages)
            res.messages.append("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            res.failure = "Input/output error"
            return header
        res.messages.extend(_scratch.messages)
        highest, _ = _compare(walk, stored, fix, res)
        stored.write_back()
        file.sync()
    else:
        res.messages.extend(_scratch.messages)
        res.leaks += _scratch.leaks
        res.corruptions += _scratch.corruptions
        res.check_errors += _scratch.check_errors
    _check_copied(file, header, geo, stored, fix, res)
    res.image_end_offset = (highest + 1) * geo.cluster_size
    return header


def _highest_used(stored: _Stored, geo: Geometry, file_size: int) -> int:
    highest = 0
    for i in range(geo.size_to_clusters(file_size)):
        if stored.get(i):
            highest = i
    return highest


def _rebuild(file: HostFile, header: Header, geo: Geometry) -> Header:
    """Write a new refcount table and blocks holding exactly the counted refcounts,
    after the end of everything in use, then point the header at them."""
    counter = _Walk(file, header, CheckResult(file.path))
    counter.count_all(None)
    ref = counter.ref
    cs = geo.cluster_size
    bits = geo.refcount_block_bits
    used = [i for i, v in enumerate(ref) if v]
    start = max(max(used, default=0) + 1, geo.size_to_clusters(file.size()))
    per_table_cluster = cs // 8
    nt, nb = 1, 0
    while True:
        end = start + nt + nb
        rtis = {c >> bits for c in used} | {c >> bits for c in range(start, end)}
        need_nt = (max(rtis) + 1 + per_table_cluster - 1) // per_table_cluster
        if len(rtis) == nb and need_nt <= nt:
            break
        nb = len(rtis)
        nt = max(nt, need_nt)
    if nt * cs > L.MAX_REFTABLE_BYTES:
        raise CheckFailed("refcount table would exceed its maximum size")
    if len(ref) < start + nt + nb:
        ref.extend(_count_array(geo.refcount_bits, start + nt + nb - len(ref)))
    for c in range(start, start + nt + nb):
        ref[c] = 1
    table = array("Q", bytes(nt * cs))
    entries = geo.refcount_block_entries
    for k, rti in enumerate(sorted(rtis)):
        boff = (start + nt + k) * cs
        table[rti] = boff
        blk = new_refblock(entries, geo.refcount_bits)
        lo = rti * entries
        for c in range(lo, min(lo + entries, len(ref))):
            if ref[c]:
                blk[c - lo] = min(ref[c], geo.refcount_max)
        file.pwrite(store_refblock(blk, geo.refcount_bits), boff)
    file.pwrite(store_u64(table), start * cs)
    file.sync()
    header = header.replace(refcount_table_offset=start * cs, refcount_table_clusters=nt)
    file.pwrite(encode_header(header), 0)
    file.sync()
    return header


def _mark_clean(file: HostFile, header: Header) -> Header:
    feats = header.incompatible_features & ~(L.INCOMPAT_DIRTY | L.INCOMPAT_CORRUPT)
    if feats != header.incompatible_features:
        file.sync()  # every repair is on disk before the header says the image is clean
        header = header.replace(incompatible_features=feats)
        file.pwrite(encode_header(header), 0)
        file.sync()
    return header


def check_file(file: HostFile, filename: str, repair: str | None = None) -> CheckResult:
    """Check (and repair) the qcow2 image open as ``file``."""
    if repair not in _REPAIR_MODES:
        raise ValueError(f"unknown repair mode {repair!r}")
    fix = _REPAIR_MODES[repair]
    header = _read_header(file)
    geo = Geometry(header.cluster_bits, header.refcount_order, header.extended_l2)
    if header.l1_size < geo.l1_entries_for(header.size):
        raise ImageOpenError("L1 table is too small")
    res = CheckResult(filename)
    header = _one_pass(file, header, fix, res)
    if res.failure or not fix:
        return res
    if not res.check_errors and not res.corruptions:
        header = _mark_clean(file, header)
    if res.leaks_fixed or res.corruptions_fixed:
        second = CheckResult(filename, leaks_fixed=res.leaks_fixed,
                             corruptions_fixed=res.corruptions_fixed)
        second.messages = res.messages
        _one_pass(file, _read_header(file), 0, second)
        return second
    return res


def check_image(path_or_driver: str | Qcow2Driver, repair: str | None = None) -> CheckResult:
    """Check the image at a path (opened here) or an open :class:`Qcow2Driver`
    (which must not have unflushed changes)."""
    if isinstance(path_or_driver, str):
        file = HostFile(path_or_driver, writable=repair is not None)
        try:
            return check_file(file, path_or_driver, repair)
        finally:
            file.close()
    drv = path_or_driver
    drv.flush()
    return check_file(drv.file, drv.path, repair)


def rebuild_refcounts(driver: Qcow2Driver) -> None:
    """Repair a dirty image (lazy refcounts) at a writable open: recount every cluster,
    write the refcounts and COPIED flags that follow, clear the dirty bit."""
    try:
        res = check_file(driver.file, driver.path, "all")
    except CheckFailed as e:
        raise ImageOpenError(f"'{driver.path}': could not repair a dirty image: {e}") from None
    if res.failure or res.check_errors or res.corruptions:
        raise ImageOpenError(
            f"'{driver.path}': could not repair the refcounts of a dirty image "
            f"({res.corruptions} corruptions, {res.check_errors} errors remain)")
    header = _read_header(driver.file)
    driver.header = header
    driver.l1 = load_u64(driver.file.pread(header.l1_size * 8, header.l1_table_offset))
    driver._refcounts = None  # noqa: SLF001 -- reload from the rebuilt structure
