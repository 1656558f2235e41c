"""``nbdqcow bitmap`` side by side with ``qemu-img bitmap``: the same command lines on
two copies of one image must leave bitmaps that ``qemu-img info`` lists the same, with
the same bits (read back by qemu-nbd -B), images that ``qemu-img check`` finds clean,
and fail with the same message and exit status."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tooling import repo_env, require_tool, wait_ready

MiB = 1 << 20


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    require_tool(argv[0])
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env=repo_env())


def ok(*argv: str) -> str:
    res = run(*argv)
    assert res.returncode == 0, f"{argv}: {res.stderr}"
    return res.stdout


def both(imgs: tuple[Path, Path], *args: str) -> tuple[int, str]:
    """Run ``qemu-img bitmap ARGS`` on the first image and ``nbdqcow bitmap ARGS`` on
    the second (``{img}`` stands for the image); both must agree on the outcome.
    Returns (status, qemu-img's first line of error without its prefix)."""
    ref = run("qemu-img", "bitmap", *[str(imgs[0]) if a == "{img}" else a for a in args])
    ours = subprocess.run(
        [sys.executable, "-m", "nbdqcow", "bitmap",
         *[str(imgs[1]) if a == "{img}" else a for a in args]],
        capture_output=True, text=True, timeout=60, env=repo_env())
    assert "Traceback" not in ours.stderr, ours.stderr
    assert ours.returncode == ref.returncode, (args, ours.stderr, ref.stderr)
    want = ref.stderr.splitlines()[0].removeprefix("qemu-img: ") if ref.stderr else ""
    got = ours.stderr.strip()
    if want:
        assert got.count("\n") == 0, got
        # qemu-img may wrap a message over two lines: ours is its first line, whole
        assert got.removeprefix("nbdqcow: ").replace(str(imgs[1]), str(imgs[0])).startswith(want)
    else:
        assert got == "", got
    return ref.returncode, want


def bitmaps(img: Path) -> list[dict[str, Any]]:
    info = json.loads(ok("qemu-img", "info", "--output=json", str(img)))
    out: list[dict[str, Any]] = info["format-specific"]["data"].get("bitmaps", [])
    return out


def check_clean(img: Path) -> None:
    res = json.loads(run("qemu-img", "check", "--output=json", str(img)).stdout)
    assert res.get("corruptions", 0) == 0 and res.get("leaks", 0) == 0, res
    assert res.get("check-errors", 0) == 0, res


def dirty_map(img: Path, name: str, tmp: Path) -> list[dict[str, Any]]:
    """qemu-nbd -r -B NAME and nbdinfo --map: the bits as qemu reads them."""
    sock = tmp / "map.sock"
    require_tool("qemu-nbd")
    proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-k", str(sock), "-B", name, str(img)],
                            stderr=subprocess.PIPE)
    try:
        wait_ready(proc, sock, None)
        out: list[dict[str, Any]] = json.loads(ok(
            "nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", f"nbd+unix:///?socket={sock}"))
        return out
    finally:
        proc.kill()  # read-only: nothing to lose
        proc.wait(10)
        sock.unlink(missing_ok=True)


def same_state(imgs: tuple[Path, Path], tmp: Path) -> None:
    ref, ours = bitmaps(imgs[0]), bitmaps(imgs[1])
    assert ours == ref
    for img in imgs:
        check_clean(img)
    for b in ref:
        if "in-use" not in b["flags"]:
            assert dirty_map(imgs[1], b["name"], tmp) == dirty_map(imgs[0], b["name"], tmp), b


def qemu_io(imgs: tuple[Path, Path], *cmds: str) -> None:
    for img in imgs:
        ok("qemu-io", "-f", "qcow2", *[a for c in cmds for a in ("-c", c)], str(img))


@pytest.fixture
def imgs(tmp_path: Path) -> tuple[Path, Path]:
    a = tmp_path / "ref.qcow2"
    ok("qemu-img", "create", "-q", "-f", "qcow2", str(a), "32M")
    ok("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 3M", str(a))
    b = tmp_path / "ours.qcow2"
    shutil.copy(a, b)
    return a, b


def test_add_track_clear_enable_disable_remove(imgs: tuple[Path, Path], tmp_path: Path) -> None:
    both(imgs, "--add", "{img}", "b0")
    both(imgs, "--add", "-g", "4k", "--disable", "{img}", "fine")
    both(imgs, "--add", "--granularity=1M", "{img}", "coarse")
    same_state(imgs, tmp_path)
    qemu_io(imgs, "write 100000 5000", "write 20M 1", "write 31M 1M")  # b0, coarse track
    same_state(imgs, tmp_path)
    both(imgs, "--enable", "{img}", "fine")
    both(imgs, "--disable", "{img}", "b0")
    qemu_io(imgs, "write 5M 12345")  # fine and coarse track, b0 does not
    same_state(imgs, tmp_path)
    both(imgs, "--clear", "{img}", "coarse")
    both(imgs, "--remove", "{img}", "fine")
    same_state(imgs, tmp_path)
    both(imgs, "--remove", "{img}", "b0")
    both(imgs, "--remove", "{img}", "coarse")
    same_state(imgs, tmp_path)
    assert bitmaps(imgs[1]) == []


