"""``nbdqcow layout`` verdicts and pictures, ``nbdqcow relayout`` on an image qemu
fragmented (the seed post's swap), judged by qemu-img map / compare / check."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from pathlib import Path

import pytest
from imagegen import create, qemu_img, qemu_io, qemu_map_json
from tooling import repo_env

from nbdqcow.cli import main
from nbdqcow.qcow2.driver import Qcow2Driver
from nbdqcow.qcow2.layout_view import mapping_summary, mapping_verdict
from nbdqcow.qcow2.relayout import tmp_path_for

MiB = 1 << 20
SEED_OPTS = {"cluster_size": "1M", "preallocation": "full"}
SWAP = ["discard 0 2m", "write -P 0x61 1m 1m", "write -P 0x60 0 1m"]
OUT_OF_PLACE = "#d62728"


def seed_image(path: Path, fragment: bool = True) -> Path:
    create(path, 10 * MiB, opts=dict(SEED_OPTS))
    qemu_io(path, ["write -P 0x5 2m 3m", "write -z 6m 1m", *(SWAP if fragment else [])])
    return path


def qemu_offsets(path: Path) -> Counter[int]:
    """host - guest -> mapped clusters (1 MiB), from qemu-img map --output=json."""
    deltas: Counter[int] = Counter()
    for e in qemu_map_json(path):
        if "offset" in e:
            start, length, off = int(e["start"]), int(e["length"]), int(e["offset"])  # type: ignore[call-overload]
            first, last = start // MiB, (start + length - 1) // MiB
            deltas[off - start] += last - first + 1
    return deltas


def assert_clean(path: Path) -> str:
    proc = qemu_img("check", str(path), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No errors were found" in proc.stdout
    return proc.stdout


def summary(path: Path) -> tuple[bool, int | None, int, int]:
    d = Qcow2Driver.open(str(path), writable=False)
    try:
        s = mapping_summary(d)
        return s.constant, s.offset, s.out_of_place, s.runs
    finally:
        d.close()


def test_verdicts_agree_with_qemu_map(tmp_path: Path, qemu_tools: None) -> None:
    frag = seed_image(tmp_path / "frag.qcow2")
    const = seed_image(tmp_path / "const.qcow2", fragment=False)
    qd = qemu_offsets(const)
    assert len(qd) == 1
    (off,) = qd
    assert summary(const) == (True, off, 0, 1)
    qf = qemu_offsets(frag)
    usual, _ = qf.most_common(1)[0]
    constant, offset, out, runs = summary(frag)
    assert not constant and offset == usual
    assert out == sum(qf.values()) - qf[usual] == 2
    assert runs >= 3  # cluster 0, cluster 1, the rest
    assert "fragmented" in assert_clean(frag)
    assert mapping_verdict(str(const)) == f"constant: host = guest + {off:#x}"
    assert mapping_verdict(str(frag)) == f"{runs} runs, 2 of 10 clusters out of place"
    assert mapping_verdict(str(tmp_path / "missing.qcow2")) is None


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    # the image data inflates to exactly one filter byte + 3 bytes per pixel per row
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0]
        if tag == b"IDAT":
            idat += body
        pos += 12 + n
    assert len(zlib.decompress(idat)) == h * (1 + 3 * w)
    return w, h


def test_layout_pictures(tmp_path: Path, qemu_tools: None,
                         capsys: pytest.CaptureFixture[str]) -> None:
    frag = seed_image(tmp_path / "frag.qcow2")
    const = seed_image(tmp_path / "const.qcow2", fragment=False)
    results = {}
    for name, img in (("frag", frag), ("const", const)):
        svg = tmp_path / f"{name}.svg"
        png = tmp_path / f"{name}.png"
        capsys.readouterr()
        assert main(["layout", str(img), "-o", str(svg)]) == 0
        verdict = capsys.readouterr().out.strip()
        assert main(["layout", "-q", str(img), "-o", str(png)]) == 0
        root = ET.parse(svg).getroot()
        texts = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
        bands = [p.get("fill") for p in root.iter("{http://www.w3.org/2000/svg}polygon")]
        assert verdict in texts and "metadata" in texts and "data" in texts
        assert _png_size(png.read_bytes()) == (int(root.get("width", 0)), int(root.get("height", 0)))
        results[name] = (verdict, bands)
    assert results["const"][0] == "constant: host = guest + 0x500000"
    assert OUT_OF_PLACE not in results["const"][1]
    assert results["frag"][0].endswith("2 of 10 clusters out of place")
    assert results["frag"][1].count(OUT_OF_PLACE) == 2


@pytest.mark.parametrize("to_new_file", [False, True], ids=["in-place", "-O"])
def test_relayout_seed_swap(tmp_path: Path, qemu_tools: None, to_new_file: bool) -> None:
    img = seed_image(tmp_path / "frag.qcow2")
    ref = tmp_path / "ref.qcow2"
    ref.write_bytes(img.read_bytes())
    assert len(qemu_offsets(img)) > 1
    target = tmp_path / "new.qcow2" if to_new_file else img
    argv = ["relayout", "--no-progress", str(img)]
    if to_new_file:
        argv[2:2] = ["-O", str(target)]
    assert main(argv) == 0
    offsets = qemu_offsets(target)
    assert len(offsets) == 1 and sum(offsets.values()) == 10
    assert "0.00% fragmented" in assert_clean(target)
    assert qemu_img("compare", str(ref), str(target), check=False).returncode == 0
    # the kept zero cluster is still a zero cluster with its host offset
    zero = [e for e in qemu_map_json(target) if e["start"] == 6 * MiB]
    assert zero and zero[0]["zero"] and "offset" in zero[0]
    if to_new_file:
        assert img.read_bytes() == ref.read_bytes()
    assert not Path(tmp_path_for(str(target))).exists()


def test_relayout_backing_and_extended_l2(tmp_path: Path, qemu_tools: None) -> None:
    base = create(tmp_path / "base.raw", 2 * MiB, fmt="raw")
    qemu_io(base, ["write -P 0x7 0 2M"], fmt="raw")
    for opts in ({"cluster_size": "65536", "extended_l2": "on"}, {"cluster_size": "65536"}):
        img = create(tmp_path / "top.qcow2", 2 * MiB, opts=opts, backing=base, backing_fmt="raw")
        qemu_io(img, ["write -P 0x1 64k 64k", "write -P 2 0 4k", "write -z 256k 64k",
                      "discard 128k 64k", "write -c -P 3 1M 64k", "write -P 4 200k 8k"])
        ref = tmp_path / "ref.qcow2"
        ref.write_bytes(img.read_bytes())
        assert main(["relayout", "-q", str(img)]) == 0
        assert_clean(img)
        assert qemu_img("compare", str(ref), str(img), check=False).returncode == 0
        assert len(qemu_offsets_any(img)) == 1
        img.unlink()


def qemu_offsets_any(path: Path) -> set[int]:
    return {int(e["offset"]) - int(e["start"])  # type: ignore[call-overload]
            for e in qemu_map_json(path) if "offset" in e and e["depth"] == 0}


def test_relayout_refuses_snapshots(tmp_path: Path, qemu_tools: None,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    img = seed_image(tmp_path / "frag.qcow2")
    qemu_img("snapshot", "-c", "s", str(img))
    before = img.read_bytes()
    assert main(["relayout", str(img)]) != 0
    assert "snapshot" in capsys.readouterr().err
    assert img.read_bytes() == before


def test_relayout_killed_halfway(tmp_path: Path, qemu_tools: None) -> None:
    img = seed_image(tmp_path / "frag.qcow2")
    ref = tmp_path / "ref.qcow2"
    ref.write_bytes(img.read_bytes())
    tmp = Path(tmp_path_for(str(img)))
    env = repo_env(NBDQCOW_RELAYOUT_TEST_PAUSE="0.3")
    proc = subprocess.Popen([sys.executable, "-m", "nbdqcow", "relayout", "-p", str(img)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 20
        progress = b""
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), False)
        while time.monotonic() < deadline and b"( 30/100%)" not in progress:
            progress += proc.stderr.read() or b""
            assert proc.poll() is None, progress
            time.sleep(0.05)
        assert b"( 30/100%)" in progress and tmp.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert img.read_bytes() == ref.read_bytes()
    assert_clean(img)
    assert len(qemu_offsets(img)) > 1
    # the next run cleans up the stale temporary file and succeeds
    assert main(["relayout", "-q", str(img)]) == 0
    assert not tmp.exists()
    assert len(qemu_offsets(img)) == 1
    assert qemu_img("compare", str(ref), str(img), check=False).returncode == 0


def test_summarize_counts_runs_and_misplaced_clusters() -> None:
    from nbdqcow.qcow2.layout_view import GuestRun, Kind, summarize

    cs = 65536
    # guest clusters 0 and 1 swapped, 2..9 at +0x100000, 10 unallocated, 11 at +0x100000
    runs = [
        GuestRun(0, cs, Kind.DATA, 0x100000 + cs),
        GuestRun(cs, cs, Kind.DATA, 0x100000),
        GuestRun(2 * cs, 8 * cs, Kind.DATA, 0x100000 + 2 * cs),
        GuestRun(10 * cs, cs, Kind.UNALLOCATED, None),
        GuestRun(11 * cs, cs, Kind.KEPT_ZERO, 0x100000 + 11 * cs),
    ]
    s = summarize(runs, cs)
    assert (s.offset, s.out_of_place, s.mapped_clusters, s.runs) == (0x100000, 2, 11, 4)
    assert not s.constant and s.verdict == "4 runs, 2 of 11 clusters out of place"
    ok = summarize(runs[2:], cs)
    assert ok.constant and ok.verdict == "constant: host = guest + 0x100000"
    assert summarize(runs[3:4], cs).verdict == "no guest cluster is mapped"
