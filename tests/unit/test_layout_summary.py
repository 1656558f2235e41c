"""layout_view.summarize: the array version says what the run-by-run version says."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdqcow.qcow2.layout_view import GuestRun, Kind, summarize

CS = 512


@st.composite
def run_lists(draw: st.DrawFn) -> list[GuestRun]:
    runs: list[GuestRun] = []
    pos = 0
    for _ in range(draw(st.integers(0, 40))):
        n = draw(st.integers(1, 5)) * CS - draw(st.sampled_from([0, 0, 0, 100]))
        kind = draw(st.sampled_from([Kind.DATA, Kind.KEPT_ZERO, Kind.UNALLOCATED, Kind.ZERO]))
        host = None
        if kind in (Kind.DATA, Kind.KEPT_ZERO):
            if runs and runs[-1].host is not None and draw(st.booleans()):
                host = runs[-1].host + runs[-1].length  # follows on
            else:
                host = pos + draw(st.sampled_from([0, 4 * CS, -2 * CS, 7 * CS]))
                host = max(0, host)
        runs.append(GuestRun(pos, n, kind, host))
        pos += n
    return runs


@settings(max_examples=300, deadline=None)
@given(run_lists())
def test_bulk_summary_matches(runs: list[GuestRun]) -> None:
    assert summarize(runs, CS, bulk=True) == summarize(runs, CS, bulk=False)
