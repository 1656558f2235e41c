"""A small real file system for tests that need one: an ext4 made on a sparse file,
attached to a loop device and mounted (needs root, mkfs.ext4, losetup, mount).

Everything is undone in a ``finally``: unmount (lazily if busy), detach the loop device.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tooling import require_tool


def _run(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
    return p.stdout.strip()


@contextlib.contextmanager
def small_ext4(workdir: Path, size_mib: int = 64) -> Iterator[Path]:
    """Mount a fresh ``size_mib`` MiB ext4 and yield its mount point."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("loop-device tests need root")
        pytest.skip("loop-device tests need root")
    for tool in ("mkfs.ext4", "losetup", "mount", "umount"):
        require_tool(tool)
    backing = workdir / "ext4.img"
    mnt = workdir / "mnt"
    mnt.mkdir()
    with open(backing, "wb") as f:
        f.truncate(size_mib << 20)
    # no reserved blocks and no lazy init: "full" means full, and no background writer
    _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0",
         str(backing))
    loop = _run("losetup", "-f", "--show", str(backing))
    mounted = False
    try:
        _run("mount", "-t", "ext4", loop, str(mnt))
        mounted = True
        yield mnt
    finally:
        if mounted and subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def fill(path: Path, chunk: int = 1 << 20) -> int:
    """Write zeros to ``path`` until the file system is full; bytes written."""
    n = 0
    buf = b"\xa5" * chunk
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n += f.write(buf)
            except OSError:
                if chunk <= 4096:
                    break
                chunk //= 16
                buf = buf[:chunk]
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    return n
