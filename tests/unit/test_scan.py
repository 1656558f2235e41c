"""The bulk L2 scanner (nbdqcow.qcow2.scan) against the entry-by-entry definition of
nbdqcow.qcow2.entries, on random standard and extended tables; and iter_runs through
the scanner against iter_runs entry by entry, on random ranges over several tables."""

from __future__ import annotations

from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.entries import HAS_HOST, SC, bitmap_valid, sc_type, std_type
from nbdqcow.qcow2.geometry import Geometry
from nbdqcow.qcow2.mapping import iter_runs
from nbdqcow.qcow2.scan import TableRuns, scan_l2
from nbdqcow.qcow2.scancache import ScanCache

STD = Geometry(9, 4, False)  # 64 entries of 512-byte clusters
EXT = Geometry(12, 4, True)  # 256 entries, 32 subclusters of 128 bytes

Piece = tuple[int, int, SC, int]


def reference(words: list[int], geo: Geometry, df: bool) -> tuple[list[Piece], list[str]]:
    """Runs and invalid-entry messages of a table, one (sub)cluster at a time."""
    cs, scs = geo.cluster_size, geo.subcluster_size
    pieces: list[Piece] = []
    bad: list[str] = []
    for i in range(geo.l2_size):
        if not geo.extended_l2:
            e = words[i]
            t = std_type(e, df)
            h = e & L.L2E_OFFSET_MASK
            if t in HAS_HOST and h & (cs - 1):
                bad.append(f"L2 entry {e:#x} has an unaligned host offset")
            pieces.append((i * cs, cs, t, h if t in HAS_HOST else e if t is SC.COMPRESSED else 0))
            continue
        e, bm = words[2 * i], words[2 * i + 1]
        if not bitmap_valid(e, bm, df):
            bad.append(f"invalid extended L2 entry {e:#x} bitmap {bm:#x}")
        if e & L.QCOW_OFLAG_COMPRESSED:
            pieces.append((i * cs, cs, SC.COMPRESSED, e))
            continue
        h = e & L.L2E_OFFSET_MASK
        if h & (cs - 1):
            bad.append(f"L2 entry {e:#x} has an unaligned host offset")
        for sc in range(32):
            t = sc_type(e, bm, sc, df)
            if t is SC.INVALID:
                bad.append(f"invalid subcluster state in L2 entry {e:#x}")
            pieces.append((i * cs + sc * scs, scs, t, h + sc * scs if t in HAS_HOST else 0))
    return merge(pieces), bad