def test_several_actions_in_one_call(imgs: tuple[Path, Path], tmp_path: Path) -> None:
    both(imgs, "--add", "--disable", "{img}", "x")
    both(imgs, "--remove", "--add", "-g", "128k", "{img}", "x")
    both(imgs, "--add", "--remove", "--add", "{img}", "y")
    qemu_io(imgs, "write 1M 1")
    both(imgs, "--clear", "--disable", "{img}", "y")
    same_state(imgs, tmp_path)


def test_merge(imgs: tuple[Path, Path], tmp_path: Path) -> None:
    both(imgs, "--add", "-g", "512", "{img}", "src")
    both(imgs, "--add", "{img}", "dst")
    both(imgs, "--disable", "{img}", "dst")
    qemu_io(imgs, "write 100000 10", "write 7M 3k")
    both(imgs, "--merge", "src", "{img}", "dst")
    same_state(imgs, tmp_path)
    # from another file, with and without its format
    other = tmp_path / "other.qcow2"
    ok("qemu-img", "create", "-q", "-f", "qcow2", str(other), "32M")
    ok("qemu-img", "bitmap", "--add", "-g", "8k", str(other), "o")
    ok("qemu-io", "-f", "qcow2", "-c", "write 20M 100k", str(other))
    before = other.read_bytes()
    both(imgs, "--merge", "o", "-b", str(other), "{img}", "dst")
    both(imgs, "--add", "--merge", "o", "-b", str(other), "-F", "qcow2", "{img}", "new")
    assert other.read_bytes() == before  # the source is only read
    same_state(imgs, tmp_path)


ERRORS = [
    ("exists", ["--add", "{img}", "b0"]),
    ("not-found", ["--remove", "{img}", "nope"]),
    ("not-found-clear", ["--clear", "{img}", "nope"]),
    ("enable-before-add", ["--enable", "--add", "{img}", "late"]),
    ("merge-source-missing", ["--merge", "zz", "{img}", "b0"]),
    ("merge-target-missing", ["--merge", "b0", "{img}", "zz"]),
    ("add-then-fail", ["--add", "--merge", "zz", "{img}", "kept"]),  # 'kept' stays added
    ("granularity-small", ["--add", "-g", "256", "{img}", "g"]),
    ("granularity-odd", ["--add", "-g", "1000", "{img}", "g"]),
    ("granularity-huge", ["--add", "-g", "4G", "{img}", "g"]),
    ("granularity-text", ["--add", "-g", "abc", "{img}", "g"]),
    ("granularity-without-add", ["-g", "64k", "--remove", "{img}", "b0"]),
    ("source-without-merge", ["-b", "x.qcow2", "--clear", "{img}", "b0"]),
    ("fmt-without-source", ["--merge", "b0", "-F", "qcow2", "{img}", "b0"]),
    ("no-action", ["{img}", "b0"]),
    ("no-name", ["--add", "{img}"]),
    ("extra-arg", ["--add", "{img}", "b1", "more"]),
    ("empty-name", ["--add", "{img}", ""]),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_errors_like_qemu_img(imgs: tuple[Path, Path], tmp_path: Path,
                              case: tuple[str, list[str]]) -> None:
    both(imgs, "--add", "{img}", "b0")
    status, msg = both(imgs, *case[1])
    assert status == 1 and msg
    same_state(imgs, tmp_path)


def test_merge_size_mismatch_and_in_use(imgs: tuple[Path, Path], tmp_path: Path) -> None:
    small = tmp_path / "small.qcow2"
    ok("qemu-img", "create", "-q", "-f", "qcow2", str(small), "8M")
    ok("qemu-img", "bitmap", "--add", str(small), "s")
    both(imgs, "--add", "{img}", "b0")
    both(imgs, "--add", "{img}", "b1")
    assert both(imgs, "--merge", "s", "-b", str(small), "{img}", "b0")[0] == 1
    # an in-use (inconsistent) bitmap: only --remove works on it
    for img in imgs:
        from nbdqcow.qcow2.header import parse_header
        from nbdqcow.qcow2.layout import EXT_BITMAPS

        data = bytearray(img.read_bytes())
        ext = parse_header(bytes(data[: 2 * MiB]), len(data)).extension(EXT_BITMAPS)
        assert ext is not None
        entry = int.from_bytes(ext[16:24], "big")  # the first entry: b0
        data[entry + 15] |= 1  # flags, low byte: in-use
        img.write_bytes(bytes(data))
    for args in (["--clear"], ["--enable"], ["--disable"], ["--merge", "b1"]):
        assert both(imgs, *args, "{img}", "b0")[0] == 1
    assert both(imgs, "--merge", "b0", "{img}", "b1")[0] == 1
    same_state(imgs, tmp_path)
    both(imgs, "--remove", "{img}", "b0")
    same_state(imgs, tmp_path)


def test_raw_image_refused(tmp_path: Path) -> None:
    img = tmp_path / "r.img"
    img.write_bytes(bytes(MiB))
    before = img.read_bytes()
    res = subprocess.run([sys.executable, "-m", "nbdqcow", "bitmap", "--add", "-f", "raw",
                          str(img), "x"], capture_output=True, text=True, env=repo_env())
    assert res.returncode == 1 and "Can't store persistent bitmaps" in res.stderr
    assert img.read_bytes() == before
