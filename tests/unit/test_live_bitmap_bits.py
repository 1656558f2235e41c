"""LiveBitmap's bit arithmetic against a plain list of granules: marks of random ranges
(any alignment, up to the disk end) and the dirty runs read back from any range."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdqcow.qcow2.bitmap_store import LiveBitmap


@settings(max_examples=300, deadline=None)
@given(gbits=st.integers(9, 13), disk=st.integers(1, 300_000),
       marks=st.lists(st.tuples(st.integers(0, 300_000), st.integers(1, 70_000)), max_size=8),
       query=st.tuples(st.integers(0, 300_000), st.integers(1, 300_000)))
def test_marks_and_runs_match_a_model(gbits: int, disk: int, marks: list[tuple[int, int]],
                                      query: tuple[int, int]) -> None:
    gran = 1 << gbits
    nb = -(-disk // gran)
    b = LiveBitmap("x", gbits, True, disk, bytearray((nb + 7) // 8), None)
    model = [False] * nb
    for off, n in marks:
        b.mark(off, n)
        if off < disk:
            for g in range(off // gran, min((off + n - 1) // gran, nb - 1) + 1):
                model[g] = True
    assert all(byte == 0 for byte in b.data[nb // 8 + 1:])  # nothing past the disk end
    off, n = query
    if off >= disk:
        return
    n = min(n, disk - off)
    runs = b.dirty_runs(off, n, 1 << 20)
    assert runs[0].start == off and sum(r.length for r in runs) == n
    for r in runs:
        for g in range(r.start // gran, (r.start + r.length - 1) // gran + 1):
            assert model[g] == r.dirty
    for a, c in zip(runs, runs[1:], strict=False):
        assert a.dirty != c.dirty and a.start + a.length == c.start
    b.clear()
    assert not any(r.dirty for r in b.dirty_runs(0, disk, 1 << 20))