def merge(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for p in pieces:
        if out:
            s, n, t, h = out[-1]
            if (t is p[2] and t is not SC.COMPRESSED and s + n == p[0]
                    and (t not in HAS_HOST or h + n == p[3])):
                out[-1] = (s, n + p[1], t, h)
                continue
        out.append(p)
    return out


def as_pieces(tr: TableRuns) -> list[Piece]:
    return list(zip(tr.starts, tr.lengths, tr.states, tr.hosts, strict=True))


FLAGS = st.sampled_from([0, L.QCOW_OFLAG_COPIED, L.QCOW_OFLAG_ZERO,
                         L.QCOW_OFLAG_COPIED | L.QCOW_OFLAG_ZERO, L.QCOW_OFLAG_COMPRESSED,
                         L.QCOW_OFLAG_COMPRESSED | L.QCOW_OFLAG_COPIED])
BITMAPS = st.one_of(
    st.sampled_from([0, L.L2_BITMAP_ALLOC_ALL, L.L2_BITMAP_ZERO_ALL]),
    st.integers(0, (1 << 32) - 1),  # allocated subclusters only
    st.integers(0, (1 << 32) - 1).map(lambda z: z << 32),  # zero subclusters only
    st.integers(0, (1 << 64) - 1),  # anything, often invalid
)


@st.composite
def tables(draw: st.DrawFn, geo: Geometry) -> list[int]:
    """Tables made mostly of runs: unallocated stretches, contiguous data, zero flags,
    compressed entries, and the odd broken entry."""
    cs = geo.cluster_size
    n = geo.l2_size
    entries: list[int] = []
    while len(entries) < n:
        kind = draw(st.sampled_from(["hole", "data", "data", "any"]))
        k = min(n - len(entries), draw(st.integers(1, 12)))
        if kind == "hole":
            entries += [0] * k
        elif kind == "data":
            host = draw(st.integers(1, 1 << 20)) * cs
            flag = draw(st.sampled_from([0, L.QCOW_OFLAG_COPIED, L.QCOW_OFLAG_ZERO]))
            entries += [(host + j * cs) | flag for j in range(k)]
        else:
            for _ in range(k):
                off = draw(st.sampled_from([0, cs, 2 * cs, 512 * cs, 3 * cs + 512]))
                entries.append(off | draw(FLAGS))
    if not geo.extended_l2:
        return entries
    words: list[int] = []
    for e in entries:
        words += [e, draw(BITMAPS)]
    return words


@settings(max_examples=150, deadline=None)
@given(data=st.data(), ext=st.booleans(), df=st.booleans(), few=st.sampled_from([0, 1 << 30]))
def test_scan_matches_entry_definition(data: st.DataObject, ext: bool, df: bool,
                                       few: int) -> None:
    """Both ways of the scanner: array operations (few=0) and few entries one by one."""
    geo = EXT if ext else STD
    words = data.draw(tables(geo))
    tr = scan_l2(array("Q", words), geo, df, few)
    runs, bad = reference(words, geo, df)
    assert as_pieces(tr) == runs
    assert [m for _, _, m in tr.invalid] == bad
    span = geo.l2_size * geo.cluster_size
    assert sum(tr.lengths) == span
    for s, e, _ in tr.invalid:
        assert 0 <= s < e <= span


def test_zero_table_is_one_run() -> None:
    tr = scan_l2(array("Q", bytes(STD.cluster_size)), STD, False)
    assert as_pieces(tr) == [(0, STD.l2_size * STD.cluster_size, SC.UNALLOCATED_PLAIN, 0)]


def test_contiguous_data_is_one_run_and_a_gap_splits_it() -> None:
    cs = STD.cluster_size
    words = [0] * STD.l2_size
    for i in range(10):
        words[i] = (100 * cs + i * cs) | L.QCOW_OFLAG_COPIED
    words[10] = 500 * cs
    tr = scan_l2(array("Q", words), STD, False)
    assert as_pieces(tr)[:3] == [(0, 10 * cs, SC.NORMAL, 100 * cs),
                                 (10 * cs, cs, SC.NORMAL, 500 * cs),
                                 (11 * cs, (STD.l2_size - 11) * cs, SC.UNALLOCATED_PLAIN, 0)]


def test_cache_rescans_a_table_changed_in_place() -> None:
    cs = STD.cluster_size
    table = array("Q", bytes(cs))
    cache = ScanCache(STD, False)
    assert cache.runs(table).states == [SC.UNALLOCATED_PLAIN]
    assert cache.runs(table) is cache.runs(table)
    table[3] = 7 * cs
    assert cache.runs(table).states == [SC.UNALLOCATED_PLAIN, SC.NORMAL, SC.UNALLOCATED_PLAIN]


@settings(max_examples=100, deadline=None)
@given(data=st.data(), ext=st.booleans(), df=st.booleans())
def test_iter_runs_bulk_equals_entry_by_entry(data: st.DataObject, ext: bool, df: bool) -> None:
    geo = EXT if ext else STD
    n_tables = 3
    l2s: list[array[int] | None] = [
        data.draw(st.one_of(st.none(), tables(geo).map(lambda w: array("Q", w))))
        for _ in range(n_tables)]
    span = geo.l2_size * geo.cluster_size
    total = n_tables * span
    offset = data.draw(st.integers(0, total - 1))
    length = data.draw(st.integers(1, total - offset))

    def run(bulk_min: int, cache: ScanCache | None) -> tuple[list[Piece], list[str]]:
        msgs: list[str] = []
        got = list(iter_runs(geo, lambda i: l2s[i] if i < n_tables else None, offset,
                             length, df, msgs.append, cache=cache, bulk_min=bulk_min))
        return got, msgs

    slow = run(1 << 30, None)
    assert run(0, None) == slow
    assert run(0, ScanCache(geo, df)) == slow
    runs = slow[0]
    assert runs[0][0] == offset and sum(n for _, n, _, _ in runs) == length
