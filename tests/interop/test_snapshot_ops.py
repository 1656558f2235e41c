"""``nbdqcow snapshot -c/-d/-a`` against qemu-img: listing, check, data of each snapshot,
snapshots made by one tool read and applied by the other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from imagegen import convert_to_raw, create, qemu_img, qemu_io
from tooling import repo_env

from nbdqcow.cli import main
from nbdqcow.qcow2.driver import Qcow2Driver

MiB = 1 << 20
SIZE = 4 * MiB

# (id, qemu-img create options, whether qemu-io can write compressed clusters)
FORMATS = [
    ("v3-64k", {"cluster_size": "65536"}, True),
    ("extl2-64k", {"cluster_size": "65536", "extended_l2": "on"}, True),
    ("v2-4k", {"compat": "0.10", "cluster_size": "4096"}, True),
]


def nbdqcow(*args: str | Path, check: bool = True) -> int:
    """The command line, in process (a subprocess costs half a second of imports)."""
    rc = main([str(a) for a in args])
    if check:
        assert rc == 0, f"nbdqcow {args} failed ({rc})"
    return rc


def test_cli_subprocess(tmp_path: Path, qemu_tools: None) -> None:
    image = create(tmp_path / "img.qcow2", SIZE)
    for args in (["-c", "s1"], ["-a", "s1"], ["-d", "s1"]):
        proc = subprocess.run([sys.executable, "-m", "nbdqcow", "snapshot", *args, str(image)],
                              capture_output=True, text=True, env=repo_env(), timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert_clean(image)


def snapshot_names(path: Path) -> list[str]:
    out = qemu_img("snapshot", "-l", str(path)).stdout.splitlines()
    # "ID TAG VM SIZE DATE VM CLOCK ICOUNT" table: the tag is the second column
    return [line.split()[1] for line in out[2:] if line.strip()]


def assert_clean(path: Path) -> None:
    proc = qemu_img("check", str(path), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No errors were found" in proc.stdout, proc.stdout


def fill(path: Path, compressed: bool) -> None:
    cmds = ["write -P 0x11 0 1M", "write -P 0x12 1536k 100k", "write -z 3M 128k"]
    if compressed:
        cmds.append("write -c -P 0x13 2M 64k")
    qemu_io(path, cmds)


@pytest.fixture(params=FORMATS, ids=[f[0] for f in FORMATS])
def image(request: pytest.FixtureRequest, tmp_path: Path, qemu_tools: None) -> Path:
    _, opts, compressed = request.param
    p = create(tmp_path / "img.qcow2", SIZE, opts=dict(opts))
    fill(p, compressed)
    return p


def test_create_delete_apply_roundtrip(image: Path, tmp_path: Path) -> None:
    raw = tmp_path / "tmp.raw"
    before = convert_to_raw(image, raw)
    nbdqcow("snapshot", "-c", "s1", image)
    assert snapshot_names(image) == ["s1"]
    assert_clean(image)
    # qemu writes over shared clusters: it must copy, the snapshot keeps the old data
    qemu_io(image, ["write -P 0x21 0 128k", "write -P 0x22 2M 4k", "discard 1536k 64k"])
    assert_clean(image)
    assert convert_to_raw(image, raw, snapshot="s1") == before
    middle = convert_to_raw(image, raw)
    assert middle != before
    # our engine reads what qemu sees in our snapshot
    d = Qcow2Driver.open(str(image), writable=False, snapshot="s1")
    try:
        assert d.pread(0, SIZE) == before
    finally:
        d.close()
    # a second snapshot made by qemu, then ours deleted
    qemu_img("snapshot", "-c", "q2", str(image))
    nbdqcow("snapshot", "-c", "s3", image)
    assert snapshot_names(image) == ["s1", "q2", "s3"]
    assert_clean(image)
    nbdqcow("snapshot", "-d", "s1", image)
    assert snapshot_names(image) == ["q2", "s3"]
    assert_clean(image)
    assert convert_to_raw(image, raw, snapshot="q2") == middle
    # change the active disk, then apply qemu's snapshot with our tool
    qemu_io(image, ["write -P 0x31 512k 1M"])
    after = convert_to_raw(image, raw)
    nbdqcow("snapshot", "-a", "q2", image)
    assert_clean(image)
    assert convert_to_raw(image, raw) == middle
    # and qemu applies ours
    qemu_img("snapshot", "-a", "s3", str(image))
    assert convert_to_raw(image, raw) == middle
    assert_clean(image)
    # delete everything: back to a plain image, nothing leaked
    nbdqcow("snapshot", "-d", "q2", image)
    nbdqcow("snapshot", "-d", "s3", image)
    assert snapshot_names(image) == []
    assert_clean(image)
    assert after != middle
    assert convert_to_raw(image, raw) == middle


def test_our_engine_copies_after_our_snapshot(tmp_path: Path, qemu_tools: None) -> None:
    """COPIED is cleared by -c: a write through our engine must not touch the snapshot."""
    image = create(tmp_path / "img.qcow2", SIZE,
                   opts={"cluster_size": "65536", "preallocation": "metadata"})
    qemu_io(image, ["write -P 0x41 0 4M"])
    raw = tmp_path / "tmp.raw"
    before = convert_to_raw(image, raw)
    nbdqcow("snapshot", "-c", "s1", image)
    d = Qcow2Driver.open(str(image), writable=True)
    try:
        d.pwrite(b"\x42" * 65536, 65536)
        d.write_zeroes(3 * MiB, 65536)
    finally:
        d.close()
    assert_clean(image)
    assert convert_to_raw(image, raw, snapshot="s1") == before
    now = convert_to_raw(image, raw)
    assert now[65536:131072] == b"\x42" * 65536
    assert now[3 * MiB : 3 * MiB + 65536] == bytes(65536)
    nbdqcow("snapshot", "-d", "s1", image)
    assert_clean(image)
    assert convert_to_raw(image, raw) == now


def test_snapshot_entry_fields(tmp_path: Path, qemu_tools: None) -> None:
    image = create(tmp_path / "img.qcow2", SIZE)
    qemu_img("snapshot", "-c", "a", str(image))
    nbdqcow("snapshot", "-c", "b", image)
    info = qemu_img("info", "--output=json", str(image)).stdout
    snaps = json.loads(info)["snapshots"]
    assert [(s["id"], s["name"], s["vm-state-size"]) for s in snaps] == [
        ("1", "a", 0), ("2", "b", 0)]
    assert snaps[1]["date-sec"] >= snaps[0]["date-sec"]


def test_errors(tmp_path: Path, qemu_tools: None, capsys: pytest.CaptureFixture[str]) -> None:
    image = create(tmp_path / "img.qcow2", SIZE)
    nbdqcow("snapshot", "-c", "s1", image)
    capsys.readouterr()
    assert nbdqcow("snapshot", "-c", "s1", image, check=False) != 0
    assert "already exists" in capsys.readouterr().err
    for flag in ("-d", "-a"):
        assert nbdqcow("snapshot", flag, "nope", image, check=False) != 0
        assert "not found" in capsys.readouterr().err
    assert snapshot_names(image) == ["s1"]
    assert_clean(image)


CRASH = """
import os, sys
import nbdqcow.qcow2.snapshot_ops as ops
point, op, path, name = sys.argv[1:5]
real = getattr(ops, point)
def crash(*a, **k):
    if point == "_apply_delta" and a[2] > 0:
        return real(*a, **k)
    os._exit(9)
