"""layout_view.guest_runs (runs merged in locals) against the merge rule written out
run by run, on images with data, zeroes, discards, subclusters and random order."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.image import open_image
from nbdqcow.qcow2 import layout_view as LV
from nbdqcow.qcow2.backing import no_backing
from nbdqcow.qcow2.create import Qcow2Options, create_qcow2
from nbdqcow.qcow2.driver import Qcow2Driver

SIZE = 3 << 20


def _reference(d: Any) -> list[LV.GuestRun]:
    out: list[LV.GuestRun] = []
    for start, n, t, host in d.runs(0, d.size):
        kind = LV._SC_KIND[t]
        h = host if t in LV._MAPPED else None
        if out:
            p = out[-1]
            if (p.kind is kind and kind is not LV.Kind.COMPRESSED
                    and p.start + p.length == start and (h is None) == (p.host is None)
                    and (h is None or p.host is not None and p.host + p.length == h)):
                out[-1] = LV.GuestRun(p.start, p.length + n, kind, p.host)
                continue
        out.append(LV.GuestRun(start, n, kind, h))
    return out


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1 << 32), extended=st.booleans(),
       cluster_bits=st.sampled_from([12, 14, 16]))
def test_guest_runs_merge_as_defined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     seed: int, extended: bool, cluster_bits: int) -> None:
    # steps much smaller than the image: runs merge across steps too
    monkeypatch.setattr(LV, "GUEST_RUNS_STEP", random.Random(seed).choice([4096, 98304, 1 << 30]))
    r = random.Random(seed)
    p = tmp_path / f"r{seed}.qcow2"
    if extended:
        cluster_bits = max(cluster_bits, 14)
    create_qcow2(str(p), SIZE, Qcow2Options(cluster_bits=cluster_bits, extended_l2=extended))
    drv: Any = open_image(str(p), "qcow2", writable=True)
    try:
        for _ in range(r.randrange(1, 30)):
            n = r.randrange(1, 40) * 2048
            off = r.randrange(0, (SIZE - n) // 2048) * 2048
            op = r.randrange(4)
            if op == 0:
                drv.write_zeroes(off, n)
            elif op == 1:
                drv.discard(off, n)
            else:
                drv.pwrite(bytes([r.randrange(1, 256)]) * n, off)
        drv.flush()
    finally:
        drv.close()
    d = Qcow2Driver.open(str(p), writable=False, backing=no_backing)
    try:
        steps: list[tuple[int, int]] = []
        got = LV.guest_runs(d, lambda done, total: steps.append((done, total)))
        assert got == _reference(d)
        assert steps[-1] == (d.size, d.size)
    finally:
        d.close()
