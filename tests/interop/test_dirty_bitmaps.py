"""``-B NAME`` / ``--bitmap=NAME``: a persistent dirty bitmap of a qcow2 image exported as
the ``qemu:dirty-bitmap:NAME`` metadata context, side by side with qemu-nbd 7.2.

Images are made by qemu-img (``bitmap --add/--disable``) and qemu-io (writes between
the bitmap operations); both servers serve the same file read-only and must answer the
same extents (``nbdinfo --map``, libnbd with REQ_ONE and several contexts) and refuse
the same images (unknown name, in-use bitmap, stale bitmaps).  nbdqcow also refuses
hostile bitmap tables.  Writable exports: tests/interop/test_live_bitmaps.py.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tooling import ServerFactory, repo_env, require_tool

KiB, MiB = 1 << 10, 1 << 20


def run(*argv: str, cwd: Path | None = None) -> str:
    require_tool(argv[0])
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, cwd=cwd,
                         env=repo_env())
    if res.returncode:
        pytest.fail(f"{' '.join(argv)} failed: {res.stderr}")
    return res.stdout


def qemu_io(img: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(*args, str(img))


# --- images -------------------------------------------------------------------------------------
@dataclass
class Case:
    """An image with bitmap ``name``; ``dirty``/``clean``: guest offsets that must read so."""

    name: str
    bitmap: str
    build: Callable[[Path], Path]
    dirty: list[int] = field(default_factory=list)
    clean: list[int] = field(default_factory=list)


def bitmap_layout(img: Path) -> tuple[int, int, int]:
    """(file position of the first directory entry, its table offset, its table size)."""
    from nbdqcow.qcow2.header import parse_header
    from nbdqcow.qcow2.layout import EXT_BITMAPS

    data = img.read_bytes()
    ext = parse_header(data[: 2 * MiB], len(data)).extension(EXT_BITMAPS)
    assert ext is not None
    entry = struct.unpack_from(">Q", ext, 16)[0]
    toff, tsize = struct.unpack_from(">QI", data, entry)
    return entry, toff, tsize


def table_entries(img: Path) -> list[int]:
    _, toff, tsize = bitmap_layout(img)
    return list(struct.unpack_from(f">{tsize}Q", img.read_bytes(), toff))


def patch(img: Path, pos: int, fmt: str, *values: int) -> None:
    with open(img, "r+b") as f:
        f.seek(pos)
        f.write(struct.pack(fmt, *values))


def unaligned_64k(d: Path) -> Path:
    """Default granularity (64 KiB); writes before the bitmap (not tracked), writes that
    start and end inside granules, one at the last byte; a second, finer bitmap."""
    img = d / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M")
    qemu_io(img, "write -P 1 0 1M", "write 40M 64k")
    run("qemu-img", "bitmap", "--add", str(img), "b0")
    qemu_io(img, "write 100000 5000", "write 3M 1", "write 10M 200k")
    run("qemu-img", "bitmap", "--add", "--granularity", "4096", str(img), "fine")
    qemu_io(img, "write 20M 12345", "write 67108863 1")
    for name in ("b0", "fine"):
        run("qemu-img", "bitmap", "--disable", str(img), name)
    return img


def multi_cluster(d: Path) -> Path:
    """512-byte clusters and granularity: one bitmap data cluster covers 2 MiB, so the
    8 MiB image needs four; the two middle ones stay clean, so their table entries are 0."""
    img = d / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(img), "8M")
    qemu_io(img, "write 0 4k")
    run("qemu-img", "bitmap", "--add", "--granularity", "512", str(img), "fine")
    qemu_io(img, "write 1000 3000", "write 300k 700", "write 1M 1M", "write 7000k 100k",
            "write 8387584 512")
    run("qemu-img", "bitmap", "--disable", str(img), "fine")
    entries = table_entries(img)
    assert len(entries) == 4 and entries[1] == entries[2] == 0 and entries[0] and entries[3]
    return img


def all_ones_entry(d: Path) -> Path:
    """The same with table entry 1 set to "all ones" (offset 0, bit 0: qcow2.txt)."""
    img = multi_cluster(d)
    _, toff, _ = bitmap_layout(img)
    patch(img, toff + 8, ">Q", 1)
    return img


def odd_size(d: Path) -> Path:
    """A disk size that is not a multiple of the granularity, dirty up to its end."""
    img = d / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1000k")
    run("qemu-img", "bitmap", "--add", "-g", "65536", str(img), "t")
    qemu_io(img, "write 990k 10k", "write 100k 1")
    run("qemu-img", "bitmap", "--disable", str(img), "t")
    return img


def enabled(d: Path) -> Path:
    """A bitmap left enabled (auto): qemu-nbd -r serves it as it is stored."""
    img = d / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M")
    run("qemu-img", "bitmap", "--add", str(img), "on")
    qemu_io(img, "write 1M 64k", "write 5M 3")
    return img


def in_backing(d: Path) -> Path:
    """The bitmap lives in the backing file: qemu-nbd finds it down the chain."""
    base = d / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M")
    run("qemu-img", "bitmap", "--add", "-g", "128k", str(base), "old")
    qemu_io(base, "write 2M 100k")
    run("qemu-img", "bitmap", "--disable", str(base), "old")
    img = d / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(img))
    qemu_io(img, "write 4M 64k")
    return img


def shorter_backing(d: Path) -> Path:
    """The bitmap of an 8 MiB backing file under a 16 MiB overlay: clean past its end."""
    base = d / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M")
    run("qemu-img", "bitmap", "--add", str(base), "old")
    qemu_io(base, "write 7M 1M")
    img = d / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(img), "16M")
    return img


CASES = [
    Case("unaligned-64k", "b0", unaligned_64k, dirty=[100000, 3 * MiB, 10 * MiB, 20 * MiB],
         clean=[0, 40 * MiB, 30 * MiB]),
    Case("unaligned-64k-fine", "fine", unaligned_64k, dirty=[20 * MiB, 64 * MiB - 1],
         clean=[3 * MiB, 10 * MiB]),
    Case("multi-cluster", "fine", multi_cluster, dirty=[1000, 300 * KiB, 7000 * KiB, 8 * MiB - 1024],
         clean=[0, 3 * MiB, 5 * MiB]),
    Case("all-ones-entry", "fine", all_ones_entry, dirty=[3 * MiB, 1000], clean=[5 * MiB]),
    Case("odd-size", "t", odd_size, dirty=[999 * KiB, 64 * KiB], clean=[500 * KiB]),
    Case("enabled", "on", enabled, dirty=[MiB, 5 * MiB], clean=[0]),
    Case("in-backing", "old", in_backing, dirty=[2 * MiB], clean=[4 * MiB]),
    Case("shorter-backing", "old", shorter_backing, dirty=[7 * MiB], clean=[0, 8 * MiB, 12 * MiB]),
]


def nbdinfo_map(uri: str, bitmap: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(
        run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri))
    return out


def dirty_at(entries: list[dict[str, Any]], pos: int) -> bool:
    (e,) = [e for e in entries if e["offset"] <= pos < e["offset"] + e["length"]]
    return bool(e["type"] & 1)


# --- the same answers as qemu-nbd -----------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_nbdinfo_map_same_as_qemu_nbd(tmp_path: Path, case: Case, nbdqcow_server: ServerFactory,
                                      qemu_nbd_server: ServerFactory) -> None:
    img = case.build(tmp_path)
    ours = nbdqcow_server(img, "-r", "-t", "-B", case.bitmap)
    ref = qemu_nbd_server(img, "-r", "-t", "-B", case.bitmap)
    got, want = nbdinfo_map(ours.uri, case.bitmap), nbdinfo_map(ref.uri, case.bitmap)
    assert got == want
    assert all(dirty_at(got, p) for p in case.dirty)
    assert not any(dirty_at(got, p) for p in case.clean)
    assert {e["description"] for e in got} == {"dirty", "clean"}


def test_qemu_img_map_x_dirty_bitmap_same_as_qemu_nbd(
        tmp_path: Path, nbdqcow_server: ServerFactory, qemu_nbd_server: ServerFactory) -> None:
    """qemu's own NBD client reading the bitmap (x-dirty-bitmap), as backup scripts do."""
    img = multi_cluster(tmp_path)
    maps = []
    for start in (nbdqcow_server, qemu_nbd_server):
        sock = start(img, "-r", "-t", "-B", "fine").socket
        maps.append(run("qemu-img", "map", "--output=json", "--image-opts",
                        f"driver=nbd,server.type=unix,server.path={sock},"
                        "x-dirty-bitmap=qemu:dirty-bitmap:fine"))
    assert maps[0] == maps[1]
    assert any(not e["present"] for e in json.loads(maps[0]))  # dirty reads as "not present"


