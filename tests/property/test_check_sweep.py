"""The check's bulk sweep of L2 tables (nbdqcow/qcow2/check/sweep.py) against the
entry-by-entry walk that defines it: on random images with random damage (entries
past the end of the file, unaligned, compressed, with reserved bits, shared clusters,
refcount overflows, bad subcluster bitmaps, duplicate and damaged L1 entries,
snapshots), checking and repairing with the sweep gives the same figures, messages,
exit code and repaired file as without it.  Small sweep groups and read chunks make
every image cross their boundaries."""

from __future__ import annotations

import random
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdqcow.block.hostfile import HostFile
from nbdqcow.image import open_image
from nbdqcow.qcow2 import layout as L
from nbdqcow.qcow2.check import check_file, sweep, walk
from nbdqcow.qcow2.create import Qcow2Options, create_qcow2
from nbdqcow.qcow2.layout_view import mapping_summary
from nbdqcow.qcow2.snapshot_ops import create_snapshot

KiB = 1024
SIZE = 4 << 20


def _make(path: Path, r: random.Random, cluster_bits: int, refcount_order: int,
          extended: bool, snapshot: bool) -> None:
    create_qcow2(str(path), SIZE, Qcow2Options(cluster_bits=cluster_bits,
                                               refcount_order=refcount_order,
                                               extended_l2=extended))
    drv = open_image(str(path), "qcow2", writable=True)
    try:
        for _ in range(r.randrange(1, 24)):
            n = r.randrange(1, 96) * 4 * KiB
            off = r.randrange(0, (SIZE - n) // 512) * 512
            drv.pwrite(bytes([r.randrange(1, 256)]) * n, off)  # type: ignore[attr-defined]
        drv.flush()
    finally:
        drv.close()
    if snapshot:
        create_snapshot(str(path), "s1")
        drv = open_image(str(path), "qcow2", writable=True)
        try:
            drv.pwrite(b"\x5a" * 8192, r.randrange(0, SIZE // 8192) * 8192)  # type: ignore[attr-defined]
            drv.flush()
        finally:
            drv.close()


def _damage(path: Path, r: random.Random, howmuch: int) -> None:
    """Random L1 and L2 entries rewritten with values the check must judge."""
    b = bytearray(path.read_bytes())
    cb = struct.unpack_from(">I", b, 20)[0]
    cs = 1 << cb
    l1_size, l1_off = struct.unpack_from(">IQ", b, 36)
    ext = len(b) > 72 and bool(struct.unpack_from(">Q", b, 72)[0] & (1 << 4))
    step = 16 if ext else 8
    l1 = [struct.unpack_from(">Q", b, l1_off + 8 * i)[0] for i in range(l1_size)]
    tables = [e & L.L1E_OFFSET_MASK for e in l1 if e & L.L1E_OFFSET_MASK]
    if not tables:
        return
    clusters = len(b) // cs
    for _ in range(howmuch):
        t = r.choice(tables)
        i = r.randrange(cs // step) if r.random() < 0.3 else r.randrange(min(64, cs // step))
        kind = r.randrange(10)
        host = r.randrange(clusters + 3) * cs
        copied = L.QCOW_OFLAG_COPIED if r.random() < 0.6 else 0
        if kind == 0:
            e = host | copied  # any cluster, maybe shared or past the end
        elif kind == 1:
            e = (host + 512 * r.randrange(1, max(2, cs // 512))) | copied  # unaligned
        elif kind == 2:
            e = L.QCOW_OFLAG_COMPRESSED | r.randrange(1 << 40)
        elif kind == 3:
            e = host | copied | (1 << r.choice([1, 5, 8, 57, 61]))  # reserved bit
        elif kind == 4:
            e = host | L.QCOW_OFLAG_ZERO | copied
        elif kind == 5:
            e = r.choice(tables) | copied  # an L2 table as data
        elif kind == 6:
            e = (clusters + r.randrange(0, 3)) * cs | copied  # past the end of the file
        else:
            e = struct.unpack_from(">Q", b, t + step * ((i + 1) % (cs // step)))[0]  # a twin
        struct.pack_into(">Q", b, t + step * i, e)
        if ext:
            bm = r.choice([0, 0xFFFFFFFF, 0xFFFFFFFF << 32, r.randrange(1 << 64)])
            struct.pack_into(">Q", b, t + step * i + 8, bm)
    if r.random() < 0.5:
        i = r.randrange(l1_size)
        choice = r.randrange(4)
        e = [r.choice(tables) | L.QCOW_OFLAG_COPIED,  # a table reached twice
             r.choice(tables) + 512,  # unaligned
             r.choice(tables) | (1 << 58),  # reserved bit
             (clusters + 5) * cs][choice]  # past the end
        struct.pack_into(">Q", b, l1_off + 8 * i, e)
    path.write_bytes(bytes(b))


def _check(path: Path, repair: str | None, use_sweep: bool) -> tuple[object, ...]:
    walk.Walk.SWEEP = use_sweep
    try:
        f = HostFile(str(path), writable=repair is not None)
        try:
            res = check_file(f, "img", repair)
        finally:
            f.close()
    finally:
        walk.Walk.SWEEP = True
    return (res.to_dict(), res.messages, res.exit_code, res.failure)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1 << 32), cluster_bits=st.sampled_from([9, 12, 16]),
       refcount_order=st.sampled_from([0, 1, 4, 6]), extended=st.booleans(),
       snapshot=st.booleans(), howmuch=st.sampled_from([0, 1, 5, 40]),
       repair=st.sampled_from([None, None, "leaks", "all"]))
def test_sweep_equals_entry_by_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     seed: int, cluster_bits: int, refcount_order: int,
                                     extended: bool, snapshot: bool, howmuch: int,
                                     repair: str | None) -> None:
    if extended and cluster_bits < 14:
        cluster_bits = 14
    if snapshot and refcount_order == 0:
        snapshot = False  # one-bit refcounts cannot count a snapshot's references
    monkeypatch.setattr(walk, "GROUP_BYTES", 3 << cluster_bits)
    monkeypatch.setattr(sweep, "CHUNK_BYTES", 2 << cluster_bits)
    r = random.Random(seed)
    a = tmp_path / f"a{seed}.qcow2"
    _make(a, r, cluster_bits, refcount_order, extended, snapshot)
    _damage(a, r, howmuch)
    b = tmp_path / f"b{seed}.qcow2"
    shutil.copyfile(a, b)
    assert _check(a, repair, True) == _check(b, repair, False)
    assert a.read_bytes() == b.read_bytes()


def test_mapping_line_from_the_sweep(tmp_path: Path) -> None:
    """A clean check's mapping summary (from the sweep's arrays) is layout_view's."""
    r = random.Random(3)
    p = tmp_path / "m.qcow2"
    _make(p, r, 12, 4, False, False)
    f = HostFile(str(p), writable=False)
    try:
        res = check_file(f, "m")
    finally:
        f.close()
    assert res.exit_code == 0 and res.guest_map is not None
    drv = open_image(str(p), "qcow2", writable=False)
    try:
        assert res.guest_map.summary() == mapping_summary(drv)  # type: ignore[arg-type]
    finally:
        drv.close()
