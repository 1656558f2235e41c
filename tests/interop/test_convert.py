"""``nbdqcow convert [-c]`` side by side with ``qemu-img convert [-c]``: the same data
(``qemu-img compare``), the same compressed cluster count and image size with ``-c``
(zlib and zstd), clean ``qemu-img check``; qcow2 sources with a backing file; qemu-img's
refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from imagegen import check_clean
from tooling import repo_env, require_tool, wait_ready

MiB = 1 << 20


def run(*argv: str) -> str:
    require_tool(argv[0])
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, env=repo_env())
    assert res.returncode == 0, f"{argv}: {res.stderr}{res.stdout}"
    return res.stdout


def ours(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdqcow", "convert", *args],
                          capture_output=True, text=True, timeout=120, env=repo_env())


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """6 MiB: text, a hole, random bytes, a text tail ending inside a cluster."""
    d = bytearray(6 * MiB - 4096)
    text = b"".join(b"%08d a line of text that compresses\n" % i for i in range(60000))
    d[: len(text)] = text
    d[4 * MiB : 4 * MiB + 100_000] = os.urandom(100_000)
    d[-5000:] = b"e" * 5000
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(d))
    return src


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_like_qemu_img(tmp_path: Path, source: Path, ctype: str) -> None:
    mine, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    res = ours("-c", "-O", "qcow2", "-o", f"compression_type={ctype}", str(source), str(mine))
    assert res.returncode == 0 and not res.stdout and not res.stderr, res.stderr
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}",
        str(source), str(ref))
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(source), str(mine))
    assert check_clean(mine)["compressed-clusters"] == check_clean(ref)["compressed-clusters"] > 0
    assert mine.stat().st_size <= ref.stat().st_size * 1.1
    assert mine.stat().st_size < source.stat().st_size // 4


def test_plain_and_from_qcow2_with_backing(tmp_path: Path, source: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(source), str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 9 1M 64k", "-c", "write -z 0 4k", str(top))
    for args, fmt in ((["-O", "qcow2"], "qcow2"), (["-c", "-O", "qcow2"], "qcow2"), ([], "raw")):
        out = tmp_path / f"out-{len(args)}.{fmt}"
        res = ours(*args, str(top), str(out))
        assert res.returncode == 0, res.stderr
        run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", fmt, str(top), str(out))
        if fmt == "qcow2":
            check_clean(out)


def test_refusals_like_qemu_img(tmp_path: Path, source: Path) -> None:
    for args in (["-c", "-O", "raw", str(source), str(tmp_path / "x.raw")], [str(source)]):
        res = ours(*args)
        ref = subprocess.run(["qemu-img", "convert", *args], capture_output=True, text=True)
        assert res.returncode == ref.returncode == 1
        assert res.stderr.strip().removeprefix("nbdqcow: ") == \
            ref.stderr.strip().removeprefix("qemu-img: ")
    assert not (tmp_path / "x.raw").exists()


def test_bitmaps_copied_like_qemu_img(tmp_path: Path) -> None:
    src = tmp_path / "bm.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(src), "4M")
    run("qemu-img", "bitmap", "--add", str(src), "a")
    run("qemu-img", "bitmap", "--add", "--disable", "-g", "4k", str(src), "b")
    run("qemu-io", "-f", "qcow2", "-c", "write 1M 10", "-c", "write 3M 100k", str(src))
    got = {}
    for name, conv in (("ours", lambda *a: ours(*a)),
                       ("ref", lambda *a: subprocess.run(["qemu-img", "convert", *a],
                                                         capture_output=True, text=True))):
        dst = tmp_path / f"{name}.qcow2"
        res = conv("--bitmaps", "-c", "-O", "qcow2", str(src), str(dst))
        assert res.returncode == 0, res.stderr
        info = json.loads(run("qemu-img", "info", "--output=json", str(dst)))
        got[name] = info["format-specific"]["data"]["bitmaps"]
        check_clean(dst)
        sock = tmp_path / f"{name}.sock"
        # the bits, as qemu reads them
        proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-k", str(sock), "-B", "a", str(dst)])
        try:
            wait_ready(proc, sock, None)
            got[name + "-map"] = run("nbdinfo", "--map=qemu:dirty-bitmap:a",
                                     f"nbd+unix:///?socket={sock}")
        finally:
            proc.kill()
            proc.wait()
    assert got["ours"] == got["ref"] and got["ours-map"] == got["ref-map"]
    assert "1" in got["ours-map"]  # something is dirty
    # refusals and the skip, as qemu-img
    data = bytearray(src.read_bytes())
    from nbdqcow.qcow2.header import parse_header
    from nbdqcow.qcow2.layout import EXT_BITMAPS

    ext = parse_header(bytes(data[: 2 * MiB]), len(data)).extension(EXT_BITMAPS)
    assert ext is not None
    data[int.from_bytes(ext[16:24], "big") + 15] |= 1  # 'a' in use
    src.write_bytes(bytes(data))
    for args in (["--bitmaps", "-O", "qcow2"], ["--bitmaps", "-O", "raw"],
                 ["--skip-broken-bitmaps", "-O", "qcow2"]):
        res = ours(*args, str(src), str(tmp_path / "x.img"))
        ref = subprocess.run(["qemu-img", "convert", *args, str(src), str(tmp_path / "y.img")],
                             capture_output=True, text=True)
        assert res.returncode == ref.returncode == 1
        want = ref.stderr.splitlines()[0].removeprefix("qemu-img: ")
        assert res.stderr.strip().removeprefix("nbdqcow: ").startswith(want), res.stderr
        assert not (tmp_path / "x.img").exists()
    res = ours("--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", str(src), str(tmp_path / "s.qcow2"))
    assert res.returncode == 0 and "Skipping inconsistent bitmap 'a'" in res.stderr
    info = json.loads(run("qemu-img", "info", "--output=json", str(tmp_path / "s.qcow2")))
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["b"]