def test_several_bitmaps_listed_like_qemu_nbd(tmp_path: Path, nbdqcow_server: ServerFactory,
                                              qemu_nbd_server: ServerFactory) -> None:
    img = unaligned_64k(tmp_path)
    args = ("-r", "-t", "-A", "-B", "b0", "--bitmap=fine")
    uris = [nbdqcow_server(img, *args).uri, qemu_nbd_server(img, *args).uri]
    lists = [json.loads(run("nbdinfo", "--list", "--json", u))["exports"][0]["contexts"]
             for u in uris]
    assert lists[0] == lists[1] == ["base:allocation", "qemu:allocation-depth",
                                    "qemu:dirty-bitmap:fine", "qemu:dirty-bitmap:b0"]
    for name in ("b0", "fine"):
        assert nbdinfo_map(uris[0], name) == nbdinfo_map(uris[1], name)
    nbd = pytest.importorskip("nbd")
    for queries in ([], ["qemu:"], ["qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:b0"],
                    ["qemu:dirty-bitmap:nope"], ["base:allocation", "qemu:dirty-bitmap:fine"]):
        found = []
        for uri in uris:
            h = nbd.NBD()
            h.set_opt_mode(True)
            h.connect_uri(uri)
            for q in queries:
                h.add_meta_context(q)
            seen: list[str] = []
            h.opt_list_meta_context(lambda name, seen=seen: seen.append(name) or 0)
            h.opt_abort()
            found.append(sorted(seen))
        assert found[0] == found[1], queries


