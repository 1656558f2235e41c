"""Dirty bitmaps kept current by a writable export (``-B NAME`` without ``-r``), side by
side with qemu-nbd 7.2: bitmaps added by ``qemu-img bitmap``, writes, write-zeroes and
trims through NBD; the live ``qemu:dirty-bitmap:`` map is exactly the touched granules;
after SIGTERM the bitmaps are stored (no ``in-use``) and qemu-nbd -r -B reads the same
bits; after SIGKILL they are left in use (inconsistent), as qemu-nbd leaves them."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tooling import ServerFactory, repo_env, require_tool

KiB, MiB = 1 << 10, 1 << 20
SIZE = 64 * MiB
#: (name, granularity, enabled)
BITMAPS = [("b0", 64 * KiB, True), ("fine", 4 * KiB, True), ("off", 64 * KiB, False)]
#: (kind, offset, length)
OPS = [("write", 100000, 5000), ("write", 3 * MiB, 1), ("zero", 10 * MiB, 70000),
       ("trim", 30 * MiB, 128 * KiB), ("write", SIZE - 1, 1), ("zero", 40 * MiB + 512, 4 * MiB),
       ("write", 50 * MiB - 10, 20)]


def run(*argv: str) -> str:
    require_tool(argv[0])
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env=repo_env())
    assert res.returncode == 0, f"{argv}: {res.stderr}"
    return res.stdout


def make_image(path: Path) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", str(path))  # before: not tracked
    for name, gran, enabled in BITMAPS:
        run("qemu-img", "bitmap", "--add", "-g", str(gran), str(path), name)
        if not enabled:
            run("qemu-img", "bitmap", "--disable", str(path), name)


def apply_ops(uri: str) -> None:
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.connect_uri(uri)
    for kind, off, n in OPS:
        if kind == "write":
            h.pwrite(b"\xab" * n, off)
        elif kind == "zero":
            h.zero(n, off)
        else:
            h.trim(n, off)
    h.flush()
    h.shutdown()


def expected(gran: int, enabled: bool) -> list[tuple[int, int, bool]]:
    """Maximal (offset, length, dirty) runs: every granule an operation touched."""
    bits = bytearray(SIZE // gran)
    if enabled:
        for _, off, n in OPS:
            for g in range(off // gran, (off + n - 1) // gran + 1):
                bits[g] = 1
    runs: list[tuple[int, int, bool]] = []
    for g, b in enumerate(bits):
        if runs and runs[-1][2] == bool(b):
            s, n, d = runs[-1]
            runs[-1] = (s, n + gran, d)
        else:
            runs.append((g * gran, gran, bool(b)))
    return runs


def dirty_map(uri: str, name: str) -> list[tuple[int, int, bool]]:
    out: list[dict[str, Any]] = json.loads(
        run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", uri))
    return [(e["offset"], e["length"], bool(e["type"] & 1)) for e in out]


def info_bitmaps(img: Path) -> list[dict[str, Any]]:
    info = json.loads(run("qemu-img", "info", "--output=json", "-U", str(img)))
    out: list[dict[str, Any]] = info["format-specific"]["data"].get("bitmaps", [])
    return out


def check_clean(img: Path) -> None:
    res = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True,
                         text=True, timeout=60)
    data = json.loads(res.stdout)
    assert res.returncode == 0 and not data.get("leaks") and not data.get("corruptions"), data


SERVE = ["-t", "--discard=unmap", *[a for b in BITMAPS for a in ("-B", b[0])]]


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    make_image(ours)
    shutil.copy(ours, ref)
    return ours, ref


def test_live_map_then_stored_on_sigterm(images: tuple[Path, Path],
                                         nbdqcow_server: ServerFactory,
                                         qemu_nbd_server: ServerFactory) -> None:
    ours, ref = images
    srv, qsrv = nbdqcow_server(ours, *SERVE), qemu_nbd_server(ref, *SERVE)
    # while open the bitmaps are in use, as qemu-nbd marks them
    assert info_bitmaps(ours) == info_bitmaps(ref)
    assert all("in-use" in b["flags"] for b in info_bitmaps(ours))
    apply_ops(srv.uri)
    apply_ops(qsrv.uri)
    for name, gran, enabled in BITMAPS:
        live = dirty_map(srv.uri, name)
        assert live == expected(gran, enabled), name
        assert live == dirty_map(qsrv.uri, name), name
    assert srv.stop(signal.SIGTERM) == 0
    qsrv.stop(signal.SIGTERM)
    stored = info_bitmaps(ours)
    assert stored == info_bitmaps(ref)
    assert [b["name"] for b in stored] == [b[0] for b in BITMAPS]
    assert all("in-use" not in b["flags"] for b in stored)
    assert [("auto" in b["flags"]) for b in stored] == [b[2] for b in BITMAPS]
    check_clean(ours)
    # qemu reads back the bits that were live
    for name, gran, enabled in BITMAPS:
        back = qemu_nbd_server(ours, "-r", "-B", name)
        assert dirty_map(back.uri, name) == expected(gran, enabled), name
        back.stop()
    run("qemu-img", "compare", "-q", str(ours), str(ref))


def test_sigkill_leaves_bitmaps_in_use_like_qemu_nbd(images: tuple[Path, Path],
                                                    nbdqcow_server: ServerFactory,
                                                    qemu_nbd_server: ServerFactory) -> None:
    ours, ref = images
    srv, qsrv = nbdqcow_server(ours, *SERVE), qemu_nbd_server(ref, *SERVE)
    apply_ops(srv.uri)
    apply_ops(qsrv.uri)
    srv.stop(signal.SIGKILL)
    qsrv.stop(signal.SIGKILL)
    got = info_bitmaps(ours)
    assert got == info_bitmaps(ref)
    assert all("in-use" in b["flags"] for b in got)
    check_clean(ours)
    # an in-use bitmap is refused by both servers, and kept in use by a writable open
    for start in (nbdqcow_server, qemu_nbd_server):
        res = start(ours, "-B", "b0", wait=False)
        assert res.proc.wait(30) != 0
        assert "inconsistent" in res.log.read_text()
    again = nbdqcow_server(ours, "--discard=unmap")
    apply_ops(again.uri)
    assert again.stop() == 0
    assert info_bitmaps(ours) == got
    check_clean(ours)


def test_bitmap_in_backing_file_served_from_writable_overlay(
        tmp_path: Path, nbdqcow_server: ServerFactory, qemu_nbd_server: ServerFactory) -> None:
    """-B finds a bitmap down the chain (read-only there): it does not track the
    overlay's writes, in qemu-nbd either."""
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M")
    run("qemu-img", "bitmap", "--add", str(base), "old")
    run("qemu-io", "-f", "qcow2", "-c", "write 2M 100k", str(base))
    maps = []
    for i, start in enumerate((nbdqcow_server, qemu_nbd_server)):
        top = tmp_path / f"top{i}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
        srv = start(top, "-t", "-B", "old")
        nbd = pytest.importorskip("nbd")
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        h.pwrite(b"x" * 4096, 8 * MiB)
        h.shutdown()
        maps.append(dirty_map(srv.uri, "old"))
        srv.stop()
    assert maps[0] == maps[1]
    assert maps[0] == [(0, 2 * MiB, False), (2 * MiB, 128 * KiB, True),
                       (2 * MiB + 128 * KiB, 14 * MiB - 128 * KiB, False)]


