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
from typing import Any

import pytest
from tooling import repo_env, require_tool

MiB = 1 << 20


def run(*argv: str) -> str:
    require_tool(argv[0])
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, env=repo_env())
    assert res.returncode == 0, f"{argv}: {res.stderr}{res.stdout}"
    return res.stdout


def ours(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdqcow", "convert", *args],
                          capture_output=True, text=True, timeout=120, env=repo_env())


def check(img: Path) -> dict[str, Any]:
    res = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True,
                         text=True, timeout=60)
    data: dict[str, Any] = json.loads(res.stdout)
    assert res.returncode == 0 and not data.get("leaks") and not data.get("corruptions"), data
    return data


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
    assert check(mine)["compressed-clusters"] == check(ref)["compressed-clusters"] > 0
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
            check(out)


def test_refusals_like_qemu_img(tmp_path: Path, source: Path) -> None:
    for args in (["-c", "-O", "raw", str(source), str(tmp_path / "x.raw")], [str(source)]):
        res = ours(*args)
        ref = subprocess.run(["qemu-img", "convert", *args], capture_output=True, text=True)
        assert res.returncode == ref.returncode == 1
        assert res.stderr.strip().removeprefix("nbdqcow: ") == \
            ref.stderr.strip().removeprefix("qemu-img: ")
    assert not (tmp_path / "x.raw").exists()