RANGES = [(0, 8 * MiB), (1000, 5000), (1001, 1), (2 * MiB - 100, 300), (8 * MiB - 700, 700),
          (4097, 3 * MiB), (3 * MiB, 5 * MiB), (300 * KiB + 512, 100)]


def block_status(uri: str, contexts: list[str], flags: int) -> dict[tuple[int, int], Any]:
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    out: dict[tuple[int, int], Any] = {}
    for off, n in RANGES:
        seen: dict[str, list[int]] = {}

        def cb(meta: str, offset: int, entries: list[int], err: Any,
               seen: dict[str, list[int]] = seen, off: int = off) -> int:
            assert meta not in seen and offset == off
            seen[meta] = list(entries)
            return 0

        h.block_status(n, off, cb, flags)
        out[off, n] = seen
    h.shutdown()
    return out


@pytest.mark.parametrize("req_one", [False, True], ids=["all", "req-one"])
def test_libnbd_block_status_several_contexts(tmp_path: Path, req_one: bool,
                                              nbdqcow_server: ServerFactory,
                                              qemu_nbd_server: ServerFactory) -> None:
    nbd = pytest.importorskip("nbd")
    img = all_ones_entry(tmp_path)
    args = ("-r", "-t", "-A", "-B", "fine")
    contexts = ["base:allocation", "qemu:dirty-bitmap:fine", "qemu:allocation-depth"]
    flags = nbd.CMD_FLAG_REQ_ONE if req_one else 0
    got = block_status(nbdqcow_server(img, *args).uri, contexts, flags)
    want = block_status(qemu_nbd_server(img, *args).uri, contexts, flags)
    for (off, n), seen in got.items():
        assert set(seen) == set(contexts)
        for ctx, entries in seen.items():
            assert 0 < sum(entries[0::2]) <= n
            if req_one:
                assert len(entries) == 2, (ctx, off, n)
        bitmap = seen["qemu:dirty-bitmap:fine"]
        assert bitmap == want[off, n]["qemu:dirty-bitmap:fine"], (off, n)
        if not req_one:
            assert sum(bitmap[0::2]) == n
    # a bitmap context alone (no base:allocation) works too
    alone = block_status(nbdqcow_server(img, *args).uri, ["qemu:dirty-bitmap:fine"], flags)
    assert {k: v["qemu:dirty-bitmap:fine"] for k, v in alone.items()} == \
        {k: v["qemu:dirty-bitmap:fine"] for k, v in want.items()}


