"""End to end: nbdfuse -> losetup -> mkfs.ext4 -> mount -> write files -> umount ->
fsck clean -> stop the server -> qemu-img check clean -> serve again -> checksums unchanged.

Needs root (loop devices, mount) and /dev/fuse: skipped without them, FAILS under $CI.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tooling import ServerFactory, repo_env, require_tool

MiB = 1 << 20


def _need(condition: bool, msg: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, env=repo_env())
    if check and res.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res


@contextlib.contextmanager
def attached(uri: str, where: Path, readonly: bool = False) -> Iterator[str]:
    """nbdfuse the export to a file, then put a loop device on it; yields /dev/loopN."""
    where.mkdir(exist_ok=True)
    pidfile = where.parent / f"{where.name}.pid"
    pidfile.unlink(missing_ok=True)
    argv = ["nbdfuse", "-P", str(pidfile)] + (["-r"] if readonly else []) + [
        str(where / "disk"), uri]
    fuse = subprocess.Popen(argv, env=repo_env(), stderr=subprocess.PIPE)
    loop = ""
    try:
        for _ in range(500):
            if pidfile.exists() or fuse.poll() is not None:
                break
            time.sleep(0.02)
        if fuse.poll() is not None:
            pytest.fail(f"nbdfuse exited: {fuse.stderr.read() if fuse.stderr else ''}")
        loop = sh("losetup", "-f", "--show", *(["-r"] if readonly else []),
                  str(where / "disk")).stdout.strip()
        yield loop
    finally:
        if loop:
            sh("losetup", "-d", loop, check=False)
        sh("fusermount3", "-u", str(where), check=False)
        try:
            fuse.wait(20)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()


@contextlib.contextmanager
def mounted(dev: str, where: Path, readonly: bool = False) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    sh("mount", *(["-o", "ro"] if readonly else []), dev, str(where))
    try:
        yield where
    finally:
        sh("umount", str(where), check=False)


def test_ext4_on_nbdfuse(tmp_path: Path, nbdqcow_server: ServerFactory) -> None:
    for tool in ("nbdfuse", "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount",
                 "fusermount3", "qemu-img"):
        require_tool(tool)
    _need(os.geteuid() == 0, "needs root (loop devices and mount)")
    _need(os.path.exists("/dev/fuse"), "needs /dev/fuse")
    _need(os.path.exists("/dev/loop-control"), "needs loop devices")

    img = tmp_path / "fs.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), str(128 * MiB))
    srv = nbdqcow_server(img, "-t", "-e", "4", "--discard=unmap")
    files: dict[str, str] = {}
    with attached(srv.uri, tmp_path / "fuse") as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, tmp_path / "mnt") as mnt:
            for i in range(6):
                data = os.urandom((i + 1) * 512 * 1024 + i)
                (mnt / f"file{i}").write_bytes(data)
                files[f"file{i}"] = hashlib.sha256(data).hexdigest()
            (mnt / "dir").mkdir()
            (mnt / "dir" / "small").write_text("hello nbdqcow\n")
            files["dir/small"] = hashlib.sha256(b"hello nbdqcow\n").hexdigest()
            os.sync()
            # delete one file so fstrim sends TRIM through the whole stack
            (mnt / "file0").unlink()
            del files["file0"]
            sh("fstrim", str(mnt), check=False)
        fsck = sh("fsck.ext4", "-f", "-n", dev, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert srv.stop() == 0
    sh("qemu-img", "check", str(img))

    again = nbdqcow_server(img, "-t", "-r")
    with attached(again.uri, tmp_path / "fuse2", readonly=True) as dev, \
            mounted(dev, tmp_path / "mnt2", readonly=True) as mnt:
        got = {name: hashlib.sha256((mnt / name).read_bytes()).hexdigest() for name in files}
        assert got == files
        assert not (mnt / "file0").exists()
