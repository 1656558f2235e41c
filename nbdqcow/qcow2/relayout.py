"""Rewrite an image into the constant-offset layout (qcow2.txt "Cluster mapping";
layout as create.py's preallocated modes: all metadata first, then host = guest + one
constant for every guest cluster).

The new image is built in a temporary file beside the target (same options, made by
create.py), every cluster's state kept (data, zero, unallocated/backing; plain data
copied in bulk by :mod:`nbdqcow.qcow2.relayout_copy`), synced, and renamed over the
target; the directory is synced (tests/e2e/test_power_loss_relayout.py checks every
crash state across the rename).
Killed at any point before the rename, the original is untouched (a stale temporary
file is removed by the next run).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from nbdqcow.block.hostfile import HostFile, copy_mode, remove_file, replace_file, sync_path
from nbdqcow.block.locking import Access, ImageLocked
from nbdqcow.errors import ImageError, NbdqcowError
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.backing import no_backing
from nbdqcow.qcow2.bitmap_store import BitmapOpError, add_stored_bitmaps, read_stored_bitmaps
from nbdqcow.qcow2.create import Qcow2Options, create_qcow2, plan_layout
from nbdqcow.qcow2.driver import Qcow2Driver
from nbdqcow.qcow2.entries import SC
from nbdqcow.qcow2.relayout_copy import Piece, copy_pieces, merge_pieces

TMP_SUFFIX = ".relayout-tmp"
COPIED = L.QCOW_OFLAG_COPIED
OFF_MASK = L.L2E_OFFSET_MASK
_DATA = frozenset({SC.NORMAL, SC.COMPRESSED})
_ZERO = frozenset({SC.ZERO_PLAIN, SC.ZERO_ALLOC})

Progress = Callable[[int, int], None]


class RelayoutError(ImageError):
    """The image cannot be relaid out (internal snapshots, in-use bitmaps, data file...)."""


@dataclass(frozen=True)
class RelayoutResult:
    path: str
    clusters: int
    data_offset: int  # host - guest in the new image


def tmp_path_for(target: str) -> str:
    d, base = os.path.split(os.path.abspath(target))
    return os.path.join(d, f".{base}{TMP_SUFFIX}")


def _options(src: Qcow2Driver, prealloc: str, target: str) -> Qcow2Options:
    h = src.header
    if h.nb_snapshots:
        raise RelayoutError("images with internal snapshots cannot be relaid out "
                            "(delete the snapshots first)")
    if h.has_data_file:
        raise RelayoutError("an external data file already maps guest = host offsets")
    policy = h.extension(L.EXT_NBDQCOW_POLICY)
    backing = h.backing_file
    if backing and not os.path.isabs(backing) and ":" not in backing:
        # a relative name is relative to the image's folder: keep it pointing at the
        # same file from the new image's folder
        src_dir = os.path.dirname(os.path.abspath(src.path))
        dst_dir = os.path.dirname(os.path.abspath(target))
        if src_dir != dst_dir:
            backing = os.path.relpath(os.path.join(src_dir, backing), dst_dir)
    return Qcow2Options(
        version=h.version, cluster_bits=h.cluster_bits, refcount_order=h.refcount_order,
        lazy_refcounts=h.lazy_refcounts, extended_l2=h.extended_l2,
        compression_type=h.compression_type, backing_file=backing,
        backing_fmt=h.backing_format, preallocation=prealloc,
        mapping=policy.decode("ascii", "replace").strip("\0") if policy else None,
    )


def _choose_prealloc(src: Qcow2Driver) -> str:
    """falloc when the source file is (nearly) fully allocated on the host, else metadata
    (sparse data area)."""
    size = src.file.size()
    return "falloc" if size and src.file.allocated_bytes() * 10 >= size * 9 else "metadata"


def _copy_cluster(src: Qcow2Driver, dst: Qcow2Driver, gc: int) -> None:
    geo = dst.geo
    cs = geo.cluster_size
    pos = gc * cs
    n = min(cs, src.size - pos)
    l1i = geo.offset_to_l1_index(pos)
    l2off = dst.l1[l1i] & L.L1E_OFFSET_MASK
    table = dst.l2_cache.get(l2off)
    idx = geo.offset_to_l2_index(pos)
    pieces = list(src.runs(pos, n))
    if geo.extended_l2:
        e = table[2 * idx]
        host = e & OFF_MASK
        alloc = zero = 0
        for start, rn, t, sh in pieces:
            first = (start - pos) >> geo.subcluster_bits
            last = (start - pos + rn - 1) >> geo.subcluster_bits
            mask = ((1 << (last - first + 1)) - 1) << first
            if t in _DATA:
                _copy_data(src, dst, start, rn, host + start - pos,
                           sh if t is SC.NORMAL else None)
                alloc |= mask
            elif t in _ZERO:
                zero |= mask
        if any(t is SC.COMPRESSED for _, _, t, _ in pieces):
            alloc, zero = (1 << 32) - 1, 0
            _copy_data(src, dst, pos, n, host, None)
        table[2 * idx] = host | COPIED
        table[2 * idx + 1] = alloc | (zero << 32)
    else:
        e = table[idx]
        host = e & OFF_MASK
        t = pieces[0][2]
        if t in _DATA:
            _copy_data(src, dst, pos, n, host, pieces[0][3] if t is SC.NORMAL else None)
        elif t in _ZERO or (t is SC.UNALLOCATED_PLAIN and not src.header.backing_file):
            if dst.header.version >= 3:
                table[idx] = host | COPIED | L.QCOW_OFLAG_ZERO
            # version 2: the fresh data area already reads as zeros
        else:
            # falls through to the backing file: no host cluster possible without
            # extended L2; the cluster stays free in the new image
            table[idx] = 0
            dst.refcounts.free_later(host >> geo.cluster_bits)
    dst.l2_cache.mark_dirty(l2off)


def _check_constant(dst: Qcow2Driver, data_offset: int) -> None:
    """Every guest cluster of the fresh image maps to guest + ``data_offset`` (the layout
    create.py preallocated), checked table by table before any data is copied there."""
    import numpy as np

    geo = dst.geo
    cs, per = geo.cluster_size, geo.l2_size
    clusters = geo.size_to_clusters(dst.size)
    for l1i in range(-(-clusters // per)):
        n = min(per, clusters - l1i * per)
        l2off = dst.l1[l1i] & L.L1E_OFFSET_MASK
        ok = False
        if l2off:
            got = np.frombuffer(dst.l2_cache.get(l2off), dtype=np.uint64, count=n)
            want = np.arange(n, dtype=np.uint64) * np.uint64(cs) + np.uint64(
                l1i * per * cs + data_offset)
            ok = bool(np.array_equal(got & np.uint64(OFF_MASK), want))
        if not ok:
            raise NbdqcowError("relayout: the new image is not laid out at one offset")


def _set_entries(dst: Qcow2Driver, start: int, n: int, zero: bool) -> None:
    """Clusters of [start, start+n) read as zeros (ZERO flag on their preallocated entry)
    or fall through to the backing file (no host cluster: entry 0, cluster freed), as
    :func:`_copy_cluster` does one by one."""
    geo = dst.geo
    cs = geo.cluster_size
    gc, end = start // cs, (start + n + cs - 1) // cs
    while gc < end:
        pos = gc * cs
        l2off = dst.l1[geo.offset_to_l1_index(pos)] & L.L1E_OFFSET_MASK
        table = dst.l2_cache.get(l2off)
        idx = geo.offset_to_l2_index(pos)
        stop = min(end - gc, geo.l2_size - idx) + idx
        for i in range(idx, stop):
            host = table[i] & OFF_MASK
            if zero:
                table[i] = host | COPIED | L.QCOW_OFLAG_ZERO
            else:
                table[i] = 0
                dst.refcounts.free_later(host >> geo.cluster_bits)
        dst.l2_cache.mark_dirty(l2off)
        gc += stop - idx


def _copy_standard(src: Qcow2Driver, dst: Qcow2Driver, data_offset: int,
                   progress: Progress | None) -> None:
    """:func:`_copy_cluster` for standard L2 tables, run by run: zero and unallocated
    runs set their entries, compressed clusters are copied one by one, and plain data
    is gathered into pieces copied in the old file's order (:mod:`relayout_copy`)."""
    _check_constant(dst, data_offset)
    cs = dst.geo.cluster_size
    pieces: list[Piece] = []
    for start, n, t, sh in src.runs(0, src.size):
        if t is SC.NORMAL:
            pieces.append((sh, n, start + data_offset))
        elif t in _ZERO or t is SC.UNALLOCATED_PLAIN:
            zero = t in _ZERO or not src.header.backing_file
            if zero and dst.header.version < 3:
                pass  # version 2: the fresh data area already reads as zeros
            else:
                _set_entries(dst, start, n, zero)
        else:
            for gc in range(start // cs, (start + n + cs - 1) // cs):
                _copy_cluster(src, dst, gc)
    total = dst.geo.size_to_clusters(src.size)

    def bar(done: int, to_copy: int) -> None:
        if progress is not None:
            progress(total * done // max(1, to_copy), total)

    # unsafe (nothing synced): the page cache takes the new data at once, no disk wait
    copy_pieces(src.data_file, dst.file, merge_pieces(pieces), bar, direct=dst.file.syncs)


def _copy_data(src: Qcow2Driver, dst: Qcow2Driver, guest: int, n: int, host: int,
               src_host: int | None) -> None:
    """Copy guest bytes to ``host`` in the new file; ``src_host``: where they are in the
    old file when they are plain data there (a host hole then needs no read at all)."""
    if src_host is not None and not any(
            is_data for _, _, is_data in src.data_file.data_runs(src_host, n)):
        return  # a hole in the old file reads as zeros; so does the fresh data area
    data = src.pread(guest, n)
    if data.count(0) == len(data):
        return  # the fresh data area reads as zeros already
    dst.file.pwrite(data, host)


def relayout(path: str, output: str | None = None, progress: Progress | None = None,
             prealloc: str | None = None, _pause: float = 0.0,
             access: Access | None = None, durable: bool = True) -> RelayoutResult:
    """Rewrite ``path`` (or into ``output``) with host = guest + one constant.
    ``access``: how the image's specification says to lock it (``file.locking=off``,
    ``force-share=on``, which only a relayout into another file may use).
    ``durable=False`` (qemu-img convert's default cache mode, unsafe): nothing is synced,
    the new image may still be in the page cache on return; refused in place, where the
    old image would be lost to a crash."""
    target = output if output is not None else path
    in_place = output is None or os.path.exists(output) and os.path.samefile(output, path)
    if in_place and not durable:
        raise RelayoutError("relayout in place needs the new image on disk before it "
                            "replaces the old one: cache mode 'unsafe' only with -O")
    # qemu's locks: replacing an image is writing it, so nobody else may use it meanwhile
    # (the source with a writer's locks when it is the target, else a reader's)
    # the backing file's data is never read: only whether there is one
    src = Qcow2Driver.open(path, writable=False,
                           access=replace(access or Access(), write=in_place),
                           backing=no_backing)
    guard: HostFile | None = None
    try:
        if not in_place and os.path.exists(target):
            try:
                guard = HostFile(target, writable=False,
                                 lock=Access(write=True).image("qcow2"))
            except ImageLocked as e:
                raise e.within(f"Could not open '{target}': ") from None
        return _relayout(src, target, progress, prealloc, _pause, durable)
    finally:
        if guard is not None:
            guard.close()
        src.close()


def _relayout(src: Qcow2Driver, target: str, progress: Progress | None,
              prealloc: str | None, _pause: float, durable: bool) -> RelayoutResult:
    tmp = tmp_path_for(target)
    remove_file(tmp)  # left over by an interrupted run
    opts = _options(src, prealloc or _choose_prealloc(src), target)
    try:
        bitmaps = read_stored_bitmaps(src.file, src.header)  # carried over, bit for bit
    except BitmapOpError as e:
        raise RelayoutError(str(e)) from None
    data_offset = plan_layout(src.size, opts).data_offset or 0
    create_qcow2(tmp, src.size, opts)
    try:
        dst = Qcow2Driver.open(tmp, writable=True, backing=no_backing)
        dst.file.syncs = durable
        try:
            total = dst.geo.size_to_clusters(src.size)
            if dst.geo.extended_l2 or _pause:
                for gc in range(total):
                    _copy_cluster(src, dst, gc)
                    if progress is not None:
                        progress(gc + 1, total)
                    if _pause:
                        time.sleep(_pause)
            else:
                _copy_standard(src, dst, data_offset, progress)
            if bitmaps:
                assert dst.live_bitmaps is not None
                add_stored_bitmaps(dst.live_bitmaps, bitmaps)
        finally:
            dst.close()
        if os.path.exists(target):
            copy_mode(target, tmp)
        if durable:
            sync_path(tmp)
    except BaseException:
        remove_file(tmp)
        raise
    replace_file(tmp, target, durable)
    return RelayoutResult(target, total, data_offset)