setattr(ops, point, crash)
getattr(ops, op)(path, name)
"""


@pytest.mark.parametrize("point,op", [
    ("_switch_table", "create_snapshot"),  # before the header switch
    ("_apply_delta", "delete_snapshot"),   # after it, before the references drop
    ("_free_l1_clusters", "apply_snapshot"),  # after the switch, mid-way through frees
])
def test_crash_leaves_only_leaks(tmp_path: Path, qemu_tools: None, point: str, op: str) -> None:
    image = create(tmp_path / "img.qcow2", SIZE, opts={"cluster_size": "65536"})
    fill(image, True)
    raw = tmp_path / "tmp.raw"
    if op != "create_snapshot":
        nbdqcow("snapshot", "-c", "s1", image)
        qemu_io(image, ["write -P 0x51 0 64k"])
    before = convert_to_raw(image, raw)
    snap_before = convert_to_raw(image, raw, snapshot="s1") if op != "create_snapshot" else b""
    proc = subprocess.run([sys.executable, "-c", CRASH, point, op, str(image), "s1"],
                          env=repo_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    chk = qemu_img("check", str(image), check=False)
    assert chk.returncode in (0, 3), chk.stdout  # clean or leaks only, never corrupt
    assert "ERROR" not in chk.stdout
    names = snapshot_names(image)
    if op == "create_snapshot":
        assert names == [] and convert_to_raw(image, raw) == before
    elif op == "delete_snapshot":
        assert names == [] and convert_to_raw(image, raw) == before
    else:
        assert names == ["s1"] and convert_to_raw(image, raw) == snap_before
    qemu_img("check", "-r", "leaks", str(image), check=False)
    assert_clean(image)


def test_refcount_overflow_changes_nothing(tmp_path: Path, qemu_tools: None) -> None:
    """2-bit refcounts hold 3 references: the third snapshot fails and leaves no trace."""
    image = create(tmp_path / "img.qcow2", SIZE, opts={"refcount_bits": "2"})
    qemu_io(image, ["write -P 0x71 0 128k"])
    nbdqcow("snapshot", "-c", "a", image)
    nbdqcow("snapshot", "-c", "b", image)
    assert nbdqcow("snapshot", "-c", "c", image, check=False) != 0
    assert snapshot_names(image) == ["a", "b"]
    assert_clean(image)
    nbdqcow("snapshot", "-d", "a", image)
    nbdqcow("snapshot", "-c", "c", image)
    assert snapshot_names(image) == ["b", "c"]
    assert_clean(image)
