"""The check proper: one pass (count, compare, repair), the entry points, and the
repair of a dirty image at open.

Repair: ``"leaks"`` lowers leaked refcounts to the counted value (and fixes COPIED flags
when nothing else is wrong); ``"all"`` also raises too-low refcounts and fixes COPIED
flags and unaligned preallocated zero clusters, and rebuilds a broken refcount structure.
After a repair the image is checked again and that second verdict is the one reported
(as qemu-img does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbdqcow.block.hostfile import HostFile
from nbdqcow.errors import ImageOpenError
from nbdqcow.qcow2.check.compare import check_copied, compare
from nbdqcow.qcow2.check.repair import mark_clean, rebuild_structure
from nbdqcow.qcow2.check.result import FIX_ERRORS, FIX_LEAKS, CheckFailed, CheckResult
from nbdqcow.qcow2.check.stored import Stored, highest_used, read_header
from nbdqcow.qcow2.check.walk import Walk
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.header import Header
from nbdqcow.qcow2.tables import load_u64

if TYPE_CHECKING:
    from nbdqcow.qcow2.driver import Qcow2Driver

_REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}


def _one_pass(file: HostFile, header: Header, fix: int, res: CheckResult) -> Header:
    """Check (and with ``fix``, repair) once; returns the (possibly new) header."""
    geo = Geometry(header.cluster_bits, header.refcount_order, header.extended_l2)
    stored = walk_stored = Stored(file, header, geo)
    walk = Walk(file, header, res, fix, stored.counts(geo.size_to_clusters(file.size())))
    walk.count_all(stored.table)
    highest, zero_seen = compare(walk, stored, 0, _scratch := CheckResult(res.filename))
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
        header = rebuild_structure(file, header, geo)
        stored = Stored(file, header, geo)
        highest = highest_used(stored, geo, file.size())
    elif fix:
        if rebuild:
            res.messages.extend(_scratch.messages)
            res.messages.append("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            res.failure = "Input/output error"
            return header
        res.messages.extend(_scratch.messages)
        highest, _ = compare(walk, stored, fix, res)
        stored.write_back()
        file.sync()
    else:
        res.messages.extend(_scratch.messages)
        res.leaks += _scratch.leaks
        res.corruptions += _scratch.corruptions
        res.check_errors += _scratch.check_errors
    clean = walk.copied_clean if stored is walk_stored and not stored.changed else None
    check_copied(file, header, geo, stored, fix, res, clean)
    if not fix:
        res.guest_map = walk.guest_map
    res.image_end_offset = (highest + 1) * geo.cluster_size
    return header


def check_file(file: HostFile, filename: str, repair: str | None = None) -> CheckResult:
    """Check (and repair) the qcow2 image open as ``file``."""
    if repair not in _REPAIR_MODES:
        raise ValueError(f"unknown repair mode {repair!r}")
    fix = _REPAIR_MODES[repair]
    header = read_header(file)
    geo = Geometry(header.cluster_bits, header.refcount_order, header.extended_l2)
    if header.l1_size < geo.l1_entries_for(header.size):
        raise ImageOpenError("L1 table is too small")
    res = CheckResult(filename)
    header = _one_pass(file, header, fix, res)
    if res.failure or not fix:
        return res
    if not res.check_errors and not res.corruptions:
        header = mark_clean(file, header)
    if res.leaks_fixed or res.corruptions_fixed:
        second = CheckResult(filename, leaks_fixed=res.leaks_fixed,
                             corruptions_fixed=res.corruptions_fixed)
        second.messages = res.messages
        _one_pass(file, read_header(file), 0, second)
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
    header = read_header(driver.file)
    driver.header = header
    driver.l1 = load_u64(driver.file.pread(header.l1_size * 8, header.l1_table_offset))
    driver._refcounts = None  # noqa: SLF001 -- reload from the rebuilt structure
