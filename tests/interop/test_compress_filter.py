"""Compressed writes: ``Qcow2Driver.write_compressed`` and the ``compress`` filter
(``nbdqcow.block.compress.CompressFilter``), judged by qemu: ``qemu-img check`` counts
the clusters compressed and finds the refcounts right, ``qemu-img compare`` finds the
data, the file is smaller than the data, and the same sequence of writes through
qemu-nbd's compress filter leaves the same map and the same refusals."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from imagegen import check_clean
from tooling import require_tool

from nbdqcow.block.compress import CompressFilter
from nbdqcow.block.raw import RawDriver
from nbdqcow.errors import ImageError, ImageOpenError, NotSupported
from nbdqcow.qcow2.compressing import CompressedWriteError
from nbdqcow.qcow2.driver import Qcow2Driver

KiB, MiB = 1 << 10, 1 << 20
CS = 64 * KiB


def run(*argv: str) -> str:
    require_tool(argv[0])
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{argv}: {res.stderr}{res.stdout}"
    return res.stdout


def text(n: int, seed: int = 0) -> bytes:
    """Compressible bytes (lines of text)."""
    line = b"".join(b"line %08d of a compressible file, seed %d\n" % (i, seed) for i in range(4096))
    return (line * (n // len(line) + 1))[:n]


#: (offset, data) written through the filter, in order; None: incompressible
WRITES: list[tuple[int, int, int | None]] = [
    (0, 1 * MiB, 1),                 # 16 whole clusters
    (MiB + 5, 100, 2),               # unaligned: read-modify-write of one cluster
    (2 * MiB - 10, 20, 3),           # across two clusters
    (3 * MiB, CS, None),             # incompressible: a normal cluster
    (4 * MiB - 4 * KiB, 4 * KiB, 4),  # the tail of a cluster
]


def apply(f: CompressFilter, model: bytearray) -> None:
    for off, n, seed in WRITES:
        data = os.urandom(n) if seed is None else text(n, seed)
        f.pwrite(data, off)
        model[off : off + n] = data


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_clusters_checked_and_compared_by_qemu(tmp_path: Path, ctype: str) -> None:
    img, raw = tmp_path / "c.qcow2", tmp_path / "c.raw"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compression_type={ctype}", str(img), "8M")
    model = bytearray(8 * MiB)
    f = CompressFilter(Qcow2Driver.open(str(img), writable=True), "qcow2")
    assert f.caps.request_alignment == CS
    apply(f, model)
    assert f.pread(0, len(model)) == bytes(model)
    f.close()
    raw.write_bytes(bytes(model))
    stats = check_clean(img)["compressed-clusters"]
    assert stats == 16 + 1 + 2 + 1  # every written cluster but the incompressible one
    run("qemu-img", "compare", "-q", str(img), str(raw))
    assert os.path.getsize(img) < 1.5 * MiB  # 4.1 MiB of data
    info = json.loads(run("qemu-img", "info", "--output=json", str(img)))
    assert info["format-specific"]["data"]["compression-type"] == ctype


def test_refusals(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    d = Qcow2Driver.open(str(img), writable=True)
    f = CompressFilter(d, "qcow2")
    f.pwrite(text(CS), 0)
    with pytest.raises(CompressedWriteError):  # compressed: cannot be overwritten (EIO)
        f.pwrite(text(CS, 9), 0)
    d.pwrite(b"n" * 512, CS)  # a normal cluster: neither
    with pytest.raises(CompressedWriteError):
        f.pwrite(text(CS, 9), CS)
    with pytest.raises(CompressedWriteError):  # the engine itself takes whole clusters only
        d.write_compressed(text(512), 2 * CS + 512)
    f.pwrite(b"", 3 * CS + 5)  # an empty write stores nothing (no padded cluster)
    assert not f.block_status(3 * CS, CS)[0].present
    f.write_zeroes(0, CS)  # a plain zero cluster takes a compressed write again
    f.pwrite(text(CS, 5), 0)
    assert f.pread(0, CS) == text(CS, 5)
    f.close()
    check_clean(img)
    # raw below, an odd size when writable, an external data file
    with pytest.raises(ImageOpenError, match="not supported for underlying format: raw"):
        CompressFilter(RawDriver(str(img), writable=False), "raw")
    odd = tmp_path / "odd.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(odd), "1000k")
    d = Qcow2Driver.open(str(odd), writable=True)
    with pytest.raises(ImageOpenError, match="not a multiple of request alignment"):
        CompressFilter(d, "qcow2")
    # the engine compresses a partial last cluster, padded (as qemu)
    d.write_compressed(text(1000 * KiB - 15 * CS), 15 * CS)
    assert d.pread(15 * CS, 1000 * KiB - 15 * CS) == text(1000 * KiB - 15 * CS)
    d.close()
    assert check_clean(odd)["compressed-clusters"] == 1
    ro = Qcow2Driver.open(str(odd), writable=False)
    assert CompressFilter(ro, "qcow2").caps.request_alignment == 1
    ro.close()
    ext = tmp_path / "ext.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'ext.raw'}",
        str(ext), "1M")
    d = Qcow2Driver.open(str(ext), writable=True)
    with pytest.raises(NotSupported):
        CompressFilter(d, "qcow2").pwrite(text(CS), 0)
    d.close()


def test_same_map_as_qemu_nbd_compress_filter(tmp_path: Path) -> None:
    nbd = pytest.importorskip("nbd")
    require_tool("qemu-nbd")
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    for img in (ours, ref):
        run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M")
    datas = [(off, os.urandom(n) if seed is None else text(n, seed)) for off, n, seed in WRITES]
    f = CompressFilter(Qcow2Driver.open(str(ours), writable=True), "qcow2")
    results = []
    for off, data in datas + [(0, text(CS, 7))]:  # the last one is refused
        try:
            f.pwrite(data, off)
            results.append(True)
        except ImageError:
            results.append(False)
    f.close()
    sock = tmp_path / "q.sock"
    proc = subprocess.Popen(["qemu-nbd", "-k", str(sock), "--image-opts",
                             f"driver=compress,file.driver=qcow2,file.file.driver=file,"
                             f"file.file.filename={ref}"], stderr=subprocess.PIPE)
    try:
        for _ in range(1000):
            h = nbd.NBD()
            h.set_strict_mode(0)  # send unaligned writes: the server pads them
            try:
                h.connect_unix(str(sock))
                break
            except nbd.Error:
                time.sleep(0.01)
        assert h.get_block_size(nbd.SIZE_MINIMUM) == CS
        qres = []
        for off, data in datas + [(0, text(CS, 7))]:
            try:
                h.pwrite(data, off)
                qres.append(True)
            except nbd.Error:
                qres.append(False)
        h.shutdown()
    finally:
        if proc.wait(20) is None:  # pragma: no cover - it exits with its last client
            proc.kill()
    assert results == qres == [True] * len(WRITES) + [False]

    def shape(img: Path) -> list[tuple[int, int, bool, bool]]:
        return [(e["start"], e["length"], e["data"], "offset" in e)
                for e in json.loads(run("qemu-img", "map", "--output=json", str(img)))]

    assert shape(ours) == shape(ref)
    assert check_clean(ours)["compressed-clusters"] == check_clean(ref)["compressed-clusters"]
    run("qemu-img", "compare", "-q", str(ours), str(ref))


def test_filter_passes_cache_size_and_mapping_down(tmp_path: Path) -> None:
    """serve --cache-size/--mapping reach the qcow2 node under a compress filter."""
    from nbdqcow.image.open import open_image

    img = tmp_path / "c.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M")
    spec = json.dumps({"driver": "compress", "file": {"driver": "qcow2", "file": {
        "driver": "file", "filename": str(img)}}})
    for mapping, size in (("thin", 8 * CS), ("release", 5 * CS)):
        drv = open_image(f"json:{spec}", cache_size=size, mapping=mapping)
        try:
            assert isinstance(drv, CompressFilter)
            inner = drv.inner
            assert isinstance(inner, Qcow2Driver)
            assert inner.policy.value == mapping
            assert inner.l2_cache.capacity == size // CS
        finally:
            drv.close()
