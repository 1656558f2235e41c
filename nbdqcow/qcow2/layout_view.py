"""Guest -> host layout of a qcow2 image, classified for people (qcow2.txt "Cluster
mapping", "Host cluster management").

:func:`mapping_summary` answers "is host = guest + one constant?" (and if not, how many
runs and how many clusters are out of place); :func:`host_kinds` and :func:`guest_runs`
give what a picture needs: the kind of every guest run and of every host cluster.
Nothing here changes an image.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

from nbdqcow.block.locking import Access
from nbdqcow.errors import NbdqcowError
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.backing import no_backing
from nbdqcow.qcow2.driver import Qcow2Driver
from nbdqcow.qcow2.entries import SC
from nbdqcow.qcow2.mapping_summary import MappingSummary
from nbdqcow.qcow2.snapshot import encode_table, read_snapshot_table
from nbdqcow.qcow2.tables import load_u64


class Kind(IntEnum):
    FREE = 0  # host: refcount 0, nothing points here
    METADATA = 1
    DATA = 2
    KEPT_ZERO = 3  # reads zero, host cluster kept (zero-alloc)
    RESERVED = 4  # extended-L2 unallocated-alloc: host space reserved
    COMPRESSED = 5
    ZERO = 6  # guest: reads zero, no host cluster
    UNALLOCATED = 7  # guest: no host cluster
    OTHER = 8  # host: in use by a snapshot only (or leaked)


KIND_LABEL = {
    Kind.FREE: "free", Kind.METADATA: "metadata", Kind.DATA: "data",
    Kind.KEPT_ZERO: "kept zero", Kind.RESERVED: "reserved", Kind.COMPRESSED: "compressed",
    Kind.ZERO: "zero (no host)", Kind.UNALLOCATED: "unallocated",
    Kind.OTHER: "snapshot / leaked",
}
_SC_KIND = {
    SC.NORMAL: Kind.DATA, SC.ZERO_ALLOC: Kind.KEPT_ZERO, SC.UNALLOCATED_ALLOC: Kind.RESERVED,
    SC.COMPRESSED: Kind.COMPRESSED, SC.ZERO_PLAIN: Kind.ZERO,
    SC.UNALLOCATED_PLAIN: Kind.UNALLOCATED, SC.INVALID: Kind.UNALLOCATED,
}
_PARTIAL = frozenset({Kind.KEPT_ZERO, Kind.RESERVED})
_MAPPED = frozenset({SC.NORMAL, SC.ZERO_ALLOC, SC.UNALLOCATED_ALLOC})


class GuestRun(NamedTuple):
    start: int
    length: int
    kind: Kind
    host: int | None  # host byte offset of ``start`` for mapped kinds


#: guest bytes walked between two progress reports
GUEST_RUNS_STEP = 1 << 30


def guest_runs(d: Qcow2Driver,
               progress: Callable[[int, int], None] | None = None) -> list[GuestRun]:
    """Guest runs of one kind (mapped runs also contiguous on the host).  ``progress``
    is told (bytes done, bytes in all) as the walk goes."""
    out: list[GuestRun] = []
    step = GUEST_RUNS_STEP
    for pos in range(0, d.size, step):
        if progress is not None:
            progress(pos, d.size)
        _guest_runs_into(out, d, pos, min(step, d.size - pos))
    if progress is not None:
        progress(d.size, d.size)
    return out


def _guest_runs_into(out: list[GuestRun], d: Qcow2Driver, offset: int, length: int) -> None:
    """Append the runs of [offset, offset + length) to ``out``, merging each with the
    previous one (the last of ``out`` too) when it continues it: same kind (never
    compressed), guest adjacent, host adjacent or both without a host.  The run being
    grown is kept in locals (one tuple per run made, not one per piece)."""
    kinds, mapped, comp = _SC_KIND, _MAPPED, Kind.COMPRESSED
    pkind: Kind | None = None
    pstart = plen = 0
    phost: int | None = None
    if out:
        pstart, plen, pkind, phost = out.pop()
    append = out.append
    new = tuple.__new__  # GuestRun(...) without the generated __new__'s frame
    for start, n, t, host in d.runs(offset, length):
        kind = kinds[t]
        h = host if t in mapped else None
        if (kind is pkind and kind is not comp and pstart + plen == start
                and (h is None if phost is None else h == phost + plen)):
            plen += n
            continue
        if pkind is not None:
            append(new(GuestRun, (pstart, plen, pkind, phost)))
        pstart, plen, pkind, phost = start, n, kind, h
    if pkind is not None:
        append(GuestRun(pstart, plen, pkind, phost))


#: from this many runs on, :func:`summarize` uses array operations
SUMMARIZE_BULK = 2000


def summarize(runs: list[GuestRun], cluster_size: int, external: bool = False,
              bulk: bool | None = None) -> MappingSummary:
    if bulk if bulk is not None else len(runs) >= SUMMARIZE_BULK:
        return _summarize_bulk(runs, cluster_size, external)
    by_delta: Counter[int] = Counter()
    clusters_by_delta: Counter[int] = Counter()
    nruns = 0
    prev_end: tuple[int, int] | None = None
    for r in runs:
        if r.host is None:
            prev_end = None
            continue
        delta = r.host - r.start
        by_delta[delta] += r.length
        first = r.start // cluster_size
        last = (r.start + r.length - 1) // cluster_size
        clusters_by_delta[delta] += last - first + 1
        if prev_end != (r.start, r.host):
            nruns += 1
        prev_end = (r.start + r.length, r.host + r.length)
    if not by_delta:
        return MappingSummary(cluster_size, 0, 0, None, 0, external)
    offset = max(by_delta, key=lambda k: (by_delta[k], -k))
    mapped = sum(clusters_by_delta.values())
    return MappingSummary(cluster_size, mapped, nruns, offset,
                          mapped - clusters_by_delta[offset], external)


def _summarize_bulk(runs: list[GuestRun], cs: int, external: bool) -> MappingSummary:
    """:func:`summarize` with numpy (same figures)."""
    import numpy as np

    n = len(runs)
    start = np.fromiter((r.start for r in runs), np.int64, n)
    length = np.fromiter((r.length for r in runs), np.int64, n)
    host = np.fromiter((-1 if r.host is None else r.host for r in runs), np.int64, n)
    mapped = host >= 0
    if not mapped.any():
        return MappingSummary(cs, 0, 0, None, 0, external)
    # a mapped run continues the previous one when that one is mapped and both
    # guest and host offsets follow on
    cont = np.zeros(n, dtype=bool)
    cont[1:] = (mapped[:-1] & (start[:-1] + length[:-1] == start[1:])
                & (host[:-1] + length[:-1] == host[1:]))
    nruns = int(np.count_nonzero(mapped & ~cont))
    s, ln, h = start[mapped], length[mapped], host[mapped]
    clusters = (s + ln - 1) // cs - s // cs + 1
    deltas, inv = np.unique(h - s, return_inverse=True)
    by_bytes = np.bincount(inv, weights=ln)
    by_clusters = np.bincount(inv, weights=clusters)
    best = int(np.flatnonzero(by_bytes == by_bytes.max())[0])  # ties: the lowest delta
    total = int(clusters.sum())
    return MappingSummary(cs, total, nruns, int(deltas[best]),
                          total - int(by_clusters[best]), external)


def mapping_summary(d: Qcow2Driver) -> MappingSummary:
    """Constant offset or not, number of runs, clusters out of place (for ``check``)."""
    return summarize(guest_runs(d), d.geo.cluster_size, d.header.has_data_file)


def host_kinds(d: Qcow2Driver, runs: list[GuestRun] | None = None) -> bytearray:
    """The :class:`Kind` of every host cluster of the image file (array operations:
    refcount blocks and L2 tables are scanned whole)."""
    import numpy as np

    from nbdqcow.qcow2.check.bulk import stored_counts
    from nbdqcow.qcow2.check.stored import Stored

    geo = d.geo
    cb = geo.cluster_bits
    n = geo.size_to_clusters(d.file.size())
    counts = stored_counts(Stored(d.file, d.header, geo), n)
    if counts is None:  # an unusable refcount block: ask one cluster at a time
        rc = d.refcounts
        counts = np.array([rc.get(c) for c in range(n)], dtype=np.uint64)
    kinds = np.where(counts[:n] > 0, int(Kind.OTHER), int(Kind.FREE)).astype(np.uint8)
    if len(kinds) < n:
        kinds = np.concatenate([kinds, np.zeros(n - len(kinds), dtype=np.uint8)])
    d.refcounts  # noqa: B018 -- loading them adds the refcount clusters to d.meta
    meta = np.fromiter(_metadata_clusters(d), np.int64)
    meta = meta[(meta >= 0) & (meta < n)]
    kinds[meta] = int(Kind.METADATA)
    if not d.header.has_data_file:
        mapped = [r for r in runs if r.host is not None] if runs is not None else [
            r for r in guest_runs(d) if r.host is not None]
        # a host cluster partly data (extended L2 subclusters) shows as data: the other
        # kinds first, data last
        for partial in (True, False):
            sel = [r for r in mapped if (r.kind in _PARTIAL) == partial]
            if not sel:
                continue
            first = np.fromiter((r.host >> cb for r in sel if r.host is not None), np.int64)
            last = np.fromiter(((r.host + r.length - 1) >> cb for r in sel
                                if r.host is not None), np.int64)
            kind = np.fromiter((int(r.kind) for r in sel), np.int64)
            k = last - first + 1
            c = np.repeat(first, k) + (np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k))
            kk = np.repeat(kind, k)
            ok = (c >= 0) & (c < n)
            if partial:
                ok &= kinds[np.clip(c, 0, max(0, n - 1))] != int(Kind.DATA)
            kinds[c[ok]] = kk[ok]
        for e in d.l1:
            off = e & L.L1E_OFFSET_MASK
            if not off:
                continue
            table = d.l2_cache.get(off)
            w = np.frombuffer(table, dtype=np.uint64)[:: geo.l2_entry_words]
            for ent in w[(w & np.uint64(L.QCOW_OFLAG_COMPRESSED)) != 0].tolist():
                for c2 in geo.compressed_host_clusters(ent):
                    if 0 <= c2 < n:
                        kinds[c2] = int(Kind.COMPRESSED)
    return bytearray(kinds.tobytes())


def _metadata_clusters(d: Qcow2Driver) -> set[int]:
    cb = d.geo.cluster_bits
    out = set(d.meta)
    h = d.header
    try:
        snaps = read_snapshot_table(d.file, h)
    except Exception:  # a broken table is check's business, not the picture's
        snaps = []
    if snaps:
        tlen = len(encode_table(snaps))
        out.update(range(h.snapshots_offset >> cb, (h.snapshots_offset + tlen - 1 >> cb) + 1))
    for s in snaps:
        if not s.l1_size:
            continue
        out.update(range(s.l1_table_offset >> cb,
                         ((s.l1_table_offset + s.l1_size * 8 - 1) >> cb) + 1))
        sl1: array[int] = load_u64(d.file.pread(s.l1_size * 8, s.l1_table_offset))
        for e in sl1:
            if e & L.L1E_OFFSET_MASK:
                out.add((e & L.L1E_OFFSET_MASK) >> cb)
    return out


def host_runs(kinds: bytearray) -> list[tuple[int, int, Kind]]:
    """(first cluster, count, kind) runs of :func:`host_kinds`."""
    out: list[tuple[int, int, Kind]] = []
    i = 0
    n = len(kinds)
    while i < n:
        k = kinds[i]
        j = i + 1
        while j < n and kinds[j] == k:
            j += 1
        out.append((i, j - i, Kind(k)))
        i = j
    return out


def mapping_verdict(path: str, access: Access | None = None) -> str | None:
    """The mapping line for ``nbdqcow check`` ("constant: host = guest + 0x500000" or
    "N runs, M of K clusters out of place"); None when the image cannot be walked."""
    try:
        d = Qcow2Driver.open(path, writable=False, access=access, backing=no_backing)
    except NbdqcowError:
        return None
    try:
        return mapping_summary(d).verdict
    except NbdqcowError:
        return None
    finally:
        d.close()