# --- refusals ---------------------------------------------------------------------------------------
def serve_fails(*args: str, entry: str = "serve") -> str:
    """Run nbdqcow (``serve`` or the ``nbdqcow-nbd`` entry point); it must exit
    non-zero at once with one line of error, which is returned."""
    if entry == "serve":
        cmd = [sys.executable, "-m", "nbdqcow", "serve", *args]
    else:
        cmd = [sys.executable, "-c", "import sys; from nbdqcow.cli import qemu_nbd_main; "
               "sys.exit(qemu_nbd_main())", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=repo_env())
    assert res.returncode != 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def qemu_nbd_fails(tmp_path: Path, *args: str) -> str:
    require_tool("qemu-nbd")
    res = subprocess.run(["qemu-nbd", "-k", str(tmp_path / "q.sock"), *args], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode != 0, res.stderr
    return res.stderr


def set_in_use(img: Path) -> None:
    entry, _, _ = bitmap_layout(img)
    flags = struct.unpack_from(">I", img.read_bytes(), entry + 12)[0]
    patch(img, entry + 12, ">I", flags | 1)


def clear_autoclear(img: Path) -> None:
    bits = struct.unpack_from(">Q", img.read_bytes(), 88)[0]
    patch(img, 88, ">Q", bits & ~1)


REFUSALS = {
    "unknown-name": "Bitmap 'nope' is not found",
    "in-use": "Bitmap 'b0' is inconsistent",
    "stale": "bitmaps are inconsistent",
}


@pytest.mark.parametrize("problem", REFUSALS)
@pytest.mark.parametrize("entry", ["serve", "nbdqcow-nbd"])
def test_refused_like_qemu_nbd(tmp_path: Path, problem: str, entry: str) -> None:
    words = REFUSALS[problem]
    img = unaligned_64k(tmp_path)
    name = "nope" if problem == "unknown-name" else "b0"
    if problem == "in-use":
        set_in_use(img)
    elif problem == "stale":
        clear_autoclear(img)
    before = img.read_bytes()
    sock = str(tmp_path / "n.sock")
    msg = serve_fails("-r", "-k", sock, "-B", name, str(img), entry=entry)
    assert words in msg, msg
    qemu_nbd_fails(tmp_path, "-r", "-B", name, str(img))
    assert img.read_bytes() == before


DAMAGES = {
    "table-past-eof": "lies outside the image",
    "table-unaligned": "is not aligned",
    "table-size": "bitmap table has",
    "data-past-eof": "past the end of the image",
    "entry-reserved-bits": "reserved bits",
    "granularity": "granularity",
    "type": "type",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_hostile_bitmap_one_line_error(tmp_path: Path, damage: str) -> None:
    words = DAMAGES[damage]
    img = multi_cluster(tmp_path)
    entry, toff, _ = bitmap_layout(img)
    if damage == "table-past-eof":
        patch(img, entry, ">Q", 1 << 40)
    elif damage == "table-unaligned":
        patch(img, entry, ">Q", toff + 8)
    elif damage == "table-size":
        patch(img, entry + 8, ">I", 1 << 31)
    elif damage == "data-past-eof":
        patch(img, toff, ">Q", 1 << 45)
    elif damage == "entry-reserved-bits":
        patch(img, toff + 8, ">Q", 1 << 60)
    elif damage == "granularity":
        patch(img, entry + 17, ">B", 63)
    else:
        patch(img, entry + 16, ">B", 7)
    before = img.read_bytes()
    msg = serve_fails("-r", "-k", str(tmp_path / "n.sock"), "-B", "fine", str(img))
    assert words in msg and "fine" in msg, msg
    assert img.read_bytes() == before


def test_raw_image_has_no_bitmaps(tmp_path: Path) -> None:
    img = tmp_path / "img.raw"
    img.write_bytes(bytes(MiB))
    assert serve_fails("-r", "-f", "raw", "-k", str(tmp_path / "n.sock"), "-B", "x",
                       str(img)).endswith("Bitmap 'x' is not found")