def test_relayout_carries_bitmaps(tmp_path: Path, qemu_nbd_server: ServerFactory) -> None:
    import sys

    img, before = tmp_path / "img.qcow2", tmp_path / "before.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 8M 1M", str(img))  # out of order
    run("qemu-img", "bitmap", "--add", str(img), "b0")
    run("qemu-img", "bitmap", "--add", "-g", "4k", str(img), "fine")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 2 0 100k", "-c", "write -P 3 5M 1", str(img))
    run("qemu-img", "bitmap", "--disable", str(img), "fine")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 4 12M 64k", str(img))
    shutil.copy(img, before)
    maps = {}
    for name in ("b0", "fine"):
        srv = qemu_nbd_server(before, "-r", "-t", "-B", name)
        maps[name] = dirty_map(srv.uri, name)
        srv.stop()
    res = subprocess.run([sys.executable, "-m", "nbdqcow", "relayout", "--no-progress", str(img)],
                         capture_output=True, text=True, timeout=60, env=repo_env())
    assert res.returncode == 0, res.stderr
    assert info_bitmaps(img) == info_bitmaps(before)
    check_clean(img)
    run("qemu-img", "compare", "-q", str(img), str(before))
    for name in ("b0", "fine"):
        srv = qemu_nbd_server(img, "-r", "-t", "-B", name)
        assert dirty_map(srv.uri, name) == maps[name], name
        srv.stop()
    # an in-use bitmap is refused, the image untouched
    data = bytearray(img.read_bytes())
    from nbdqcow.qcow2.header import parse_header
    from nbdqcow.qcow2.layout import EXT_BITMAPS

    ext = parse_header(bytes(data[: 2 * MiB]), len(data)).extension(EXT_BITMAPS)
    assert ext is not None
    data[int.from_bytes(ext[16:24], "big") + 15] |= 1
    img.write_bytes(bytes(data))
    res = subprocess.run([sys.executable, "-m", "nbdqcow", "relayout", "--no-progress", str(img)],
                         capture_output=True, text=True, timeout=60, env=repo_env())
    assert res.returncode == 1 and "inconsistent" in res.stderr, res.stderr
    assert img.read_bytes() == bytes(data)
