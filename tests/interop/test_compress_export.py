"""A ``driver=compress`` export (virt-v2v's command line: ``-t --shared=0
--discard=unmap --pid-file P --socket S --image-opts driver=compress,...``) side by
side with qemu-nbd: nbdcopy of a compressible file into it, then ``qemu-img check``
counts the clusters compressed, ``qemu-img compare`` finds the data, and the file is
smaller than the data; the same ``json:`` spec works, and the refusals are qemu-nbd's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from imagegen import check_clean
from tooling import ServerFactory, repo_env, require_tool

MiB = 1 << 20


def run(*argv: str) -> str:
    require_tool(argv[0])
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, env=repo_env())
    assert res.returncode == 0, f"{argv}: {res.stderr}{res.stdout}"
    return res.stdout


def compressible(path: Path, size: int) -> None:
    lines = b"".join(b"%08d a line of a log file that compresses well, mostly\n" % i
                     for i in range(size // 56 + 1))
    path.write_bytes(lines[:size])


def spec(img: Path) -> str:
    return f"driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename={img}"


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_nbdcopy_into_compress_export_like_qemu_nbd(
        tmp_path: Path, ctype: str, nbdqcow_server: ServerFactory,
        qemu_nbd_server: ServerFactory) -> None:
    require_tool("nbdcopy")
    src = tmp_path / "src.raw"
    compressible(src, 8 * MiB)
    results = []
    for name, start in (("ours", nbdqcow_server), ("ref", qemu_nbd_server)):
        img = tmp_path / f"{name}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compression_type={ctype}",
            str(img), "8M")
        srv = start("--image-opts", "-t", "--shared=0", "--discard=unmap",
                    "--pid-file", str(tmp_path / f"{name}.pid"), spec(img))
        info = json.loads(run("nbdinfo", "--json", srv.uri))["exports"][0]
        assert info["block_size_minimum"] == 64 * 1024
        run("nbdcopy", str(src), srv.uri)
        assert srv.stop() == 0 or name == "ref"
        results.append(img)
    ours, ref = results
    assert check_clean(ours)["compressed-clusters"] == check_clean(ref)["compressed-clusters"] == 128
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(src), str(ours))
    size = ours.stat().st_size
    assert size < src.stat().st_size // 4
    assert size <= 2 * ref.stat().st_size  # same ballpark as qemu's own compression


def test_json_spec_and_refusals(tmp_path: Path, nbdqcow_server: ServerFactory) -> None:
    img = tmp_path / "c.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    node = {"driver": "compress", "file": {"driver": "qcow2",
                                           "file": {"driver": "file", "filename": str(img)}}}
    srv = nbdqcow_server("json:" + json.dumps(node), "-t")
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(srv.uri)
    data = b"abc" * 30000
    h.pwrite(data, 1000)  # unaligned: the server pads the two clusters it touches
    assert h.pread(len(data), 1000) == data
    with pytest.raises(nbd.Error, match="Input/output error"):
        h.pwrite(b"x" * 512, 0)  # the cluster holds compressed data already
    h.shutdown()
    srv.stop()
    assert check_clean(img)["compressed-clusters"] == 2
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(MiB))
    for opts, words in (
        (f"driver=compress,file.driver=raw,file.file.driver=file,file.file.filename={raw}",
         "Compression is not supported for underlying format: raw"),
        (f"driver=compress,file.filename={img}",
         "Compression is not supported for underlying format: file"),
        ("driver=compress", 'A block device must be specified for "file"'),
        (spec(img) + ",level=3", "does not support the option 'level'"),
    ):
        res = subprocess.run([sys.executable, "-m", "nbdqcow", "serve", "-k",
                              str(tmp_path / "x.sock"), "--image-opts", opts],
                             capture_output=True, text=True, timeout=30, env=repo_env())
        assert res.returncode == 1 and words in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1, res.stderr


def test_bitmap_of_the_image_below_a_compress_export(tmp_path: Path,
                                                     nbdqcow_server: ServerFactory,
                                                     qemu_nbd_server: ServerFactory) -> None:
    """-B finds the qcow2 image's bitmap through the filter (as qemu-nbd), and the
    compressed writes mark it."""
    nbd = pytest.importorskip("nbd")
    maps = []
    for name, start in (("ours", nbdqcow_server), ("ref", qemu_nbd_server)):
        img = tmp_path / f"{name}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M")
        run("qemu-img", "bitmap", "--add", str(img), "b")
        srv = start("--image-opts", "-t", "-B", "b", spec(img))
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        h.pwrite(b"q" * 65536 * 2, 65536 * 3)
        h.shutdown()
        maps.append(run("nbdinfo", "--map=qemu:dirty-bitmap:b", srv.uri))
        srv.stop()
        stored = json.loads(run("qemu-img", "info", "--output=json", str(img)))
        assert stored["format-specific"]["data"]["bitmaps"][0]["flags"] == ["auto"]
    assert maps[0] == maps[1]
    assert "196608      131072    1  dirty" in maps[0]
